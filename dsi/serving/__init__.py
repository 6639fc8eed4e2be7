"""What every service shares to run: the gRPC server bootstrap, logging, metrics, the HTTP server."""
