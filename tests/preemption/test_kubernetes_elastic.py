"""examples/kubernetes/elastic-job.yaml: an Indexed Job of torchrun agents (--nnodes=MIN:MAX) that agrees
with itself, with the training script it runs and with the library."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from cloudckpt.preemption import EXIT_PREEMPTED, PreemptionWatcher
from preempt_worker import REPO

MANIFEST = REPO / "examples" / "kubernetes" / "elastic-job.yaml"


@pytest.fixture(scope="module")
def documents() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


@pytest.fixture(scope="module")
def job(documents) -> dict:
    (job,) = [d for d in documents if d.get("kind") == "Job"]
    return job


@pytest.fixture(scope="module")
def argv(job) -> list[str]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container["command"] + container["args"]


def _flag(argv: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    return value


def test_indexed_job_runs_up_to_max_pods_of_one_agent_each(job, argv):
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["template"]["spec"]["restartPolicy"] == "Never"
    low, high = (int(n) for n in _flag(argv, "nnodes").split(":"))
    assert 1 <= low < high == spec["parallelism"] == spec["completions"]
    assert _flag(argv, "nproc-per-node") == "1" and int(_flag(argv, "max-restarts")) >= high


def test_rendezvous_endpoint_is_pod_zero_through_the_headless_service(job, documents, argv):
    (service,) = [d for d in documents if d.get("kind") == "Service"]
    assert service["spec"]["clusterIP"] == "None"
    pod = job["spec"]["template"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    host, port = _flag(argv, "rdzv-endpoint").rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"  # Indexed Job pod 0's name
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]


def test_preemption_is_not_a_failure_and_the_grace_period_fits(job):
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert any(r["action"] == "Ignore" and any(c["type"] == "DisruptionTarget" for c in r["onPodConditions"])
               for r in rules if "onPodConditions" in r)
    assert any(r["action"] == "Ignore" and EXIT_PREEMPTED in r["onExitCodes"]["values"]
               for r in rules if "onExitCodes" in r)
    grace = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > PreemptionWatcher(signals=()).deadline


def test_the_script_exists_and_takes_the_root_from_the_environment(job, argv):
    script = next(a for a in argv if a.endswith(".py"))
    assert (REPO / script).is_file()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"] for e in container["env"]}
    assert set(re.findall(r"\$\((\w+)\)", " ".join(argv))) <= env
    assert argv[argv.index("--root") + 1] == "$(CLOUDCKPT_ROOT)"
    done = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--root" in done.stdout
