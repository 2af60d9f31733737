"""edgevits: exact, fast, deployable efficient vision transformers (SwiftFormer, EfficientFormer V1/V2,
EfficientViT-MSRA)."""
from .allocator import tune_malloc
from .deploy import deploy
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .flops import count_macs, count_params
from .fuse import fuse_model
from .registry import create_model, get_entry, list_models

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "count_macs", "deploy", "count_params", "create_model", "fuse_model", "get_entry", "list_models",
    "load_checkpoint", "read_checkpoint", "save_checkpoint", "tune_malloc", "__version__",
]
