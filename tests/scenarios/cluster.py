"""Multi-node scenarios, each in its own process with its own Ray cluster:

    python -m tests.scenarios.cluster placement --out DIR   # 2 worker nodes, PACK and SPREAD
    python -m tests.scenarios.cluster autoscale --out DIR   # a head too small; the autoscaler adds nodes

Each writes DIR/result.json for `tests/test_cluster.py` to check. `autoscale` runs
`ray stop --force` (the fake multi-node provider needs a head started by `ray start`), so it
must not share the machine with another Ray: `make test-cluster` runs these on their own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rayft import checkpoint as ckpt
from rayft.config import validate_config
from rayft.trainer import fit
from tests.conftest import base_config
from tests.fixtures.data import WORDS, sentiment_splits
from tests.fixtures.models import tiny_bert


def small_run(root: Path, name: str, **sections) -> dict:
    """A 2-worker ZeRO-2 run of 2 epochs on 95 rows, one checkpoint per epoch."""
    if not (root / "model").exists():
        tiny_bert(root / "model", WORDS)
    raw = base_config(
        str(root / "model"),
        sentiment_splits(root / "data", 95, 16, seed=3),
        root / name,
        train={"epochs": 2, "batch_size": 8, "lr": 2e-3, "log_every_steps": 100},
        run_name=name,
        storage_path=str(root / "shared-storage"),  # every node's checkpoints land here
        **sections,
    )
    raw["data"]["cache_dir"] = str(root / "prepared")
    raw["eval"]["report"] = False
    return raw


def worker_nodes(storage: Path, run: str) -> dict:
    """Which node wrote each rank's shard of the run's newest checkpoint, and its steps."""
    paths = ckpt.checkpoints_of_run(str(storage / run))
    newest = paths[-1]
    state = ckpt.check_complete(newest)  # every rank's files present, at their sizes
    nodes = {}
    for rank in range(state["world_size"]):
        saved = torch.load(
            Path(newest, ckpt.DS_DIR, ckpt.WORKER_FILE.format(rank=rank)), weights_only=True
        )
        nodes[rank] = saved["node_id"]
    return {"checkpoints": len(paths), "step": state["step"], "rank_nodes": nodes}


def placement(out: Path) -> dict:
    """A head with no CPUs for training and two 2-CPU worker nodes: PACK puts both
    workers on one node, SPREAD one on each (gloo rendezvous across nodes)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address)
    result: dict = {"worker_nodes": [n.node_id for n in workers], "runs": {}}
    try:
        for strategy in ("SPREAD", "PACK"):
            name = strategy.lower()
            raw = small_run(out, name, scaling={"num_workers": 2, "placement_strategy": strategy})
            metrics = fit(validate_config(raw))
            result["runs"][strategy] = {
                "step": metrics["step"],
                "accuracy": metrics["accuracy"],
                **worker_nodes(out / "shared-storage", name),
            }
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


FAKE_CLUSTER = {
    "cluster_name": "rayft-fake",
    "max_workers": 2,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        # A training worker needs 1 CPU; the head has none to spare for two.
        "ray.worker.cpu": {
            "resources": {"CPU": 2},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 2,
        },
    },
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.25,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


def alive_workers(ray) -> list[str]:
    return [
        n["NodeID"]
        for n in ray.nodes()
        if n["Alive"] and n["Resources"].get("CPU", 0) >= 2  # the worker node type
    ]


def autoscale(out: Path) -> dict:
    """Ray's fake multi-node autoscaler: the run's 2 workers do not fit on the 1-CPU
    head, so worker nodes are launched; once the run is done and they idle past
    `idle_timeout_minutes`, they are removed."""
    import threading

    import ray

    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_bin, "stop", "--force"], check=True, capture_output=True)
    config = Path(tempfile.mkdtemp()) / "fake-cluster.json"
    config.write_text(json.dumps(FAKE_CLUSTER))
    env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
    subprocess.run(
        [ray_bin, "start", "--head", f"--autoscaling-config={config}", "--num-cpus=1",
         "--include-dashboard=false"],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    result: dict = {}
    try:
        ray.init(address="auto")
        result["workers_before"] = len(alive_workers(ray))
        seen: set[str] = set()
        done = threading.Event()

        def watch() -> None:  # the nodes the autoscaler brings up during the run
            while not done.is_set():
                seen.update(alive_workers(ray))
                time.sleep(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.time()
        metrics = fit(validate_config(small_run(out, "autoscaled")))
        result["run_seconds"] = time.time() - started
        done.set()
        watcher.join()
        result.update(step=metrics["step"], workers_during=sorted(seen))
        result.update(worker_nodes(out / "shared-storage", "autoscaled"))
        waited = time.time()
        while alive_workers(ray) and time.time() - waited < 180:
            time.sleep(1)
        result["workers_after"] = len(alive_workers(ray))
        result["scale_down_seconds"] = time.time() - waited
    finally:
        ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["placement", "autoscale"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = placement(out) if args.scenario == "placement" else autoscale(out)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
