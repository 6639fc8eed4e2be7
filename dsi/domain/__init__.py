"""Domain types, errors, the abstract Target/Drafter interfaces and the decision math: no gRPC, no models."""
