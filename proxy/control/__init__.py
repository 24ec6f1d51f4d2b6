"""The fleet's control plane: one catalog in PostgreSQL that every gateway instance follows.

schema.py creates and upgrades it; catalog.py is every write (one transaction each, which
bumps the catalog version, appends to the change log and NOTIFYs); view.py is what an
instance holds in memory and how it becomes settings; sync.py keeps that view current
(LISTEN, heartbeats, the lease) inside a running gateway.  Nothing on the request path
reads the catalog: it reads the view.
"""
