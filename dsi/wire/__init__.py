"""The wire: protobuf <-> domain conversion, the one error -> status mapping, gRPC clients."""
