"""The HTTP layer: FastAPI routes and the protocol models at the edge."""
