"""Optional zstd compression of chunks (``TransferConfig(compression="zstd")``).

Off by default: on fp32 weights zstd-1 saves little (about 8 %) and costs
more time than it saves on fast links; it pays on bf16 states or slow links.
Decompression is bounded by the size the manifest declares, so a hostile
chunk cannot expand without limit.
"""

from __future__ import annotations

import os

from ..errors import CorruptCheckpoint

_HINT = "zstd compression needs the zstandard package: pip install 'cloudckpt[zstd]' (or zstandard)"


def _zstd():
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_HINT) from exc
    return zstandard


def compress(data: memoryview, level: int) -> bytes:
    """zstd-compress ``data`` at ``level`` on all cores."""
    zstd = _zstd()
    threads = -1 if len(data) >= 4 << 20 and (os.cpu_count() or 1) > 1 else 0
    return zstd.ZstdCompressor(level=level, threads=threads, write_content_size=True).compress(data)


def decompress(data: bytes | memoryview, raw_size: int, where: str) -> bytes:
    """Decompress a chunk that must expand to exactly ``raw_size`` bytes."""
    zstd = _zstd()
    try:
        out = zstd.ZstdDecompressor().decompress(data, max_output_size=raw_size)
    except zstd.ZstdError as exc:
        raise CorruptCheckpoint(f"{where}: chunk does not decompress ({exc})") from exc
    if len(out) != raw_size:
        raise CorruptCheckpoint(f"{where}: chunk decompresses to {len(out)} bytes, expected {raw_size}")
    return out


def decompress_into(data: bytes | memoryview, out: memoryview, where: str) -> None:
    """Decompress a chunk into ``out``, which it must fill exactly (no intermediate copy)."""
    zstd = _zstd()
    filled = 0
    try:
        with zstd.ZstdDecompressor().stream_reader(data, read_across_frames=False) as reader:
            while filled < len(out):
                got = reader.readinto(out[filled:])
                if not got:
                    break
                filled += got
            extra = reader.read(1)
    except zstd.ZstdError as exc:
        raise CorruptCheckpoint(f"{where}: chunk does not decompress ({exc})") from exc
    if filled != len(out) or extra:
        raise CorruptCheckpoint(f"{where}: chunk decompresses to {'more than ' if extra else ''}{filled} bytes, "
                                f"expected {len(out)}")
