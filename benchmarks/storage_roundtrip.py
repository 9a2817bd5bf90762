"""Round-trip throughput of one large object through a storage backend and its local test server.

Upload: ``upload_multipart`` (parts in parallel).  Download: parallel ranged
``get`` calls into one preallocated buffer.  For S3 the same transfer by
boto3's own managed transfer (``upload_fileobj`` / ``download_fileobj``, same
part size and concurrency) runs as the in-run baseline, and the table shows
the ratio to it.  moto runs in a child process, so that the server does
not share the benchmark's GIL.

    python benchmarks/storage_roundtrip.py --backend s3 --size-mib 256
    python benchmarks/storage_roundtrip.py --backend gcs --size-mib 256 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cloudckpt.storage import Storage, upload_multipart

MiB = 1024 * 1024


def parallel_download(store: Storage, key: str, size: int, part: int, concurrency: int) -> bytearray:
    """Fetch ``key`` with ranged gets of ``part`` bytes, ``concurrency`` at a time, into one buffer."""
    out = bytearray(size)
    view = memoryview(out)

    def fetch(start: int) -> None:
        end = min(start + part, size)
        view[start:end] = store.get(key, range=(start, end))

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(fetch, range(0, size, part)))
    return out


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class MotoProcess:
    """tests/servers.MotoS3 started in a child process; the same client()/new_bucket()/stop() interface."""

    def __init__(self) -> None:
        parent, child = multiprocessing.Pipe()
        self._conn = parent
        self._process = multiprocessing.get_context("spawn").Process(target=_serve_moto, args=(child,), daemon=True)
        self._process.start()
        self.endpoint_url = parent.recv()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"bench-{os.urandom(8).hex()}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self._conn.send("stop")
        self._process.join(timeout=30)


def _serve_moto(conn) -> None:
    from servers import MotoS3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = MotoS3()
    conn.send(server.endpoint_url)
    conn.recv()
    server.stop()


def open_backend(backend: str, part: int):
    """Start the backend's test server; return (server, store)."""
    if backend == "s3":
        from servers import AWS_TEST_ENV

        from cloudckpt.storage.s3 import S3Storage

        for name, value in AWS_TEST_ENV.items():
            os.environ.setdefault(name, value)
        server = MotoProcess()
        return server, S3Storage(server.new_bucket(), "bench", endpoint_url=server.endpoint_url, part_size=part)
    try:
        from cloudckpt.storage.gcs import GCSStorage
    except ImportError as exc:
        raise SystemExit(f"--backend gcs needs cloudckpt.storage.gcs.GCSStorage, which is not available yet ({exc})")
    from gcs_helpers import drain_server_log
    from servers import FakeGCS

    server = FakeGCS()
    drain_server_log(server)  # else the server blocks once its unread log pipe fills
    return server, GCSStorage(server.new_bucket(), "bench", endpoint_url=server.endpoint_url)


def boto3_baseline(server, data: bytes, part: int, concurrency: int) -> tuple[float, float]:
    """Seconds for the same upload and download through boto3's managed transfer."""
    from boto3.s3.transfer import TransferConfig

    client = server.client()
    bucket = server.new_bucket()
    config = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=concurrency)
    up = timed(lambda: client.upload_fileobj(io.BytesIO(data), bucket, "baseline", Config=config))
    sink = io.BytesIO()
    down = timed(lambda: client.download_fileobj(bucket, "baseline", sink, Config=config))
    if sink.getvalue() != data:
        raise SystemExit("baseline download returned different bytes")
    client.close()
    return up, down


def round_trip(store: Storage, key: str, data: bytes, part: int, concurrency: int) -> tuple[float, float]:
    """Seconds to upload ``data`` as ``key`` and to download it again (checked)."""
    up = timed(lambda: upload_multipart(store, key, data, part_size=part, concurrency=concurrency))
    result: list[bytearray] = []
    down = timed(lambda: result.append(parallel_download(store, key, len(data), part, concurrency)))
    if result[0] != data:
        raise SystemExit(f"download of {key} returned different bytes")
    return up, down


def single_stream(store: Storage, key: str, data: bytes) -> tuple[float, float]:
    """Seconds for one ``put`` of ``data`` (GCS: a resumable upload) and one full ``get`` (checked)."""
    up = timed(lambda: store.put(key, data))
    result: list[bytes] = []
    down = timed(lambda: result.append(store.get(key)))
    if result[0] != data:
        raise SystemExit(f"get of {key} returned different bytes")
    return up, down


def run(args: argparse.Namespace) -> dict:
    size, part = args.size_mib * MiB, args.part_mib * MiB
    data = os.urandom(size)
    server, store = open_backend(args.backend, part)
    rows: dict[str, list[float]] = {"upload": [], "download": [], "baseline upload": [], "baseline download": [],
                                    "put (one stream)": [], "get (one stream)": []}
    try:
        for i in range(args.repeat):
            up, down = round_trip(store, f"roundtrip-{i}", data, part, args.concurrency)
            rows["upload"].append(up)
            rows["download"].append(down)
            if args.backend == "s3":
                up, down = boto3_baseline(server, data, part, args.concurrency)
                rows["baseline upload"].append(up)
                rows["baseline download"].append(down)
            if args.backend == "gcs":
                up, down = single_stream(store, f"single-{i}", data)
                rows["put (one stream)"].append(up)
                rows["get (one stream)"].append(down)
    finally:
        store.close()
        server.stop()
    return summarise(args, size, rows)


def summarise(args: argparse.Namespace, size: int, rows: dict[str, list[float]]) -> dict:
    results = {
        name: {"median_s": statistics.median(secs), "best_s": min(secs),
               "median_MBps": size / 1e6 / statistics.median(secs), "runs_s": secs}
        for name, secs in rows.items() if secs
    }
    for direction in ("upload", "download"):
        baseline = results.get(f"baseline {direction}")
        if baseline:
            results[direction]["vs_baseline"] = results[direction]["median_MBps"] / baseline["median_MBps"]
    return {"backend": args.backend, "size_mib": args.size_mib, "part_mib": args.part_mib,
            "concurrency": args.concurrency, "repeat": args.repeat, "cpus": os.cpu_count(),
            "results": results}


def print_table(report: dict) -> None:
    print(f"{report['backend']}: {report['size_mib']} MiB, parts of {report['part_mib']} MiB, "
          f"{report['concurrency']} threads, median of {report['repeat']} ({report['cpus']} CPUs)")
    print(f"{'':20} {'MB/s':>8} {'best s':>8} {'vs boto3':>9}")
    for name, row in report["results"].items():
        ratio = f"{row['vs_baseline']:.2f}x" if "vs_baseline" in row else ""
        print(f"{name:20} {row['median_MBps']:8.0f} {row['best_s']:8.2f} {ratio:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["s3", "gcs"], required=True)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--part-mib", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    report = run(args)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
