"""The engine's graphs as PyTorch modules: what ``python -m export`` traces to ONNX and what the
torch backend runs eagerly. They are written for this purpose (not HuggingFace's modules): their
parameters are laid out the way the graphs consume them (``x @ weight`` with ``weight`` of shape
[in, out], fused projections), so an export can trace them with placeholder weights and stream
the real tensors from the checkpoint into the engine. Parity with HuggingFace's modules is
tested. Importing this package needs torch; the rest of the runtime never imports it."""
