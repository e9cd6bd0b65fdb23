"""Multi-node runs on this one machine: Ray's in-process `Cluster` (2 worker nodes) and
its fake multi-node autoscaler. Each scenario runs in its own process with its own Ray
(tests/scenarios/cluster.py); `make test-cluster` runs them apart from the rest, since the
autoscaler's head needs `ray stop --force`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]


def scenario(name: str, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "tests.scenarios.cluster", name, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return json.loads((out / "result.json").read_text())


def test_workers_spread_or_pack_across_nodes(tmp_path):
    """Two 2-CPU worker nodes: SPREAD puts the 2 training workers on different nodes (gloo
    rendezvous across nodes), PACK on one; both runs finish with complete checkpoints in
    the shared storage path, written by the nodes the workers ran on."""
    result = scenario("placement", tmp_path)
    workers = set(result["worker_nodes"])
    spread, pack = result["runs"]["SPREAD"], result["runs"]["PACK"]
    for run in (spread, pack):
        assert run["step"] == 12 and run["checkpoints"] >= 1
        assert set(run["rank_nodes"].values()) <= workers  # not on the 1-CPU head
    assert len(set(spread["rank_nodes"].values())) == 2
    assert len(set(pack["rank_nodes"].values())) == 1


def test_autoscaler_adds_nodes_for_a_run_and_removes_them_when_idle(tmp_path):
    """The head has 1 CPU and the run needs 2 workers of 1 CPU: the autoscaler launches
    worker nodes, the run completes on them, and they are removed after the idle timeout."""
    result = scenario("autoscale", tmp_path)
    assert result["workers_before"] == 0
    assert result["step"] == 12
    assert result["workers_during"], "the autoscaler never added a node"
    assert set(result["rank_nodes"].values()) <= set(result["workers_during"])
    assert result["workers_after"] == 0, f"nodes still up after {result['scale_down_seconds']}s"
