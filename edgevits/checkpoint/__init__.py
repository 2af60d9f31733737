"""Checkpoints: reading any known source safely, recognising and converting its keys (``convert/``), checking and
loading into a model, and writing edgevits' own files atomically. Nothing here unpickles arbitrary objects."""
from ..errors import CheckpointError
from .convert import StateDict, detect_source, sources_for
from .io import META_KEY, atomic_write, checkpoint_path, read_file, save_checkpoint, torch_load_safely
from .load import config_hints, convert_state_dict, load_checkpoint, read_checkpoint

__all__ = ["META_KEY", "CheckpointError", "StateDict", "atomic_write", "config_hints", "convert_state_dict",
           "checkpoint_path", "detect_source", "load_checkpoint", "read_checkpoint", "read_file", "save_checkpoint",
           "sources_for", "torch_load_safely"]
