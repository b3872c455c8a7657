"""exitwise: early-exit inference with multi-exit neural networks.

`exitwise.attach(model, exits, num_classes, input_shape)` and `exitwise.train_exits(network, splits, out)` put exits
on any PyTorch model (see `exitwise.models.attach`); imported on first use, so `import exitwise` stays light."""
from .config import __version__  # noqa: F401


def __getattr__(name: str):
    if name == "attach":
        from .models.attach import attach
        return attach
    if name == "train_exits":
        from .api import train_exits
        return train_exits
    raise AttributeError(f"module 'exitwise' has no attribute {name!r}")
