"""steerserve server: model loading, the batching engine and the HTTP service."""
