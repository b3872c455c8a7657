"""Deployment: the ONNX runner, predict, serving and tiers. Never imports torch."""
