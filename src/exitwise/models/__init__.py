"""Networks: what a multi-exit network is (`base`), the registry of named ones (`registry`), their weights
(`weights`), exits attached to any PyTorch model (`attach`) and what each part costs (`costs`)."""
from . import seed_branchynet, digits_convnet, resnet  # noqa: F401  (each registers its models, in this order)
from .base import MultiExitNetwork
from .registry import MODELS, create_model, register_model
from .weights import (INDEX_SUFFIX, MAX_SHARD_BYTES, SHIPPED_WEIGHTS_DIR, check_fits, check_state_fits, check_unchanged,
                      load_weights, read_state_dict, save_sharded, shipped_card, shipped_models, shipped_weights,
                      weight_files)

__all__ = ["MODELS", "INDEX_SUFFIX", "MAX_SHARD_BYTES", "SHIPPED_WEIGHTS_DIR", "MultiExitNetwork", "check_fits",
           "check_state_fits", "check_unchanged", "create_model", "load_weights", "read_state_dict", "register_model",
           "save_sharded", "shipped_card", "shipped_models", "shipped_weights", "weight_files"]
