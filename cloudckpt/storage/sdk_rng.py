"""Keep the cloud SDKs off Python's global random generator.

google-cloud-storage draws the boundary of every multipart upload, and google-api-core the
jitter of every retry, from the module-level functions of :mod:`random`.  A checkpoint saved
to GCS would then move the training's own random stream: an uninterrupted run and a run
resumed from that checkpoint (whose RNG state was captured before the upload) would draw
different numbers afterwards, breaking exact resume.  Each of those modules gets a private
generator instead.
"""

from __future__ import annotations

import importlib
import random

#: Modules that call ``random.<function>`` and only need unpredictable, not reproducible, numbers.
_SDK_MODULES = (
    "google.cloud.storage._media._upload",
    "google.resumable_media._upload",
    "google.api_core.retry.retry_base",
)


def isolate_sdk_random() -> None:
    """Give every SDK module above that is installed a private :class:`random.Random`."""
    for name in _SDK_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "random", None) is random:
            module.random = random.Random()  # type: ignore[attr-defined]
