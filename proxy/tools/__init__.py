"""Offline tools that work on a database beside the running gateway (issue 22 moves the
audit, export, import, purge and move here too): nothing on the request path imports them."""
