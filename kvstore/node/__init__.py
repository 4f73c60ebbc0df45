"""The node: the gRPC service over a store, its server, auth, namespaces and metrics."""
