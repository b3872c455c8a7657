"""Networks: what a multi-exit network is (`base`), the registry of named ones (`registry`), which network and weights
a name or folder means (`ref`), weights I/O (`weights`), the model card beside them (`card`), exits attached to any
PyTorch model (`attach`) and what each part costs (`costs`)."""
from . import seed_branchynet, digits_convnet, resnet  # noqa: F401  (each registers its models, in this order)
from .base import MultiExitNetwork  # noqa: F401  (re-exported: the package's names)
from .card import CalibratedSetting, HeadReport, ModelCard  # noqa: F401
from .ref import ModelRef, create_model, load_model, load_network, model_key, reference  # noqa: F401
from .registry import MODELS, register_model  # noqa: F401
from .weights import (INDEX_SUFFIX, MAX_SHARD_BYTES, SHIPPED_WEIGHTS_DIR, calibrated_setting,  # noqa: F401
                      check_fits, check_state_fits, check_unchanged, load_weights, read_state_dict, save_sharded,
                      shipped_card, shipped_classes, shipped_models, shipped_weights, weight_files)
