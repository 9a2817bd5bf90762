"""cloudckpt: checkpoint PyTorch training to S3, GCS or a local directory, and resume anywhere."""

from .errors import (
    AlreadyExists,
    CheckpointExists,
    CloudCkptError,
    CorruptCheckpoint,
    FormatVersionError,
    InvalidKey,
    NotFound,
    PartialRestore,
    PermissionDenied,
    PreconditionFailed,
    TimelineSuperseded,
    TransientError,
)
from .storage import IfMatch, MemoryStorage, RetryPolicy, Storage, open_storage

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists", "CheckpointExists", "CloudCkptError", "CorruptCheckpoint", "FormatVersionError", "IfMatch",
    "InvalidKey", "MemoryStorage", "NotFound", "PartialRestore", "PermissionDenied", "PreconditionFailed",
    "RetryPolicy", "Storage", "TimelineSuperseded", "TransientError", "open_storage", "__version__",
]

from .callback import Callback, CheckpointCallback  # noqa: E402
from .manager import CheckpointInfo, CheckpointManager  # noqa: E402
from .retention import (  # noqa: E402
    KeepAll,
    KeepBestAndLatest,
    KeepBestK,
    KeepEvery,
    KeepLastN,
    KeepSuperseded,
    RetentionPolicy,
)
from .state import ResumableSampler, RNGState  # noqa: E402
from .sweeper import SweepConfig, SweepReport  # noqa: E402
from .trainer import Trainer  # noqa: E402
from .transfer import TransferConfig  # noqa: E402

__all__ += [
    "Callback", "CheckpointCallback", "CheckpointInfo", "CheckpointManager", "KeepAll",
    "KeepBestAndLatest", "KeepBestK", "KeepEvery", "KeepLastN", "KeepSuperseded", "RNGState", "ResumableSampler",
    "RetentionPolicy", "SweepConfig", "SweepReport", "Trainer", "TransferConfig",
]
