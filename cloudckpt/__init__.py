"""cloudckpt: checkpoint PyTorch training to S3, GCS or a local directory, and resume anywhere."""

from .errors import (
    AlreadyExists,
    CloudCkptError,
    CorruptCheckpoint,
    FormatVersionError,
    InvalidKey,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    TransientError,
)
from .storage import IfMatch, MemoryStorage, RetryPolicy, Storage, open_storage

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists", "CloudCkptError", "CorruptCheckpoint", "FormatVersionError", "IfMatch",
    "InvalidKey", "MemoryStorage", "NotFound", "PermissionDenied", "PreconditionFailed",
    "RetryPolicy", "Storage", "TransientError", "open_storage", "__version__",
]

from .manager import CheckpointInfo, CheckpointManager  # noqa: E402
from .state import ResumableSampler, RNGState  # noqa: E402
from .transfer import TransferConfig  # noqa: E402

__all__ += ["CheckpointInfo", "CheckpointManager", "RNGState", "ResumableSampler", "TransferConfig"]
