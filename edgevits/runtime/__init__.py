"""Running a model: the backends (eager, channels-last, ``torch.compile``, ONNX Runtime, OpenVINO, ExecuTorch,
LiteRT), export with a parity check (Core ML: op and feature checks), the one timer and the one parity check, the
allocator setting, and the choice behind ``deploy()``."""
from .allocator import reuse_freed_memory, tune_malloc
from .backends import BACKENDS, GRAPH_BACKENDS, make_runner
from .choose import Deployed, deploy
from .export import FORMATS, GRAPH_FORMS, export_onnx, export_openvino
from .mobile import export_coreml, export_executorch, export_litert
from .parity import check_parity, rel_err
from .timing import describe_error, time_interleaved

__all__ = ["BACKENDS", "FORMATS", "GRAPH_BACKENDS", "GRAPH_FORMS", "Deployed", "check_parity", "deploy",
           "describe_error", "export_coreml", "export_executorch", "export_litert", "export_onnx",
           "export_openvino", "make_runner", "rel_err", "reuse_freed_memory", "time_interleaved", "tune_malloc"]
