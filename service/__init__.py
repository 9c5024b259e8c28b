"""mtserve serving side: bundle loading, onnxruntime engine, batcher, HTTP API. Never imports torch."""
