"""Training and evaluation (the papers' DeiT recipe with distillation), resumable, on one process or many."""
from ..errors import DataError
from .config import TrainConfig
from .engine import TrainResult, train
from .evaluate import evaluate, evaluate_checkpoint
from .files import read_metrics

__all__ = ["DataError", "TrainConfig", "TrainResult", "evaluate", "evaluate_checkpoint", "read_metrics", "train"]
