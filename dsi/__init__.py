"""dsi: Distributed Speculative Inference served as asyncio gRPC microservices."""

__version__ = "0.1.0"
