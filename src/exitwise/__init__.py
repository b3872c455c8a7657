"""exitwise: early-exit inference with multi-exit neural networks."""
__version__ = "0.1.0"
