"""What the Launcher, Watcher and Reconciler share: the generated shepherd.v1 API, pod metadata
conventions, request validation, settings, logging, the gRPC server bootstrap, the Kubernetes
adapter, and durable, cursor-addressed event logs."""
