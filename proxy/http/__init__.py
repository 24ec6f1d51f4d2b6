"""The HTTP layer: app assembly, middlewares, the data and admin endpoints, Neon's protocol, streaming, workers."""
