"""cloudckpt benchmarks: every figure is a ratio against a baseline measured in the same run.

    python benchmarks/run.py                       # ~1 GiB state, every case
    python benchmarks/run.py --size-mib 64 --cases blocking,local --repeats 2

Cases (``--cases``, comma-separated):
  blocking     time a save blocks training: cloudckpt async / sync, torch.save, DCP async_save,
               and the floor (a copy of the same tensors into a pre-touched buffer)
  local        save and restore throughput on local disk vs torch.save / torch.load (both fsync)
  s3           save and restore through moto's S3 behind a latency proxy (20 ms RTT, 25 MB/s per
               connection) vs torch.save + one put_object, boto3 upload_fileobj, and raw parallel
               PUT/GET of the same bytes (the ceiling)
  incremental  bytes uploaded by a second save after 10 % of the parameters changed
  training     slowdown of a real training loop checkpointing every K steps (async, sync)
  memory       peak extra resident memory during an async save, relative to the state size

Prints a table, writes JSON (and a PNG plot when matplotlib is installed) to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import cloudckpt  # noqa: E402
from cloudckpt.format.dtypes import tensor_bytes  # noqa: E402
from cloudckpt.snapshot import HostBufferPool  # noqa: E402

MiB = 1024 * 1024


# -- the workload ---------------------------------------------------------------------
class TinyGPT(nn.Module):
    """A transformer-shaped model: embedding, pre-norm blocks, tied head."""

    def __init__(self, vocab: int, dim: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, max(1, dim // 64), 4 * dim, dropout=0.1, batch_first=True,
                                       norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


def build_state(size_mib: int, seed: int = 0) -> tuple[TinyGPT, torch.optim.Optimizer, int]:
    """A model + AdamW state of about ``size_mib`` MiB (params + two moments, fp32)."""
    torch.manual_seed(seed)
    params_wanted = size_mib * MiB / 12
    dim = 1024 if size_mib >= 512 else 512 if size_mib >= 64 else 256
    vocab = 8192
    per_layer = 12 * dim * dim
    layers = max(1, round((params_wanted - vocab * dim) / per_layer))
    model = TinyGPT(vocab, dim, layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(model, optimizer))
    return model, optimizer, nbytes


def _tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    found = list(model.state_dict().values())
    for state in optimizer.state.values():
        found += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return found


def changed_params(model: nn.Module, fraction: float) -> list[nn.Parameter]:
    """Parameters (largest first) that add up to at most ``fraction`` of all parameters."""
    params = list(model.parameters())
    budget = fraction * sum(p.numel() for p in params)
    chosen = []
    for p in sorted(params, key=lambda p: p.numel(), reverse=True):
        if p.numel() <= budget:
            chosen.append(p)
            budget -= p.numel()
    return chosen


def perturb(model: nn.Module, fraction: float = 1.0) -> None:
    """Change ``fraction`` of the parameters (by count), as a training step would."""
    with torch.no_grad():
        for p in changed_params(model, fraction):
            p.add_(1e-3)


# -- measuring --------------------------------------------------------------------------
@dataclass
class Result:
    case: str
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def row(self) -> dict[str, Any]:
        return {"case": self.case, "name": self.name, "unit": self.unit, "min": min(self.samples),
                "median": self.median, "max": max(self.samples), "samples": self.samples}


@dataclass
class Target:
    case: str
    label: str
    value: float
    goal: str
    met: bool


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save_fsync(obj: Any, path: str) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: list[Result] = []
        self.targets: list[Target] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="cloudckpt-bench-", dir=args.tmp))

    def add(self, case: str, name: str, unit: str, samples: list[float]) -> Result:
        result = Result(case, name, unit, samples)
        self.results.append(result)
        return result

    def target(self, case: str, label: str, value: float, goal: str, met: bool) -> None:
        self.targets.append(Target(case, label, value, goal, met))

    def fresh_dir(self, name: str) -> Path:
        path = self.workdir / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    # -- cases --------------------------------------------------------------------------
    def blocking(self) -> None:
        model, optimizer, nbytes = build_state(self.args.size_mib)
        state = {"model": model, "optimizer": optimizer}
        reps = self.args.repeats
        tensors = _tensors(model, optimizer)
        pool = HostBufferPool()
        pool.snapshot(tensors)
        floor = self.add("blocking", "floor: copy into pre-touched buffer", "s",
                         [timed(lambda: pool.snapshot(tensors)) for _ in range(reps)])

        mgr = cloudckpt.CheckpointManager(self.fresh_dir("async"), async_save=True, capture_rng=False)
        mgr.save(state, step=0)
        mgr.wait()
        samples = []
        for i in range(1, reps + 1):
            perturb(model)
            samples.append(timed(lambda: mgr.save(state, step=i)))
            mgr.wait()
        mgr.close()
        async_ = self.add("blocking", "cloudckpt async save", "s", samples)

        mgr = cloudckpt.CheckpointManager(self.fresh_dir("sync"), capture_rng=False)
        samples = []
        for i in range(reps):
            perturb(model)
            samples.append(timed(lambda: mgr.save(state, step=i)))
        mgr.close()
        self.add("blocking", "cloudckpt sync save (local, fsync)", "s", samples)

        path = str(self.fresh_dir("torch.pt"))
        samples = [timed(lambda: torch_save_fsync({"model": model.state_dict(),
                                                   "optimizer": optimizer.state_dict()}, path))
                   for _ in range(reps)]
        self.add("blocking", "torch.save (fsync)", "s", samples)

        dcp = self._dcp_async_blocking(model, optimizer, reps)
        ratio = async_.median / floor.median
        self.target("blocking", "async blocking / floor copy", ratio, "<= 1.5", ratio <= 1.5)
        if dcp is not None:
            ratio = async_.median / dcp.median
            self.target("blocking", "async blocking / DCP async_save blocking", ratio, "<= 0.5", ratio <= 0.5)
        self._note_size("blocking", nbytes)

    def _dcp_async_blocking(self, model: nn.Module, optimizer: torch.optim.Optimizer, reps: int) -> Result | None:
        try:
            import torch.distributed as dist
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            if not dist.is_initialized():
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
                dist.init_process_group("gloo", rank=0, world_size=1)
            samples = []
            for i in range(reps + 1):
                model_sd, optim_sd = get_state_dict(model, optimizer)
                target = str(self.fresh_dir(f"dcp-{i}"))
                start = time.perf_counter()
                future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=target)
                blocked = time.perf_counter() - start
                future.result()
                if i:  # the first call sets up DCP's staging and process pools
                    samples.append(blocked)
            return self.add("blocking", "DCP async_save", "s", samples)
        except Exception as exc:  # report, never hide: the table says DCP could not run
            logging.warning("DCP async_save baseline failed: %s", exc)
            return None

    def local(self) -> None:
        model, optimizer, nbytes = build_state(self.args.size_mib)
        state = {"model": model, "optimizer": optimizer}
        reps = self.args.repeats
        gb = nbytes / 1e9
        mgr = cloudckpt.CheckpointManager(self.fresh_dir("local"), capture_rng=False)
        save, restore = [], []
        for i in range(reps):
            perturb(model)
            save.append(gb / timed(lambda: mgr.save(state, step=i)))
            restore.append(gb / timed(lambda: mgr.restore(state)))
        mgr.close()
        ours_save = self.add("local", "cloudckpt save", "GB/s", save)
        ours_restore = self.add("local", "cloudckpt restore (in place)", "GB/s", restore)
        path = str(self.fresh_dir("torch.pt"))
        save, restore = [], []

        def torch_restore() -> None:
            loaded = torch.load(path, weights_only=True)
            model.load_state_dict(loaded["model"])
            optimizer.load_state_dict(loaded["optimizer"])

        for _ in range(reps):
            save.append(gb / timed(lambda: torch_save_fsync(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)))
            restore.append(gb / timed(torch_restore))
        base_save = self.add("local", "torch.save (fsync)", "GB/s", save)
        base_restore = self.add("local", "torch.load + load_state_dict", "GB/s", restore)
        for label, ours, base, goal in (("save", ours_save, base_save, 1.0), ("restore", ours_restore, base_restore, 1.5)):
            ratio = ours.median / base.median
            self.target("local", f"local {label} / torch", ratio, f">= {goal}", ratio >= goal)
        self._note_size("local", nbytes)

    def s3(self) -> None:
        from latency_proxy import LatencyProxy
        from storage_roundtrip import MotoProcess

        from servers import AWS_TEST_ENV

        for name, value in AWS_TEST_ENV.items():
            os.environ.setdefault(name, value)
        model, optimizer, nbytes = build_state(self.args.s3_size_mib, seed=1)
        state = {"model": model, "optimizer": optimizer}
        reps, gb, conc = self.args.repeats, nbytes / 1e9, self.args.concurrency
        server = MotoProcess()
        host, port = server.endpoint_url.rsplit("/", 1)[-1].split(":")
        proxy = LatencyProxy((host, int(port)), one_way_delay=0.010, bandwidth=self.args.link_mbps * 1e6).start()
        try:
            import boto3
            from botocore.config import Config

            client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1",
                                  config=Config(max_pool_connections=64))
            bucket = server.new_bucket()
            rows = {key: [] for key in ("naive save", "naive restore", "boto3 save", "boto3 restore",
                                        "ceiling save", "ceiling restore", "cloudckpt save", "cloudckpt restore")}
            transfer = cloudckpt.TransferConfig(concurrency=conc, chunk_size=64 * MiB, range_size=16 * MiB,
                                                multipart_threshold=16 * MiB, part_size=16 * MiB)
            for i in range(reps):
                perturb(model)
                blob = io.BytesIO()
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, blob)
                payload = blob.getvalue()
                rows["naive save"].append(gb / timed(lambda: client.put_object(Bucket=bucket, Key="naive.pt",
                                                                               Body=payload)))
                rows["naive restore"].append(gb / timed(lambda: self._torch_restore(
                    client.get_object(Bucket=bucket, Key="naive.pt")["Body"].read(), model, optimizer)))
                rows["boto3 save"].append(gb / timed(lambda: client.upload_fileobj(
                    io.BytesIO(payload), bucket, "boto3.pt")))
                rows["boto3 restore"].append(gb / timed(lambda: self._boto3_restore(client, bucket, model, optimizer)))
                pieces = self._raw_pieces(model, optimizer)
                rows["ceiling save"].append(gb / timed(lambda: self._parallel(
                    lambda kv: client.put_object(Bucket=bucket, Key=f"raw/{kv[0]}", Body=kv[1]), pieces, conc)))
                rows["ceiling restore"].append(gb / timed(lambda: self._parallel(
                    lambda kv: client.get_object(Bucket=bucket, Key=f"raw/{kv[0]}")["Body"].read(), pieces, conc)))
                mgr = cloudckpt.CheckpointManager(f"s3://{bucket}/ckpt-{i}", capture_rng=False, transfer=transfer,
                                                  storage_options={"endpoint_url": proxy.url})
                rows["cloudckpt save"].append(gb / timed(lambda: mgr.save(state, step=i)))
                rows["cloudckpt restore"].append(gb / timed(lambda: mgr.restore(state)))
                mgr.close()
            results = {key: self.add("s3", key, "GB/s", samples) for key, samples in rows.items()}
            for op in ("save", "restore"):
                ours = results[f"cloudckpt {op}"].median
                for base, goal in (("naive", 3.0), ("ceiling", 0.8)):
                    ratio = ours / results[f"{base} {op}"].median
                    self.target("s3", f"S3 {op} / {base}", ratio, f">= {goal}", ratio >= goal)
        finally:
            proxy.stop()
            server.stop()
        self._note_size("s3", nbytes)

    @staticmethod
    def _torch_restore(payload: bytes, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        loaded = torch.load(io.BytesIO(payload), weights_only=True)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])

    def _boto3_restore(self, client, bucket: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        sink = io.BytesIO()
        client.download_fileobj(bucket, "boto3.pt", sink)
        self._torch_restore(sink.getvalue(), model, optimizer)

    @staticmethod
    def _raw_pieces(model: nn.Module, optimizer: torch.optim.Optimizer, piece: int = 16 * MiB) -> list[tuple[int, bytes]]:
        raw = b"".join(bytes(tensor_bytes(t.detach())) for t in _tensors(model, optimizer))
        return [(i, raw[o:o + piece]) for i, o in enumerate(range(0, len(raw), piece))]

    @staticmethod
    def _parallel(fn: Callable[[Any], Any], items: list[Any], concurrency: int) -> None:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(fn, items))

    def incremental(self) -> None:
        model, optimizer, nbytes = build_state(self.args.size_mib, seed=2)
        state = {"model": model, "optimizer": optimizer}
        samples = []
        for i in range(self.args.repeats):
            mgr = cloudckpt.CheckpointManager(self.fresh_dir(f"incr-{i}"), capture_rng=False)
            first = mgr.save(state, step=0).stats
            perturb(model, fraction=0.10)
            self._perturb_optimizer(model, optimizer, 0.10)
            second = mgr.save(state, step=1).stats
            mgr.close()
            samples.append(second.bytes_uploaded / first.bytes_uploaded)
        result = self.add("incremental", "bytes uploaded by 2nd save / 1st (10 % changed)", "ratio", samples)
        self.target("incremental", "2nd save bytes / 1st", result.median, "<= 0.15", result.median <= 0.15)
        self._note_size("incremental", nbytes)

    @staticmethod
    def _perturb_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, fraction: float) -> None:
        with torch.no_grad():
            for p in changed_params(model, fraction):
                for value in optimizer.state[p].values():
                    if isinstance(value, torch.Tensor) and value.dim():
                        value.add_(1e-6)

    def training(self) -> None:
        size = min(self.args.size_mib, self.args.train_size_mib)
        model, optimizer, nbytes = build_state(size, seed=3)
        tokens = torch.randint(0, model.embed.num_embeddings, (8, 64))
        every, steps = self.args.train_every, self.args.train_steps

        def run(mgr: cloudckpt.CheckpointManager | None) -> float:
            torch.manual_seed(0)
            start = time.perf_counter()
            for step in range(1, steps + 1):
                loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if mgr is not None and step % every == 0:
                    mgr.save({"model": model, "optimizer": optimizer}, step=step)
            if mgr is not None:
                mgr.wait()
            return time.perf_counter() - start

        run(None)  # warm up kernels and allocator
        rows: dict[str, list[float]] = {"no checkpoints": [], "async every K": [], "sync every K": []}
        for i in range(self.args.repeats):
            rows["no checkpoints"].append(run(None))
            for label, is_async in (("async every K", True), ("sync every K", False)):
                mgr = cloudckpt.CheckpointManager(self.fresh_dir(f"train-{label}-{i}"), async_save=is_async,
                                                  retention=cloudckpt.KeepLastN(2))
                rows[label].append(run(mgr))
                mgr.close()
        results = {k: self.add("training", f"{steps} steps, {k} (K={every})", "s", v) for k, v in rows.items()}
        for label in ("async every K", "sync every K"):
            slowdown = results[label].median / results["no checkpoints"].median - 1
            goal = 0.05 if label.startswith("async") else None
            self.target("training", f"slowdown, {label}", slowdown, "<= 0.05" if goal else "(reported)",
                        goal is None or slowdown <= goal)
        self._note_size("training", nbytes)

    def memory(self) -> None:
        model, optimizer, nbytes = build_state(self.args.size_mib, seed=4)
        state = {"model": model, "optimizer": optimizer}
        mgr = cloudckpt.CheckpointManager(self.fresh_dir("memory"), async_save=True, capture_rng=False)
        before = _rss()
        _reset_peak_rss()
        mgr.save(state, step=0)
        mgr.wait()
        perturb(model)
        mgr.save(state, step=1)
        mgr.wait()
        peak = _peak_rss()
        mgr.close()
        ratio = (peak - before) / nbytes
        self.add("memory", "peak extra RSS during async saves / state size", "ratio", [ratio])
        self.target("memory", "peak extra memory / state", ratio, "<= 1.2", ratio <= 1.2)
        self._note_size("memory", nbytes)

    def _note_size(self, case: str, nbytes: int) -> None:
        logging.info("%s: state of %.0f MiB", case, nbytes / MiB)


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _rss() -> int:
    return _status_kib("VmRSS")


def _peak_rss() -> int:
    return _status_kib("VmHWM")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(), "threads": torch.get_num_threads(),
            "cloudckpt": cloudckpt.__version__}


def print_table(bench: Bench) -> None:
    print(f"\n{'case':12} {'measurement':58} {'unit':6} {'min':>9} {'median':>9} {'max':>9}")
    for r in bench.results:
        print(f"{r.case:12} {r.name:58} {r.unit:6} {min(r.samples):9.3f} {r.median:9.3f} {max(r.samples):9.3f}")
    print(f"\n{'target':50} {'value':>8}  {'goal':10} met")
    for t in bench.targets:
        print(f"{t.label:50} {t.value:8.3f}  {t.goal:10} {'yes' if t.met else 'NO'}")


def plot(bench: Bench, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib not installed (pip install 'cloudckpt[bench]'); no plot written")
        return
    cases = sorted({r.case for r in bench.results})
    fig, axes = plt.subplots(len(cases), 1, figsize=(10, 2.6 * len(cases)), squeeze=False)
    for ax, case in zip(axes[:, 0], cases):
        rows = [r for r in bench.results if r.case == case]
        ax.barh([r.name for r in rows], [r.median for r in rows],
                xerr=[[r.median - min(r.samples) for r in rows], [max(r.samples) - r.median for r in rows]])
        ax.set_title(f"{case} ({rows[0].unit}; median, min-max)")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="cloudckpt benchmarks (ratios against in-run baselines)")
    parser.add_argument("--size-mib", type=int, default=1024, help="state size (params + AdamW) for most cases")
    parser.add_argument("--s3-size-mib", type=int, default=256, help="state size for the S3 case")
    parser.add_argument("--train-size-mib", type=int, default=128, help="state size for the training case")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--train-every", type=int, default=10, help="checkpoint every K steps")
    parser.add_argument("--cases", default="blocking,local,s3,incremental,training,memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16, help="connections for S3 transfers")
    parser.add_argument("--link-mbps", type=float, default=25.0, help="per-connection cap in MB/s")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tmp", default=None, help="directory for checkpoints written by the run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("cloudckpt", "botocore", "urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    bench = Bench(args)
    try:
        for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
            if not hasattr(bench, case) or case.startswith("_"):
                parser.error(f"unknown case {case!r}")
            logging.info("running %s ...", case)
            getattr(bench, case)()
    finally:
        shutil.rmtree(bench.workdir, ignore_errors=True)
    print_table(bench)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
              "results": [r.row() for r in bench.results],
              "targets": [vars(t) for t in bench.targets]}
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    plot(bench, args.out / "results.png")
    print(f"\nwrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
