"""Spot / preemptible training: SIGTERM -> checkpoint -> exit 75 -> resume bit-exactly in a new process.

    python examples/spot_training.py                  # the whole story, checkpoints under ckpts/spot
    python examples/spot_training.py --s3             # the same against an in-process S3 server (moto;
                                                      # pip install 'cloudckpt[examples]')
    python examples/spot_training.py --worker [--root ROOT] [--preempt-at STEP]   # one training process

The story runs this script's ``--worker`` mode as subprocesses:

(a) an uninterrupted reference run (its own root, ``ckpts/spot-reference``);
(b) a run that sends itself SIGTERM at a step: the next step boundary waits for any upload in
    flight, saves a checkpoint marked ``preemption`` and exits with status 75 (EX_TEMPFAIL);
(c) a new process that resumes from that checkpoint and finishes.

Then it checks that the final weights and optimizer state of (c) equal those of (a), bit for bit.

``--worker`` is what a Kubernetes Job runs (see examples/kubernetes/): the checkpoint root comes
from ``--root`` or the ``CLOUDCKPT_ROOT`` environment variable, a restarted pod resumes from the
newest checkpoint, and exit status 75 means "preempted, checkpoint saved, run me again".
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cloudckpt
from cloudckpt.preemption import EXIT_PREEMPTED, Preempted, PreemptionWatcher

#: The environment variable ``--worker`` reads the checkpoint root from (when ``--root`` is absent).
ROOT_ENV = "CLOUDCKPT_ROOT"
DEFAULT_ROOT = "ckpts/spot"
FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}
#: Where the signal is sent relative to the checkpoint callback (tests use every one of them).
PHASES = ("after-save", "before-save", "mid-step", "epoch-end")


# -- the training job ---------------------------------------------------------------------
def make_data(n_train: int, n_val: int = 256, dim: int = 32, classes: int = 4) -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(n_train + n_val, dim, generator=generator)
    teacher = torch.randn(dim, classes, generator=generator)
    y = (x @ teacher + 0.5 * torch.randn(n_train + n_val, classes, generator=generator)).argmax(dim=1)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def make_model(dim: int = 32, hidden: int = 64, classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.2),
                         nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(0.2), nn.Linear(hidden, classes))


def cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets)


class SelfPreempt(cloudckpt.Callback):
    """Sends this process SIGTERM once, at step ``at`` — the way a spot reclaim or pod eviction arrives.

    ``phase`` says where in the step: ``after-save`` (after the checkpoint callback's hook, so a
    periodic save of that step is still uploading), ``before-save`` (before it), ``mid-step``
    (during the forward pass of step ``at``), ``epoch-end`` (after the epoch-end save of the epoch
    that ends at step ``at``).
    """

    def __init__(self, at: int, phase: str = "after-save") -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.at = at
        self.phase = phase
        self.signal_time: float | None = None
        self.signal_step: int | None = None
        self.saving_at_signal: bool | None = None
        self.callback: cloudckpt.CheckpointCallback | None = None

    def fire(self, trainer: Any, step: int) -> None:
        if self.signal_time is not None or step != self.at:
            return
        manager = self.callback.manager if self.callback is not None else None
        self.saving_at_signal = bool(manager is not None and manager.saving)
        self.signal_step = step
        self.signal_time = time.time()
        os.kill(os.getpid(), signal.SIGTERM)

    def on_step_end(self, trainer: Any, step: int, logs: Mapping[str, float]) -> None:
        if self.phase in ("after-save", "before-save"):
            self.fire(trainer, step)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: Mapping[str, float]) -> None:
        if self.phase == "epoch-end":
            self.fire(trainer, trainer.global_step)

    def wrap_loss(self, trainer_ref: Callable[[], Any], loss_fn: Callable[..., torch.Tensor]):
        def loss(model: nn.Module, batch: Any) -> torch.Tensor:
            value = loss_fn(model, batch)
            if self.phase == "mid-step" and model.training:
                self.fire(trainer_ref(), trainer_ref().global_step + 1)
            return value
        return loss


def state_digest(trainer: cloudckpt.Trainer, *, weights_only: bool = False) -> str:
    """SHA-256 of the parameters (``weights_only``) or of the whole training state.

    The whole state is the model, optimizer (moments, step counts, param groups), scheduler,
    sampler position, loop progress and torch's RNG state: equal digests mean a resumed run is
    indistinguishable from an uninterrupted one.
    """
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                digest.update(f"<{key}>".encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(json.dumps(value, default=repr).encode())

    if weights_only:
        feed({name: p for name, p in trainer.model.named_parameters()})
    else:
        feed(trainer.state_dict())
        feed(torch.get_rng_state())
    return digest.hexdigest()


class Trace(cloudckpt.Callback):
    """Records the digest of the whole state after every step (``--trace``), to find a first divergence."""

    def __init__(self) -> None:
        self.digests: dict[int, str] = {}

    def on_step_end(self, trainer: Any, step: int, logs: Mapping[str, float]) -> None:
        self.digests[step] = state_digest(trainer)


def run_worker(
    root: str,
    *,
    steps: int = 200,
    save_every: int = 25,
    batch_size: int = 32,
    n_train: int = 1024,
    preempt_at: int | None = None,
    phase: str = "after-save",
    result_path: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    wrap_store: Callable[[cloudckpt.Storage], cloudckpt.Storage] | None = None,
    watcher: PreemptionWatcher | bool = True,
    extra_callbacks: tuple[cloudckpt.Callback, ...] = (),
    trace: bool = False,
    quiet: bool = False,
) -> int:
    """Train (resuming from ``root`` if it holds a checkpoint); return 0, or EXIT_PREEMPTED."""
    if watcher is True:
        watcher = PreemptionWatcher()
    if watcher:
        # Listen now rather than at the first step: a SIGTERM during start-up (building the data,
        # restoring the checkpoint) then still ends in a checkpoint and exit 75, not a kill.
        watcher.install()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead (and noise between processes)
    torch.manual_seed(0)
    train, val = make_data(n_train)
    loader = DataLoader(train, batch_size=batch_size, sampler=cloudckpt.ResumableSampler(train, seed=0))
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps - warmup)),
    ], milestones=[warmup])

    if wrap_store is not None:
        checkpoint_dir: Any = wrap_store(cloudckpt.open_storage(root, **dict(storage_options or {})))
        storage_options = None
    else:
        checkpoint_dir = root
    callback = cloudckpt.CheckpointCallback(
        checkpoint_dir, save_every_n_steps=save_every, keep_last_n=3, async_save=True,
        preemption=watcher, storage_options=storage_options,
    )
    killer = SelfPreempt(preempt_at, phase) if preempt_at is not None else None
    tracer = Trace() if trace else None
    callbacks: list[cloudckpt.Callback] = [c for c in (tracer,) if c is not None] + list(extra_callbacks)
    if killer is not None:
        killer.callback = callback
        callbacks += [killer, callback] if phase == "before-save" else [callback, killer]
    else:
        callbacks.append(callback)

    trainer: cloudckpt.Trainer
    loss_fn = killer.wrap_loss(lambda: trainer, cross_entropy) if killer is not None else cross_entropy
    trainer = cloudckpt.Trainer(
        model, optimizer, loader, loss_fn, val_loader=DataLoader(val, batch_size=128),
        scheduler=scheduler, callbacks=callbacks, max_epochs=10**6, max_steps=steps,
    )

    status, reason, code, preempted_time = "finished", None, 0, None
    started = time.time()
    try:
        trainer.fit()
    except Preempted as exc:  # raised once the preemption checkpoint is durable
        preempted_time = time.time()
        status, reason, code = "preempted", exc.reason, int(exc.code)
    finally:
        callback.manager.close()
        if watcher:
            watcher.close()
    resumed = callback.resumed_from
    result = {
        "status": status, "reason": reason, "exit_code": code, "step": trainer.global_step,
        "resumed_from": resumed.name if resumed else None, "resumed_step": resumed.step if resumed else 0,
        "signal_time": killer.signal_time if killer else None,
        "preempted_time": preempted_time,
        "signal_step": killer.signal_step if killer else None,
        "saving_at_signal": killer.saving_at_signal if killer else None,
        "weights_sha256": state_digest(trainer, weights_only=True),
        "state_sha256": state_digest(trainer),
        "trace": tracer.digests if tracer else None,
        "seconds": time.time() - started,
    }
    if result_path:
        Path(result_path).write_text(json.dumps(result))
    if not quiet:
        where = f"resumed from {resumed.name}" if resumed else "started from scratch"
        if status == "preempted":
            print(f"[worker] {where}; preempted ({reason}) at step {trainer.global_step}: "
                  f"checkpoint saved, exiting with status {code}", flush=True)
        else:
            print(f"[worker] {where}; finished at step {trainer.global_step}, "
                  f"weights sha256 {result['weights_sha256'][:16]}", flush=True)
    return code


# -- the story (the parent process) --------------------------------------------------------
@contextlib.contextmanager
def s3_server() -> Iterator[tuple[str, dict[str, str]]]:
    """An in-process moto S3 server on a free loopback port; yields (endpoint, environment for children)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise SystemExit(f"--s3 runs an in-process S3 server, which needs moto: pip install 'cloudckpt[examples]' "
                         f"(from a checkout: pip install -e '.[examples]')  [{exc}]") from None
    os.environ.update({k: os.environ.get(k, v) for k, v in FAKE_AWS_ENV.items()})
    os.environ.pop("AWS_PROFILE", None)

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}", {k: os.environ[k] for k in FAKE_AWS_ENV}
    finally:
        server.stop()


