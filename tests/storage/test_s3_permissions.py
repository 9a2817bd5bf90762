"""One list of IAM actions (cloudckpt.storage.s3_permissions): the code calls nothing outside it, and every
document and policy that names S3 permissions names exactly it."""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path

import boto3
import pytest
import torch

import cloudckpt
from cloudckpt.storage.s3 import S3Storage
from cloudckpt.storage.s3_permissions import (
    S3_BUCKET_ACTIONS,
    S3_IAM_ACTIONS,
    S3_OBJECT_ACTIONS,
    S3_OPERATION_ACTIONS,
)
from cloudckpt.sweeper import SweepConfig

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "cloudckpt"
ACTION = re.compile(r"\bs3:[A-Z][A-Za-z]+\b")
#: The operations boto3's managed copy (``client.copy``, used for sources over 5 GiB) may call.
MANAGED_COPY = {"HeadObject", "CopyObject", "CreateMultipartUpload", "UploadPartCopy",
                "CompleteMultipartUpload", "AbortMultipartUpload"}
#: Client methods that are no S3 API call.
NOT_AN_OPERATION = {"close"}
#: Every place that tells a user which S3 permissions to grant.
DOCUMENTS = ["examples/kubernetes/job.yaml", "examples/kubernetes/README.md", "docs/guides/kubernetes.md",
             "terraform/README.md"]


def _operations_in_the_code() -> set[str]:
    """The S3 operations the package's boto3 clients are asked for, found in the source."""
    mapping = boto3.client("s3", region_name="us-east-1").meta.method_to_api_mapping
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "boto3" not in text and "botocore" not in text:
            continue
        methods = set(re.findall(r"_client\.(\w+)\(", text)) - {"get_paginator"}
        methods |= set(re.findall(r"get_paginator\(\"(\w+)\"\)", text))
        for method in methods - NOT_AN_OPERATION:
            if method == "copy":
                found |= MANAGED_COPY
            elif method in mapping:
                found.add(mapping[method])
            else:
                pytest.fail(f"{path.relative_to(REPO)} calls client.{method}(): map it in S3_OPERATION_ACTIONS "
                            "(and NOT_AN_OPERATION here if it is no S3 API call)")
    return found


def test_the_list_covers_every_operation_the_code_calls():
    called = _operations_in_the_code()
    assert {"PutObject", "ListMultipartUploads", "AbortMultipartUpload", "PutObjectTagging"} <= called
    assert called - set(S3_OPERATION_ACTIONS) == set(), "operations without IAM actions in s3_permissions.py"
    assert set(S3_OPERATION_ACTIONS) - called == set(), "s3_permissions.py lists operations nothing calls"
    assert set(S3_BUCKET_ACTIONS) | set(S3_OBJECT_ACTIONS) == set(S3_IAM_ACTIONS)


def test_every_operation_a_real_run_sends_is_in_the_list(moto_s3):
    """Save, restore, retention with lifecycle marks, a stale upload swept, server-side copies (also the
    multipart copy of big sources), recorded as the requests reach the wire."""
    sent: list[str] = []
    client = moto_s3.client()
    client.meta.events.register("before-call.s3", lambda model, **_: sent.append(model.name))
    store = S3Storage(moto_s3.new_bucket(), "run", client=client)
    stale = store.multipart("chunks/left-by-a-crashed-writer")
    stale.upload_part(1, b"x" * 16)
    model = torch.nn.Linear(32, 32)
    cleanup = SweepConfig(cleanup="lifecycle", grace=_dt.timedelta(0), stale_upload_age=_dt.timedelta(0))
    with cloudckpt.CheckpointManager(store, monitor="loss", retention=cloudckpt.KeepLastN(1), cleanup=cleanup,
                                     transfer=cloudckpt.TransferConfig(chunk_size=1024, pack_threshold=256)) as mgr:
        for step in (1, 2):
            with torch.no_grad():
                model.weight.add_(1.0)
            mgr.save({"model": model}, step=step, metrics={"loss": 1.0 / step})
        mgr.restore({"model": model})
        store.copy("checkpoint_step_00000002.ckpt", "copied.bin")
        store.max_copy_object_size = 1024  # as if it were over 5 GiB: boto3's multipart copy
        store.copy("checkpoint_step_00000002.ckpt", "copied-in-parts.bin")
    assert {"PutObjectTagging", "ListMultipartUploads", "AbortMultipartUpload", "UploadPartCopy"} <= set(sent)
    assert set(sent) - set(S3_OPERATION_ACTIONS) == set()


@pytest.mark.parametrize("document", DOCUMENTS)
def test_documents_name_exactly_the_actions_of_the_list(document):
    named = set(ACTION.findall((REPO / document).read_text()))
    assert named == set(S3_IAM_ACTIONS), (
        f"{document}: missing {sorted(set(S3_IAM_ACTIONS) - named)}, extra {sorted(named - set(S3_IAM_ACTIONS))}")


def test_the_terraform_policy_grants_exactly_the_list():
    text = (REPO / "terraform" / "aws" / "main.tf").read_text()
    start = text.index('data "aws_iam_policy_document" "checkpoint"')
    policy = text[start:text.index('resource "aws_iam_policy" "checkpoint"', start)]
    assert set(re.findall(r'"(s3:[A-Z][A-Za-z]+)"', policy)) == set(S3_IAM_ACTIONS)
