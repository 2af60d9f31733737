"""edgevits: exact, fast, deployable efficient vision transformers (SwiftFormer, EfficientFormer V1/V2,
EfficientViT-MSRA)."""
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .checkpoint.preprocess import DataConfig, data_config, transforms
from .checkpoint.weights import get_weights, imagenet_classes, list_weights
from .errors import (BackendUnavailable, CheckpointError, ConfigError, DataError, EdgevitsError, EdgevitsWarning,
                     ExportError, InputError, UnknownModelError)
from .fuse import fuse_model
from .measure.flops import count_macs, count_params
from .registry import create_model, get_entry, list_models
from .runtime import deploy, tune_malloc
from .runtime.classify import Classifier, Prediction, Skipped, predict
from .runtime.export import export

from .version import __version__

__all__ = [
    "BackendUnavailable", "CheckpointError", "Classifier", "ConfigError", "DataConfig", "DataError",
    "EdgevitsError", "EdgevitsWarning", "ExportError", "InputError", "Prediction", "Skipped", "UnknownModelError",
    "count_macs", "count_params", "create_model", "data_config", "deploy", "export", "fuse_model", "get_entry",
    "get_weights", "imagenet_classes", "list_models", "list_weights", "load_checkpoint", "predict",
    "read_checkpoint", "save_checkpoint", "transforms", "tune_malloc", "__version__",
]
