"""examples/kubernetes/job.yaml agrees with the library and the example it runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml  # PyYAML (moto[server] requires it too)

from cloudckpt.preemption import EXIT_PREEMPTED, PreemptionWatcher
from preempt_helpers import checkpoints
from preempt_worker import REPO, spot

MANIFEST = REPO / "examples" / "kubernetes" / "job.yaml"
#: Seconds the process needs after the preemption checkpoint is committed to be gone (interpreter
#: teardown took 1-2.5 s in the demo on a 2-core machine).
EXIT_MARGIN = 3.0


@pytest.fixture(scope="module")
def documents() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


@pytest.fixture(scope="module")
def job(documents) -> dict:
    jobs = [doc for doc in documents if doc.get("kind") == "Job"]
    assert len(jobs) == 1 and jobs[0]["apiVersion"] == "batch/v1"
    return jobs[0]


@pytest.fixture(scope="module")
def container(job) -> dict:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_preempted_pods_do_not_count_as_failures(job, container):
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    rules = spec["podFailurePolicy"]["rules"]
    exit_rules = [r for r in rules if "onExitCodes" in r]
    assert any(
        r["action"] == "Ignore" and r["onExitCodes"]["operator"] == "In"
        and EXIT_PREEMPTED in r["onExitCodes"]["values"]
        and r["onExitCodes"].get("containerName", container["name"]) == container["name"]
        for r in exit_rules
    ), f"no rule ignores exit code {EXIT_PREEMPTED}: {rules}"
    assert any(
        r["action"] == "Ignore" and any(c["type"] == "DisruptionTarget" for c in r["onPodConditions"])
        for r in rules if "onPodConditions" in r
    ), f"no rule ignores DisruptionTarget: {rules}"
    # The rule for 75 must come before any rule that would fail the Job on that code.
    first = next(r for r in exit_rules if EXIT_PREEMPTED in r["onExitCodes"]["values"]
                 or r["onExitCodes"]["operator"] == "NotIn")
    assert first["action"] == "Ignore"


def test_grace_period_outlasts_the_watcher_deadline(job):
    grace = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    deadline = PreemptionWatcher(signals=()).deadline
    assert grace > deadline + EXIT_MARGIN, f"grace {grace} s vs deadline {deadline} s + {EXIT_MARGIN} s"


def test_container_runs_the_worker_with_the_root_variable_the_example_reads(container):
    argv = container.get("command", []) + container.get("args", [])
    assert argv[:2] == ["python", "examples/spot_training.py"] and "--worker" in argv
    assert (REPO / argv[1]).is_file()
    env = {item["name"]: item.get("value") for item in container.get("env", [])}
    assert spot.ROOT_ENV in env, f"the container does not set {spot.ROOT_ENV}"
    assert re.match(r"^(s3|gs)://[^/]+/.+", env[spot.ROOT_ENV])
    if "--root" in argv:  # passed explicitly: it must be that variable, expanded by Kubernetes
        assert argv[argv.index("--root") + 1] == f"$({spot.ROOT_ENV})"
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(argv)))
    assert referenced <= set(env), f"the command uses undefined variables {referenced - set(env)}"


def test_service_account_exists_with_cloud_identity(job, documents):
    name = job["spec"]["template"]["spec"]["serviceAccountName"]
    accounts = [d for d in documents if d.get("kind") == "ServiceAccount" and d["metadata"]["name"] == name]
    assert len(accounts) == 1, f"no ServiceAccount {name!r} in {MANIFEST.name}"
    annotations = accounts[0]["metadata"].get("annotations", {})
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/.+", annotations.get("eks.amazonaws.com/role-arn", ""))
    assert "iam.gke.io/gcp-service-account" in MANIFEST.read_text()  # the GKE variant, documented


def test_the_container_command_exits_75_when_preempted(container, tmp_path):
    """Run the manifest's command as a pod would (root from the environment, $(VAR) expanded by us)."""
    env = {**os.environ, spot.ROOT_ENV: str(tmp_path / "ckpt"), "PYTHONUNBUFFERED": "1"}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["command"] + container["args"]]
    argv = [sys.executable] + argv[1:] + ["--steps", "12", "--save-every", "4", "--preempt-at", "6"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == EXIT_PREEMPTED, done.stdout + done.stderr
    assert "preempted (SIGTERM) at step 7" in done.stdout, done.stdout + done.stderr
    latest = checkpoints(env[spot.ROOT_ENV])[-1]  # the next pod resumes from this one
    assert (latest.name, latest.reason) == ("checkpoint_step_00000007.ckpt", "preemption")
