"""Every tool a user might pick to save and restore the same state, behind one small interface.

A contender saves the workload to a fresh location and restores it into the
live model and optimizer.  ``why_not`` says why one cannot run here (a
missing optional package); the run prints it and goes on.  Peers come from
the ``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

import cloudckpt

from .measure import fsync_file
from .workload import Workload


class Contender:
    name = ""
    note = ""
    needs: tuple[str, ...] = ()

    def why_not(self) -> str | None:
        missing = [m for m in self.needs if importlib.util.find_spec(m) is None]
        return f"not installed: {', '.join(missing)} (pip install -e '.[bench]')" if missing else None

    def nbytes(self, work: Workload) -> int:
        return work.nbytes

    def save(self, work: Workload, where: str) -> None:
        raise NotImplementedError

    def restore(self, work: Workload, where: str) -> None:
        raise NotImplementedError


def _dcp_state(work: Workload) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(work.model, work.optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _dcp_apply(work: Workload, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(work.model, work.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


# -- local disk ------------------------------------------------------------------------
class CloudckptLocal(Contender):
    name = "cloudckpt"

    def save(self, work: Workload, where: str) -> None:
        with cloudckpt.CheckpointManager(where, capture_rng=False) as mgr:
            mgr.save(work.state, step=0)

    def restore(self, work: Workload, where: str) -> None:
        with cloudckpt.CheckpointManager(where, capture_rng=False) as mgr:
            mgr.restore(work.state)


class TorchSave(Contender):
    name = "torch.save / torch.load"
    mmap = False

    def save(self, work: Workload, where: str) -> None:
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, "state.pt"), "wb") as fh:
            torch.save(work.state_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())

    def restore(self, work: Workload, where: str) -> None:
        work.load_state_dict(torch.load(os.path.join(where, "state.pt"), weights_only=True, mmap=self.mmap))


class TorchLoadMmap(TorchSave):
    name = "torch.save / torch.load(mmap=True)"
    note = "lazy: load_state_dict copies the weights; optimizer moments stay mapped until touched"
    mmap = True


class Safetensors(Contender):
    name = "safetensors (weights only)"
    note = "weights only: no optimizer state"
    needs = ("safetensors",)

    def nbytes(self, work: Workload) -> int:
        return sum(t.numel() * t.element_size() for t in work.model.state_dict().values())

    def save(self, work: Workload, where: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(where, exist_ok=True)
        path = os.path.join(where, "model.safetensors")
        save_file(work.model.state_dict(), path)
        fsync_file(path)

    def restore(self, work: Workload, where: str) -> None:
        from safetensors.torch import load_file

        work.model.load_state_dict(load_file(os.path.join(where, "model.safetensors")))


class DcpFileSystem(Contender):
    name = "DCP FileSystemWriter / Reader"
    note = "sync_files=True (fsync)"

    def save(self, work: Workload, where: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(_dcp_state(work), storage_writer=dcp.FileSystemWriter(where, sync_files=True, thread_count=2))

    def restore(self, work: Workload, where: str) -> None:
        import torch.distributed.checkpoint as dcp

        state = _dcp_state(work)
        dcp.load(state, storage_reader=dcp.FileSystemReader(where))
        _dcp_apply(work, state)


class LocalCeiling(Contender):
    """What the disk and the page cache allow: the state's bytes, no format and no checks."""

    name = "ceiling: raw parallel write + fsync / read into the live tensors"
    note = "16 files on 8 threads"
    files, threads = 16, 8

    def _groups(self, work: Workload) -> tuple[list[memoryview], list[list[int]]]:
        views = [t.detach().reshape(-1).view(torch.uint8).numpy().data for t in work.tensors()]
        groups: list[list[int]] = [[] for _ in range(self.files)]
        sizes = [0] * self.files
        for i in sorted(range(len(views)), key=lambda i: -len(views[i])):
            emptiest = sizes.index(min(sizes))
            groups[emptiest].append(i)
            sizes[emptiest] += len(views[i])
        return views, groups

    def save(self, work: Workload, where: str) -> None:
        os.makedirs(where, exist_ok=True)
        views, groups = self._groups(work)

        def write(group: int) -> None:
            with open(os.path.join(where, f"piece-{group}"), "wb") as fh:
                for i in groups[group]:
                    fh.write(views[i])
                fh.flush()
                os.fsync(fh.fileno())

        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(write, range(self.files)))
        fsync_file(where)

    def restore(self, work: Workload, where: str) -> None:
        views, groups = self._groups(work)

        def read(group: int) -> None:
            with open(os.path.join(where, f"piece-{group}"), "rb", buffering=0) as fh:
                for i in groups[group]:
                    done = 0
                    while done < len(views[i]):
                        got = fh.readinto(views[i][done:])
                        if not got:
                            raise EOFError(f"piece-{group} ended early")
                        done += got

        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(read, range(self.files)))