def _start_worker(root: str, result: Path, extra: list[str], env: Mapping[str, str]) -> subprocess.Popen:
    command = [sys.executable, __file__, "--worker", "--root", root, "--result", str(result), *extra]
    return subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, label: str, expected: int, timeout: float = 300) -> tuple[float, str]:
    output, _ = proc.communicate(timeout=timeout)
    ended = time.time()
    if proc.returncode != expected:
        print(output, end="")
        raise SystemExit(f"FAILED: {label} exited with status {proc.returncode}, expected {expected}")
    return ended, output


def story(args: argparse.Namespace) -> int:
    steps, save_every, preempt_at = args.steps, args.save_every, args.preempt_at
    if preempt_at is None:
        preempt_at = save_every * max(1, (steps // save_every) // 2)  # mid-run, right after a save
    if not 0 < preempt_at < steps:
        raise SystemExit(f"--preempt-at must be between 1 and {steps - 1}")
    common = ["--steps", str(steps), "--save-every", str(save_every)]
    tmp = Path(args.local_root).parent / ".spot-results"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        if args.s3:
            endpoint, env = stack.enter_context(s3_server())
            import boto3

            bucket = "spot-demo"
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
            root, reference_root = f"s3://{bucket}/spot", f"s3://{bucket}/spot-reference"
            common += ["--endpoint-url", endpoint]
            where = f"{root} (moto S3 server at {endpoint})"
        else:
            env = {}
            root, reference_root = args.local_root, args.local_root + "-reference"
            for path in (root, reference_root):
                shutil.rmtree(path, ignore_errors=True)  # the story starts from nothing
            where = f"{root} (local disk)"
        print(f"spot training: {steps} steps, checkpoint every {save_every} steps to {where}")

        # (a) and (b) are independent: run them side by side.
        reference = _start_worker(reference_root, tmp / "reference.json", common, env)
        preempted = _start_worker(root, tmp / "preempted.json", [*common, "--preempt-at", str(preempt_at)], env)
        exit_time, _ = _finish(preempted, "the preempted run", EXIT_PREEMPTED)
        _finish(reference, "the reference run", 0)
        ref = json.loads((tmp / "reference.json").read_text())
        pre = json.loads((tmp / "preempted.json").read_text())
        in_flight = " while a save was uploading" if pre["saving_at_signal"] else ""
        print(f"(a) reference run, never interrupted: finished at step {ref['step']}")
        print(f"(b) SIGTERM at step {pre['signal_step']}{in_flight}: checkpoint of step {pre['step']} durable "
              f"{pre['preempted_time'] - pre['signal_time']:.2f} s after the signal, exit status "
              f"{preempted.returncode} after {exit_time - pre['signal_time']:.2f} s")

        resumed = _start_worker(root, tmp / "resumed.json", common, env)
        _finish(resumed, "the resumed run", 0)
        res = json.loads((tmp / "resumed.json").read_text())
        print(f"(c) new process resumed from {res['resumed_from']}: finished at step {res['step']}")

    same_weights = ref["weights_sha256"] == res["weights_sha256"]
    same_state = ref["state_sha256"] == res["state_sha256"]
    print(f"final weights sha256: reference {ref['weights_sha256'][:16]}, resumed {res['weights_sha256'][:16]}")
    if same_weights and same_state:
        print("OK: the preempted-and-resumed run ended bit-identical to the uninterrupted one "
              "(weights, optimizer, scheduler, data order, RNG)")
        return 0
    print("MISMATCH: the resumed run differs from the uninterrupted one "
          f"(weights {'equal' if same_weights else 'differ'}, full state {'equal' if same_state else 'differs'})")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run one training process (resumes automatically)")
    parser.add_argument("--root", help=f"checkpoint root for --worker (default: ${ROOT_ENV}, else {DEFAULT_ROOT})")
    parser.add_argument("--s3", action="store_true", help="the story against an in-process moto S3 server")
    parser.add_argument("--local-root", default=DEFAULT_ROOT, help="checkpoint root of the local story")
    parser.add_argument("--preempt-at", type=int, help="send this process SIGTERM at that step")
    parser.add_argument("--phase", choices=PHASES, default="after-save", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--endpoint-url", help="S3 endpoint for --worker (e.g. a local test server)")
    parser.add_argument("--ec2", action="store_true", help="also poll the EC2 spot interruption notice")
    parser.add_argument("--gce", action="store_true", help="also poll the GCE preemption notice")
    parser.add_argument("--result", help="write a JSON summary of the run here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if not args.worker:
        return story(args)
    root = args.root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT
    watcher: PreemptionWatcher | bool = True
    if args.ec2 or args.gce:
        watcher = PreemptionWatcher(ec2=args.ec2, gce=args.gce)
    options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    return run_worker(root, steps=args.steps, save_every=args.save_every, preempt_at=args.preempt_at,
                      phase=args.phase, result_path=args.result, storage_options=options, watcher=watcher)


if __name__ == "__main__":
    sys.exit(main())
