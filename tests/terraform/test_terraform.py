"""The Terraform modules under terraform/ agree with the library.

The bucket lifecycle rules are the other half of cloudckpt's ``lifecycle``
cleanup mode: the sweeper marks chunks (an S3 tag, a GCS customTime) and the
bucket deletes them.  If the names drift apart, marked chunks are never deleted
and storage leaks silently, so these tests parse the HCL (python-hcl2), resolve
``local.*`` / ``var.*`` references from the HCL itself (variable defaults) and
compare the results with :mod:`cloudckpt.storage.lifecycle`.

checkov (static security checks) runs from ``run_checkov.sh`` in its own
virtual environment; :func:`test_checkov` runs it when CLOUDCKPT_RUN_CHECKOV=1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cloudckpt.storage.lifecycle import (
    CHUNK_PREFIX,
    EXPIRE_AFTER_DAYS,
    EXPIRED_TAG_KEY,
    EXPIRED_TAG_VALUE,
    GCS_EXPIRED_FIELD,
)
from cloudckpt.storage.s3_permissions import S3_BUCKET_ACTIONS, S3_IAM_ACTIONS, S3_OBJECT_ACTIONS

hcl2 = pytest.importorskip("hcl2", reason="needs python-hcl2 (pip install python-hcl2)")

REPO = Path(__file__).resolve().parents[2]
TF_ROOT = REPO / "terraform"
AWS = TF_ROOT / "aws"
GCP = TF_ROOT / "gcp"
CHECKOV_SCRIPT = Path(__file__).resolve().parent / "run_checkov.sh"

#: The GCS lifecycle condition that reads each object field the library sets when it marks.
GCS_CONDITION_FOR_FIELD = {"customTime": "days_since_custom_time"}
#: GCSStorage keeps multipart parts here (cloudckpt.storage.gcs.UPLOADS_PREFIX).
GCS_UPLOADS_PREFIX = ".cloudckpt/uploads/"
#: A prefix other than the default, to check that rules follow var.prefix.
OTHER_PREFIX = "team-a/run-7"

_META_KEYS = {"__is_block__", "__comments__", "__inline_comments__", "__start_line__", "__end_line__"}
_REF = re.compile(r"\$\{\(?(local|var)\.([A-Za-z_][A-Za-z0-9_-]*)\)?\}")
_BARE_REF = re.compile(r"\(?(local|var)\.[A-Za-z_][A-Za-z0-9_-]*\)?")


# -- loading ------------------------------------------------------------------

def _unquote(text: str) -> str:
    """python-hcl2 >= 8 keeps the quotes of string literals and labels; older versions drop them."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return text.replace('\\"', '"')


def normalize(value: Any) -> Any:
    """The parse tree without python-hcl2's metadata keys and literal quotes (any 4.x-8.x version)."""
    if isinstance(value, dict):
        return {_unquote(k): normalize(v) for k, v in value.items() if k not in _META_KEYS}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, str):
        return _unquote(value)
    return value


def parse_file(path: Path) -> dict:
    with path.open() as fh:
        return normalize(hcl2.load(fh))


@dataclass
class Module:
    """The blocks of one Terraform module directory (its *.tf files, not subdirectories)."""

    path: Path
    locals: dict[str, Any] = field(default_factory=dict)
    variables: dict[str, dict] = field(default_factory=dict)
    resources: dict[tuple[str, str], dict] = field(default_factory=dict)
    data: dict[tuple[str, str], dict] = field(default_factory=dict)
    outputs: dict[str, dict] = field(default_factory=dict)
    modules: dict[str, dict] = field(default_factory=dict)

    def resource(self, rtype: str, name: str) -> dict:
        assert (rtype, name) in self.resources, f"{self.path.name}: no resource {rtype}.{name}"
        return self.resources[rtype, name]

    def data_source(self, dtype: str, name: str) -> dict:
        assert (dtype, name) in self.data, f"{self.path.name}: no data {dtype}.{name}"
        return self.data[dtype, name]

    def resolve(self, value: Any, overrides: dict[str, Any] | None = None, _depth: int = 0) -> Any:
        """``value`` with every ``${local.x}`` / ``${var.x}`` replaced (variables by their defaults
        or ``overrides``); other references (resource attributes) stay as written."""
        assert _depth < 20, f"reference cycle resolving {value!r}"
        overrides = overrides or {}
        if isinstance(value, list):
            return [self.resolve(v, overrides, _depth) for v in value]
        if isinstance(value, dict):
            # Older python-hcl2 versions give a computed key "(local.x)" as bare "local.x".
            return {self.resolve(f"${{{k}}}" if _BARE_REF.fullmatch(k) else k, overrides, _depth):
                    self.resolve(v, overrides, _depth) for k, v in value.items()}
        if not isinstance(value, str):
            return value

        def lookup(kind: str, name: str) -> Any:
            if kind == "local":
                assert name in self.locals, f"{self.path.name}: no local {name}"
                return self.resolve(self.locals[name], overrides, _depth + 1)
            if name in overrides:
                return overrides[name]
            assert name in self.variables, f"{self.path.name}: no variable {name}"
            assert "default" in self.variables[name], f"{self.path.name}: variable {name} has no default"
            return self.variables[name]["default"]

        whole = _REF.fullmatch(value)
        if whole:  # keeps numbers and lists as they are
            return lookup(*whole.groups())
        return _REF.sub(lambda m: str(lookup(*m.groups())), value)


