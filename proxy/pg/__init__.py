"""The database layer: pools, routing, the tenant transaction, statements, the wire, value codecs, the role audit."""
