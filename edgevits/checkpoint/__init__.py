"""Checkpoints: reading any known source safely, recognising and converting its keys (``convert/``), checking and
loading into a model, and writing edgevits' own files atomically. Nothing here unpickles arbitrary objects."""
from ..errors import CheckpointError
from .convert import StateDict, detect_source, sources_for
from .io import META_KEY, atomic_write, read_file, save_checkpoint
from .load import config_hints, convert_state_dict, load_checkpoint, read_checkpoint

__all__ = ["META_KEY", "CheckpointError", "StateDict", "atomic_write", "config_hints", "convert_state_dict",
           "detect_source", "load_checkpoint", "read_checkpoint", "read_file", "save_checkpoint", "sources_for"]