def load_module(path: Path) -> Module:
    module = Module(path)
    files = sorted(path.glob("*.tf"))
    assert files, f"no .tf files in {path}"
    for tf in files:
        tree = parse_file(tf)
        for block in tree.get("locals", []):
            module.locals.update(block)
        for block in tree.get("variable", []):
            module.variables.update(block)
        for block in tree.get("output", []):
            module.outputs.update(block)
        for block in tree.get("module", []):
            module.modules.update(block)
        for kind, target in (("resource", module.resources), ("data", module.data)):
            for block in tree.get(kind, []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        target[rtype, name] = body
    return module


def blocks(body: dict, name: str) -> list[dict]:
    """The nested blocks ``name`` of a block body (python-hcl2 gives a list, or a dict for one)."""
    found = body.get(name, [])
    return found if isinstance(found, list) else [found]


def one(body: dict, name: str) -> dict:
    found = blocks(body, name)
    assert len(found) == 1, f"expected one {name!r} block, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def aws() -> Module:
    return load_module(AWS)


@pytest.fixture(scope="module")
def gcp() -> Module:
    return load_module(GCP)


# -- every file parses --------------------------------------------------------

def _tf_files() -> list[Path]:
    return sorted(p for p in TF_ROOT.rglob("*.tf") if ".terraform" not in p.parts)


def test_modules_and_examples_exist():
    for cloud in ("aws", "gcp"):
        for name in ("main.tf", "variables.tf", "outputs.tf", "versions.tf", "examples/basic/main.tf"):
            assert (TF_ROOT / cloud / name).is_file(), f"missing terraform/{cloud}/{name}"
    assert (TF_ROOT / "README.md").is_file()


@pytest.mark.parametrize("path", _tf_files(), ids=lambda p: str(p.relative_to(TF_ROOT)))
def test_tf_file_parses(path: Path):
    tree = parse_file(path)
    assert tree, f"{path} parsed to nothing"


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_example_uses_the_module(cloud: str):
    example = load_module(TF_ROOT / cloud / "examples" / "basic")
    assert example.modules, "the example declares no module"
    for body in example.modules.values():
        assert (TF_ROOT / cloud / "examples" / "basic" / body["source"]).resolve() == (TF_ROOT / cloud)
        assert body.get("k8s_namespace") and body.get("k8s_service_account")


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform CLI not installed")
def test_terraform_fmt():
    result = subprocess.run(["terraform", "fmt", "-check", "-recursive", "-diff", str(TF_ROOT)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"terraform fmt -check found unformatted files:\n{result.stdout}"


# -- AWS ----------------------------------------------------------------------

def _aws_rules(aws: Module) -> list[dict]:
    return blocks(aws.resource("aws_s3_bucket_lifecycle_configuration", "this"), "rule")


def _aws_expired_chunk_rule(aws: Module) -> dict:
    rules = [r for r in _aws_rules(aws)
             if any(blocks(f, "and") and "tags" in one(f, "and") for f in blocks(r, "filter"))]
    assert len(rules) == 1, "expected exactly one lifecycle rule filtering on a tag"
    return rules[0]


def test_aws_prefix_default(aws: Module):
    assert aws.variables["prefix"]["default"] == "checkpoints"


def test_aws_expired_chunk_rule_matches_library(aws: Module):
    rule = _aws_expired_chunk_rule(aws)
    assert aws.resolve(rule["status"]) == "Enabled"
    condition = one(one(rule, "filter"), "and")

    tags = aws.resolve(condition["tags"])
    assert tags == {EXPIRED_TAG_KEY: EXPIRED_TAG_VALUE}

    prefix = aws.variables["prefix"]["default"]
    assert aws.resolve(condition["prefix"]) == f"{prefix}/{CHUNK_PREFIX}"
    assert aws.resolve(condition["prefix"], {"prefix": OTHER_PREFIX}) == f"{OTHER_PREFIX}/{CHUNK_PREFIX}"

    assert aws.resolve(one(rule, "expiration")["days"]) == EXPIRE_AFTER_DAYS


def test_aws_locals_equal_library_constants(aws: Module):
    # The module spells the library's names out as locals; they must stay equal.
    assert aws.locals["expired_tag_key"] == EXPIRED_TAG_KEY
    assert aws.locals["expired_tag_value"] == EXPIRED_TAG_VALUE
    assert aws.locals["chunk_prefix"] == CHUNK_PREFIX


def test_aws_aborts_incomplete_multipart_uploads(aws: Module):
    rules = [r for r in _aws_rules(aws) if blocks(r, "abort_incomplete_multipart_upload")]
    assert len(rules) == 1
    rule = rules[0]
    assert aws.resolve(rule["status"]) == "Enabled"
    assert aws.resolve(one(rule, "abort_incomplete_multipart_upload")["days_after_initiation"]) == EXPIRE_AFTER_DAYS
    # Bucket-wide (empty filter) or at least the whole checkpoint root.
    filt = one(rule, "filter")
    prefix = aws.resolve(filt.get("prefix", ""))
    assert prefix in ("", f"{aws.variables['prefix']['default']}/"), prefix


def test_aws_transition_is_optional_and_targets_chunks(aws: Module):
    assert aws.variables["transition_days"]["default"] is None
    rules = [r for r in _aws_rules(aws) if blocks(r, "transition")]
    assert len(rules) == 1
    rule = rules[0]
    # Off until transition_days is set (older python-hcl2 versions print null as None).
    assert re.search(r"var\.transition_days == (null|None) \? \"Disabled\"", rule["status"]), rule["status"]
    prefix = aws.resolve(one(one(rule, "filter"), "and")["prefix"])
    assert prefix == f"{aws.variables['prefix']['default']}/{CHUNK_PREFIX}"


def test_aws_versioning_optional_with_noncurrent_expiration(aws: Module):
    assert aws.variables["versioning"]["default"] is False
    assert aws.resource("aws_s3_bucket_versioning", "this")["count"] == "${var.versioning ? 1 : 0}"
    rules = [r for r in _aws_rules(aws) if blocks(r, "noncurrent_version_expiration")]
    assert len(rules) == 1
    assert "var.versioning" in rules[0]["status"]


def test_aws_bucket_is_locked_down(aws: Module):
    pab = aws.resource("aws_s3_bucket_public_access_block", "this")
    for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
        assert pab[flag] is True, flag
    ownership = one(aws.resource("aws_s3_bucket_ownership_controls", "this"), "rule")
    assert ownership["object_ownership"] == "BucketOwnerEnforced"

    sse = one(one(aws.resource("aws_s3_bucket_server_side_encryption_configuration", "this"), "rule"),
              "apply_server_side_encryption_by_default")
    assert "AES256" in sse["sse_algorithm"] and "aws:kms" in sse["sse_algorithm"]
    assert sse["kms_master_key_id"] == "${var.kms_key_arn}"

    policy = aws.data_source("aws_iam_policy_document", "bucket")
    deny_tls = [s for s in blocks(policy, "statement")
                if s["effect"] == "Deny"
                and any(c["variable"] == "aws:SecureTransport" and c["values"] == ["false"]
                        for c in blocks(s, "condition"))]
    assert deny_tls, "no statement denies requests without TLS"
    assert aws.resource("aws_s3_bucket_policy", "this")["policy"] == "${data.aws_iam_policy_document.bucket.json}"


def test_aws_iam_policy_is_scoped_to_the_prefix(aws: Module):
    doc = aws.data_source("aws_iam_policy_document", "checkpoint")
    statements = [aws.resolve(s) for s in blocks(doc, "statement")]
    prefix = aws.variables["prefix"]["default"]
    bucket_arn = "${aws_s3_bucket.this.arn}"

    for s in statements:
        assert s["effect"] == "Allow"
        assert not any(a in ("*", "s3:*") for a in s["actions"]), s
        assert "*" not in s["resources"], s

    objects = [s for s in statements if "s3:PutObjectTagging" in s["actions"]]
    assert len(objects) == 1
    assert sorted(objects[0]["actions"]) == sorted(S3_OBJECT_ACTIONS)  # the library's own list
    assert objects[0]["resources"] == [f"{bucket_arn}/{prefix}/*"]

    listing = [s for s in statements if "s3:ListBucket" in s["actions"]]
    assert len(listing) == 1
    assert listing[0]["resources"] == [bucket_arn]
    conditions = blocks(listing[0], "condition")
    assert [(c["test"], c["variable"], c["values"]) for c in conditions] == [
        ("StringLike", "s3:prefix", [f"{prefix}/*"])
    ]

    # s3:prefix is not a condition key of ListBucketMultipartUploads (a condition on it
    # would always deny), so that action gets its own statement on the bucket.
    uploads = [s for s in statements if "s3:ListBucketMultipartUploads" in s["actions"]]
    assert len(uploads) == 1
    assert uploads[0]["resources"] == [bucket_arn]
    assert uploads[0]["actions"] == ["s3:ListBucketMultipartUploads"]
    granted = {a for s in statements for a in s["actions"] if a.startswith("s3:")}
    assert granted == set(S3_IAM_ACTIONS) and {"s3:ListBucket", *uploads[0]["actions"]} == set(S3_BUCKET_ACTIONS)

    policy = aws.resource("aws_iam_policy", "checkpoint")
    assert policy["policy"] == "${data.aws_iam_policy_document.checkpoint.json}"


def test_aws_irsa_role(aws: Module):
    trust = aws.data_source("aws_iam_policy_document", "irsa_trust")
    statement = one(trust, "statement")
    assert statement["actions"] == ["sts:AssumeRoleWithWebIdentity"]
    principals = one(statement, "principals")
    assert principals["type"] == "Federated"
    assert principals["identifiers"] == ["${var.oidc_provider_arn}"]
    conditions = {c["variable"]: (c["test"], c["values"]) for c in blocks(statement, "condition")}
    assert conditions == {
        "${local.oidc_issuer}:sub": (
            "StringEquals", ["system:serviceaccount:${var.k8s_namespace}:${var.k8s_service_account}"]),
        "${local.oidc_issuer}:aud": ("StringEquals", ["sts.amazonaws.com"]),
    }
    role = aws.resource("aws_iam_role", "checkpoint")
    assert role["assume_role_policy"] == "${data.aws_iam_policy_document.irsa_trust[0].json}"
    attachment = aws.resource("aws_iam_role_policy_attachment", "checkpoint")
    assert attachment["policy_arn"] == "${aws_iam_policy.checkpoint.arn}"


def test_aws_outputs(aws: Module):
    assert {"bucket_name", "bucket_arn", "role_arn", "policy_arn", "checkpoint_root_url"} <= set(aws.outputs)
    url = aws.resolve(aws.outputs["checkpoint_root_url"]["value"])
    assert url == f"s3://${{aws_s3_bucket.this.id}}/{aws.variables['prefix']['default']}"


# -- GCP ----------------------------------------------------------------------

def _gcs_rules(gcp: Module) -> list[dict]:
    bucket = gcp.resource("google_storage_bucket", "this")
    rules = list(blocks(bucket, "lifecycle_rule"))
    for dynamic in blocks(bucket, "dynamic"):  # optional rules
        if "lifecycle_rule" in dynamic:
            rules.extend(blocks(dynamic["lifecycle_rule"], "content"))
    return rules


def test_gcs_expired_chunk_rule_matches_library(gcp: Module):
    condition_key = GCS_CONDITION_FOR_FIELD[GCS_EXPIRED_FIELD]
    rules = [r for r in _gcs_rules(gcp) if condition_key in one(r, "condition")]
    assert len(rules) == 1, f"expected exactly one lifecycle rule on {condition_key}"
    rule = rules[0]
    assert one(rule, "action")["type"] == "Delete"
    condition = one(rule, "condition")
    assert gcp.resolve(condition[condition_key]) == EXPIRE_AFTER_DAYS
    prefix = gcp.variables["prefix"]["default"]
    assert gcp.resolve(condition["matches_prefix"]) == [f"{prefix}/{CHUNK_PREFIX}"]
    assert gcp.resolve(condition["matches_prefix"], {"prefix": OTHER_PREFIX}) == [f"{OTHER_PREFIX}/{CHUNK_PREFIX}"]
    # No other condition narrows it (an "age" would delay deletion past the marking).
    assert set(condition) <= {condition_key, "matches_prefix", "with_state"}


def test_gcs_library_names(gcp: Module):
    # google-cloud-storage is a core dependency, so the backend imports everywhere.
    from cloudckpt.storage import gcs as gcs_backend

    assert gcs_backend.EXPIRED_CUSTOM_TIME_FIELD == GCS_EXPIRED_FIELD
    assert gcs_backend.UPLOADS_PREFIX == GCS_UPLOADS_PREFIX
    assert gcp.locals["chunk_prefix"] == CHUNK_PREFIX
    assert gcp.locals["uploads_prefix"] == GCS_UPLOADS_PREFIX


def test_gcs_deletes_abandoned_upload_parts(gcp: Module):
    prefix = gcp.variables["prefix"]["default"]
    rules = [r for r in _gcs_rules(gcp)
             if gcp.resolve(one(r, "condition").get("matches_prefix")) == [f"{prefix}/{GCS_UPLOADS_PREFIX}"]]
    assert len(rules) == 1
    assert one(rules[0], "action")["type"] == "Delete"
    assert gcp.resolve(one(rules[0], "condition")["age"]) == EXPIRE_AFTER_DAYS


def test_gcs_optional_rules(gcp: Module):
    assert gcp.variables["transition_days"]["default"] is None
    assert gcp.variables["versioning"]["default"] is False
    actions = {one(r, "action")["type"] for r in _gcs_rules(gcp)}
    assert "SetStorageClass" in actions
    noncurrent = [r for r in _gcs_rules(gcp) if "days_since_noncurrent_time" in one(r, "condition")]
    assert len(noncurrent) == 1
    assert one(gcp.resource("google_storage_bucket", "this"), "versioning")["enabled"] == "${var.versioning}"


def test_gcs_bucket_is_locked_down(gcp: Module):
    bucket = gcp.resource("google_storage_bucket", "this")
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    encryption = [d["encryption"] for d in blocks(bucket, "dynamic") if "encryption" in d]
    assert encryption, "no optional CMEK encryption block"


def test_gcs_iam_is_scoped_to_the_prefix(gcp: Module):
    member = gcp.resource("google_storage_bucket_iam_member", "checkpoint")
    assert member["role"] == "${var.object_role}"
    assert gcp.variables["object_role"]["default"] in ("roles/storage.objectUser", "roles/storage.objectAdmin")
    assert member["member"] == "serviceAccount:${google_service_account.checkpoint.email}"

    prefix = gcp.variables["prefix"]["default"]
    expression = gcp.resolve(one(member, "condition")["expression"])
    clauses = [c.strip() for c in expression.split("||")]
    assert clauses == [
        f'resource.name.startsWith("projects/_/buckets/${{google_storage_bucket.this.name}}/objects/{prefix}/")',
        f'api.getAttribute("storage.googleapis.com/objectListPrefix", "").startsWith("{prefix}/")',
    ]


def test_gcs_workload_identity(gcp: Module):
    binding = gcp.resource("google_service_account_iam_member", "workload_identity")
    assert binding["role"] == "roles/iam.workloadIdentityUser"
    assert binding["member"] == (
        "serviceAccount:${var.project_id}.svc.id.goog[${var.k8s_namespace}/${var.k8s_service_account}]"
    )
    assert binding["service_account_id"] == "${google_service_account.checkpoint.name}"


def test_gcs_outputs(gcp: Module):
    assert {"bucket_name", "service_account_email", "checkpoint_root_url"} <= set(gcp.outputs)
    url = gcp.resolve(gcp.outputs["checkpoint_root_url"]["value"])
    assert url == f"gs://${{google_storage_bucket.this.name}}/{gcp.variables['prefix']['default']}"


# -- checkov ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("CLOUDCKPT_RUN_CHECKOV") != "1",
                    reason="set CLOUDCKPT_RUN_CHECKOV=1 to run checkov (installs it into .venv-checkov)")
def test_checkov():
    result = subprocess.run(["bash", str(CHECKOV_SCRIPT)], check=False, cwd=REPO, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, f"checkov failed:\n{result.stdout}\n{result.stderr}"
