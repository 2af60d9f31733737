"""edgevits: exact, fast, deployable efficient vision transformers (SwiftFormer, EfficientFormer V1/V2,
EfficientViT-MSRA)."""
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .errors import (BackendUnavailable, CheckpointError, ConfigError, DataError, EdgevitsError, EdgevitsWarning,
                     ExportError, InputError, UnknownModelError)
from .fuse import fuse_model
from .measure.flops import count_macs, count_params
from .registry import create_model, get_entry, list_models
from .runtime import deploy, tune_malloc
from .runtime.export import export

from .version import __version__

__all__ = [
    "BackendUnavailable", "CheckpointError", "ConfigError", "DataError", "EdgevitsError", "EdgevitsWarning",
    "ExportError", "InputError", "UnknownModelError", "count_macs", "count_params", "create_model", "deploy",
    "export", "fuse_model", "get_entry", "list_models", "load_checkpoint", "read_checkpoint", "save_checkpoint",
    "tune_malloc", "__version__",
]
