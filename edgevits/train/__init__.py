"""Training and evaluation (the papers' DeiT recipe with distillation), resumable, on one process or many."""
from .config import TrainConfig
from .data import DataError
from .engine import TrainResult, evaluate, evaluate_checkpoint, read_metrics, train

__all__ = ["DataError", "TrainConfig", "TrainResult", "evaluate", "evaluate_checkpoint", "read_metrics", "train"]
