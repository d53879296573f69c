"""The KServe v2 / Triton gRPC protocol (``inference.GRPCInferenceService``): its .proto files and
the Python code grpcio-tools generates from them (committed; ``regenerate`` remakes it)."""
