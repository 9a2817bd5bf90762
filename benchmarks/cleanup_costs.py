"""Request and byte costs of checkpoint cleanup on S3 (moto): ``cleanup="delete"`` vs ``"lifecycle"``.

A 20-epoch training run (cloudckpt.Trainer, a small MLP with Adam) saves every
epoch with ``keep_last_n=3`` (plus the best by val_loss) on a fresh moto
bucket, once per cleanup mode, with ``grace=0`` so that every save's sweep
acts at once.  The store is wrapped in a fault-free ``FaultyStorage`` to count
the library's storage calls per verb and the bytes it puts; the boto3 client
is hooked to count the S3 API requests that actually go out (one
``mark_expired`` call is one ``PutObjectTagging`` request per chunk).  A run
with no retention at all (keep everything) is the in-run baseline.

    python benchmarks/cleanup_costs.py
    python benchmarks/cleanup_costs.py --epochs 20 --width 256 --json cleanup_costs.json

Prints a table; ``--json`` also writes the numbers (and wall seconds, which are noisy).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from servers import MotoS3

import cloudckpt
from cloudckpt.storage.faults import FaultyStorage
from cloudckpt.storage.lifecycle import CHUNK_PREFIX, EXPIRED_TAG_KEY, EXPIRED_TAG_VALUE
from cloudckpt.storage.s3 import S3Storage

VERBS = ("put", "get", "head", "list", "delete", "copy", "multipart", "upload_part", "complete",
         "mark_expired")


def _training(store, *, epochs: int, width: int, retention: str | None, cleanup: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    train = [(torch.randn(32, width, generator=g), torch.randn(32, 1, generator=g)) for _ in range(4)]
    val = [(torch.randn(32, width, generator=g), torch.randn(32, 1, generator=g))]

    def loss_fn(m, batch):
        x, y = batch
        return nn.functional.mse_loss(m(x), y)

    kwargs = {"keep_last_n": 3} if retention == "keep_last_n=3" else {}
    callback = cloudckpt.CheckpointCallback(
        store, save_frequency=1, save_best=True, monitor="val_loss",
        cleanup=cloudckpt.SweepConfig(cleanup=cleanup, grace=dt.timedelta(0)), **kwargs,
    )
    cloudckpt.Trainer(model, optimizer, train, loss_fn, val_loader=val, callbacks=[callback],
                      max_epochs=epochs).fit()
    callback.manager.close()


def measure(server: MotoS3, label: str, *, epochs: int, width: int, retention: str | None,
            cleanup: str) -> dict:
    bucket = server.new_bucket()
    s3 = S3Storage(bucket, "runs/bench", endpoint_url=server.endpoint_url)
    api_calls: Counter[str] = Counter()
    s3._client.meta.events.register(
        "before-call.s3.*", lambda event_name, **_: api_calls.update([event_name.rsplit(".", 1)[-1]]))
    store = FaultyStorage(s3)  # no faults: it only counts
    start = time.perf_counter()
    _training(store, epochs=epochs, width=width, retention=retention, cleanup=cleanup)
    seconds = time.perf_counter() - start

    client = server.client()  # inspection after the run, not counted
    objects = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
               for o in page.get("Contents", [])]
    chunks = [k for k in objects if k.startswith(f"runs/bench/{CHUNK_PREFIX}")]
    marked = 0
    for key in chunks:
        tags = client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
        marked += any(t["Key"] == EXPIRED_TAG_KEY and t["Value"] == EXPIRED_TAG_VALUE for t in tags)
    return {
        "label": label, "retention": retention or "keep all", "cleanup": cleanup, "epochs": epochs,
        "verbs": {v: store.counts.get(v, 0) for v in VERBS},
        "requests": sum(store.counts.values()),
        "s3_api_calls": dict(sorted(api_calls.items())),
        "s3_api_total": sum(api_calls.values()),
        "bytes_put": store.bytes_put,
        "objects_left": len(objects),
        "chunks_left": len(chunks),
        "chunks_marked": marked,
        "seconds": round(seconds, 2),
    }


def print_table(rows: list[dict]) -> None:
    verbs = [v for v in VERBS if any(r["verbs"][v] for r in rows)]
    apis = sorted({a for r in rows for a in r["s3_api_calls"]})
    names = [r["label"] for r in rows]
    width = max(18, *(len(n) for n in names)) + 2
    line = lambda label, cells: print(f"{label:24}" + "".join(f"{c:>{width}}" for c in cells))
    line("", names)
    print("storage calls (FaultyStorage.counts)")
    for verb in verbs:
        line(f"  {verb}", [r["verbs"][verb] for r in rows])
    line("  total", [r["requests"] for r in rows])
    print("S3 API requests (boto3)")
    for api in apis:
        line(f"  {api}", [r["s3_api_calls"].get(api, 0) for r in rows])
    line("  total", [r["s3_api_total"] for r in rows])
    line("MiB uploaded", [f"{r['bytes_put'] / 2**20:.2f}" for r in rows])
    line("objects left", [r["objects_left"] for r in rows])
    line("  chunks left", [r["chunks_left"] for r in rows])
    line("  chunks marked", [r["chunks_marked"] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=256, help="MLP width (state ~ 3 * 4 * 2 * width^2 bytes)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    server = MotoS3()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    try:
        cases = [("keep all (baseline)", None, "delete"),
                 ("delete", "keep_last_n=3", "delete"),
                 ("lifecycle", "keep_last_n=3", "lifecycle")]
        rows = [measure(server, label, epochs=args.epochs, width=args.width, retention=retention,
                        cleanup=cleanup) for label, retention, cleanup in cases]
    finally:
        server.stop()
    print(f"{args.epochs} epochs, save every epoch, grace=0, MLP width {args.width} + Adam, moto S3")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "width": args.width, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
