"""The two graphs of an engine as PyTorch modules over a HuggingFace model: what `python -m
export` traces to ONNX and what the torch backend runs eagerly. Importing this package needs
torch; the rest of gmr_fast never imports it."""
