"""Elastic FSDP2 training that resumes at whatever number of ranks it restarts with.

    torchrun --standalone --nproc-per-node=4 examples/elastic_training.py --root /tmp/elastic --steps 20
    torchrun --standalone --nproc-per-node=3 examples/elastic_training.py --root /tmp/elastic --steps 30

The second command restores the checkpoint 4 ranks saved at step 20 into 3
ranks (DistributedCheckpointManager reshards it through
torch.distributed.checkpoint) and trains on to step 30.  On Kubernetes the
same script runs under ``torchrun --nnodes=MIN:MAX`` (examples/kubernetes/
elastic-job.yaml): when spot capacity comes back smaller, the restarted pods
resume from the newest complete checkpoint.

On SIGTERM every rank finishes the step, the ranks agree (one all-reduce per
step), save a checkpoint marked ``preemption`` together, and exit with 75.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

ROOT_ENV = "CLOUDCKPT_ROOT"


def build(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(args: argparse.Namespace) -> int:
    from cloudckpt import KeepLastN
    from cloudckpt.distributed import DistributedCheckpointManager
    from cloudckpt.preemption import EXIT_PREEMPTED, PreemptionWatcher

    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer = build(world)
    progress = {"step": 0}
    state = {"model": model, "optimizer": optimizer, "progress": progress}
    options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    ckpt = DistributedCheckpointManager(args.root, replicated=["progress"], storage_options=options,
                                        retention=KeepLastN(3))
    info = ckpt.restore(state)
    if rank == 0:
        if info is None:
            print(f"fresh start at {world} ranks", flush=True)
        else:
            saved_by = ckpt.manager.manifest(info.name).config["cloudckpt_distributed"]["world_size"]
            print(f"resumed {info.name} (step {info.step}, saved by {saved_by} ranks) at {world} ranks", flush=True)
    with PreemptionWatcher() as watcher:
        while progress["step"] < args.steps:
            x = torch.randn(16, 32)
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            progress["step"] += 1
            notice = torch.tensor([int(watcher.requested)])
            dist.all_reduce(notice, op=dist.ReduceOp.MAX)  # every rank stops at the same step
            if notice.item():
                ckpt.save(state, step=progress["step"], reason="preemption")
                if rank == 0:
                    print(f"preempted: saved step {progress['step']}", flush=True)
                return EXIT_PREEMPTED
            if progress["step"] % args.save_every == 0 or progress["step"] == args.steps:
                saved = ckpt.save(state, step=progress["step"], metrics={"loss": loss.item()})
                if rank == 0:
                    print(f"step {saved.step}: saved at {world} ranks", flush=True)
    ckpt.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get(ROOT_ENV), help=f"checkpoint root (default: ${ROOT_ENV})")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--endpoint-url", help="S3 endpoint (e.g. a local test server)")
    args = parser.parse_args()
    if not args.root:
        parser.error(f"give --root or set {ROOT_ENV}")
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    try:
        code = train(args)
    finally:
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
