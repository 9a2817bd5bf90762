"""S3 through moto and the latency proxy: every peer, the raw ceiling, and requests per save."""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch

import cloudckpt

from .compare import compare
from .contenders import Contender, s3_contenders
from .measure import Result, measure
from .s3env import S3Env
from .workload import MiB, Workload

log = logging.getLogger("bench")


class RawCeiling(Contender):
    """Plain parallel PUT / GET of equal pieces, a multiple of the connection count: what the link allows."""

    checks_restore = False

    def __init__(self, env: S3Env, connections: int, pieces_per_connection: int = 2) -> None:
        self.env = env
        self.connections = connections
        self.count = connections * pieces_per_connection
        self.name = f"ceiling: raw parallel PUT / GET, {self.count} equal pieces on {connections} connections"
        self.note = "no checksums, no hashing: bytes on the wire only"
        self._client = env.client(connections, checksums=False)
        self._bucket = env.new_bucket()
        self._pieces: list[memoryview] = []

    def prepare(self, work: Workload) -> None:
        raw = bytearray(work.nbytes)
        flat, offset = torch.frombuffer(raw, dtype=torch.uint8), 0
        for tensor in work.tensors():
            size = tensor.numel() * tensor.element_size()
            flat[offset:offset + size].copy_(tensor.detach().contiguous().view(-1).view(torch.uint8))
            offset += size
        piece = -(-len(raw) // self.count)
        view = memoryview(raw)
        self._pieces = [view[i * piece:(i + 1) * piece] for i in range(self.count)]

    def _parallel(self, fn) -> None:
        with ThreadPoolExecutor(self.connections) as pool:
            list(pool.map(fn, range(self.count)))

    def save(self, work: Workload, where: str) -> None:
        self._parallel(lambda i: self._client.put_object(Bucket=self._bucket, Key=f"{where}/{i}",
                                                         Body=bytes(self._pieces[i])))

    def restore(self, work: Workload, where: str) -> None:
        self._parallel(lambda i: self._client.get_object(Bucket=self._bucket, Key=f"{where}/{i}")["Body"].read())


def run_s3(bench, size_mib: float, *, honest_ranges: bool, contenders: set[str] | None = None) -> str:
    """One S3 setting: every contender and the ceiling, interleaved, on a fresh prefix each save."""
    label = "range-honest moto" if honest_ranges else "stock moto"
    work = Workload(size_mib, seed=1)
    setting = f"s3 {work.nbytes / MiB:.0f} MiB, {label}"
    with S3Env(honest_ranges=honest_ranges, link_mbps=bench.args.link_mbps) as env:
        bucket = env.new_bucket()
        ceiling = RawCeiling(env, bench.args.connections)
        ceiling.prepare(work)
        peers = [c for c in s3_contenders(env) if contenders is None or c.name in contenders]
        if size_mib > bench.args.fsspec_max_mib:
            peers = [c for c in peers if "s3fs" not in c.name]
            bench.skipped[f"{setting} / DCP FsspecWriter / Reader on s3fs"] = (
                f"left out above {bench.args.fsspec_max_mib} MiB (--fsspec-max-mib): its restore runs at ~9 MB/s")
        checked = compare(setting, peers, work, lambda c, i: f"s3://{bucket}/{_slug(c.name)}-{i}",
                          repeats=bench.args.repeats, server_pids=(env.server_pid,))
        bench.add(setting, *checked)
        bench.add(setting, _measure_ceiling(ceiling, work, setting, env, bench.args.repeats), {})
        bench.note(setting, f"link: {ceiling.connections} connections x {env.link_mbps:.0f} MB/s = "
                            f"{ceiling.connections * env.link_mbps:.0f} MB/s nominal cap; 10 ms one way")
    return setting


def _measure_ceiling(ceiling: RawCeiling, work: Workload, setting: str, env: S3Env, repeats: int) -> list[Result]:
    save = Result(setting, ceiling.name, "save", work.nbytes, note=ceiling.note)
    restore = Result(setting, ceiling.name, "restore", work.nbytes, note=ceiling.note)
    for i in range(repeats):
        save.samples.append(measure(lambda: ceiling.save(work, f"raw-{i}"), (env.server_pid,)))
        restore.samples.append(measure(lambda: ceiling.restore(work, f"raw-{i}"), (env.server_pid,)))
    return [save, restore]


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")[:40]


def find_s3_client(store):
    """The boto3 client under a (possibly wrapped) cloudckpt store."""
    while not hasattr(store, "_client") and hasattr(store, "inner"):
        store = store.inner
    return store._client


def run_requests(bench, size_mib: float, saves: int = 6, keep: int = 2) -> None:
    """Requests (by S3 operation) of each steady-state save with retention on (keep the last ``keep``)."""
    work = Workload(size_mib, seed=5)
    setting = "requests per save"
    with S3Env(link_mbps=bench.args.link_mbps) as env:
        bucket = env.new_bucket()
        mgr = cloudckpt.CheckpointManager(f"s3://{bucket}/run", capture_rng=False, retention=cloudckpt.KeepLastN(keep),
                                          storage_options={"endpoint_url": env.url})
        calls: Counter[str] = Counter()
        find_s3_client(mgr.store).meta.events.register(
            "before-call.s3", lambda model, **_: calls.update([model.name]))
        per_save = []
        for step in range(saves):
            calls.clear()
            mgr.save(work.state, step=step)
            work.step()
            per_save.append(dict(calls))
        mgr.close()
    steady = per_save[keep + 1:]
    for op in sorted({op for counts in steady for op in counts}):
        bench.figure(setting, f"{op} per steady-state save", "requests", [c.get(op, 0) for c in steady])
    bench.figure(setting, "all requests per steady-state save", "requests", [sum(c.values()) for c in steady])
    bench.note(setting, f"{work.nbytes / MiB:.0f} MiB state, KeepLastN({keep}), saves {keep + 2}..{saves} "
                        f"(each after a real optimizer step)")