LOCAL = [CloudckptLocal(), TorchSave(), TorchLoadMmap(), Safetensors(), DcpFileSystem(), LocalCeiling()]


# -- S3 ----------------------------------------------------------------------------------
class CloudckptS3(Contender):
    name = "cloudckpt"
    note = "defaults"

    def __init__(self, env) -> None:
        self.env = env

    def manager(self, where: str) -> cloudckpt.CheckpointManager:
        return cloudckpt.CheckpointManager(where, capture_rng=False, storage_options={"endpoint_url": self.env.url})

    def save(self, work: Workload, where: str) -> None:
        with self.manager(where) as mgr:
            mgr.save(work.state, step=0)

    def restore(self, work: Workload, where: str) -> None:
        with self.manager(where) as mgr:
            mgr.restore(work.state)


class _ConnectorBase(Contender):
    needs = ("s3torchconnector",)

    def __init__(self, env) -> None:
        self.env = env

    def config(self):
        from s3torchconnector import S3ClientConfig

        return S3ClientConfig(force_path_style=True)


class S3CheckpointPeer(_ConnectorBase):
    name = "s3torchconnector S3Checkpoint"
    note = "AWS CRT; torch.save into one object"

    def _checkpoint(self):
        from s3torchconnector import S3Checkpoint

        return S3Checkpoint(region="us-east-1", endpoint=self.env.url, s3client_config=self.config())

    def save(self, work: Workload, where: str) -> None:
        with self._checkpoint().writer(f"{where}/state.pt") as writer:
            torch.save(work.state_dict(), writer)

    def restore(self, work: Workload, where: str) -> None:
        with self._checkpoint().reader(f"{where}/state.pt") as reader:
            work.load_state_dict(torch.load(reader, weights_only=True))


class S3DcpPeer(_ConnectorBase):
    name = "s3torchconnector DCP S3StorageWriter / Reader"
    note = "thread_count=8"

    def save(self, work: Workload, where: str) -> None:
        import torch.distributed.checkpoint as dcp
        from s3torchconnector.dcp import S3StorageWriter

        os.environ["AWS_ENDPOINT_URL"] = self.env.url
        writer = S3StorageWriter("us-east-1", where, s3client_config=self.config(), thread_count=8)
        dcp.save(_dcp_state(work), storage_writer=writer)

    def restore(self, work: Workload, where: str) -> None:
        import torch.distributed.checkpoint as dcp
        from s3torchconnector.dcp import S3StorageReader

        os.environ["AWS_ENDPOINT_URL"] = self.env.url
        state = _dcp_state(work)
        dcp.load(state, storage_reader=S3StorageReader("us-east-1", where, s3client_config=self.config()))
        _dcp_apply(work, state)


class FsspecPeer(Contender):
    name = "DCP FsspecWriter / Reader on s3fs"
    note = "thread_count=8"
    needs = ("s3fs",)

    def __init__(self, env) -> None:
        self.env = env

    def _options(self) -> dict[str, Any]:
        return {"endpoint_url": self.env.url, "skip_instance_cache": True}

    def save(self, work: Workload, where: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        dcp.save(_dcp_state(work), storage_writer=FsspecWriter(where, thread_count=8, **self._options()))

    def restore(self, work: Workload, where: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        state = _dcp_state(work)
        dcp.load(state, storage_reader=FsspecReader(where, **self._options()))
        _dcp_apply(work, state)


def s3_contenders(env) -> list[Contender]:
    return [CloudckptS3(env), S3CheckpointPeer(env), S3DcpPeer(env), FsspecPeer(env)]
