"""Training in the driver's own process (`scaling.in_process`): Ray Train's local mode.

Ray Train runs the training function here instead of in a worker group, so a run starts
and stops no worker, controller or coordinator process. Its local mode hands the function
the datasets and keeps the last report; the rest of what a controller does for a worker
group is done here, so that a run reads the same either way:

- every checkpoint reported is moved into the run's directory in `storage_path`, under the
  name Ray Train gives its checkpoints (`--resume`, `rayft export` and the selected
  checkpoint find it there);
- the best `checkpoint.keep` by `checkpoint.metric` stay, and the newest always does;
- the run's callbacks (tracking) see every report, as they would from a controller;
- the process has what Ray Train gives a worker: a torch.distributed group of one rank,
  `scaling.cpus_per_worker` torch threads, and data read in order, with Ray Data kept
  off the CPUs the training uses.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from rayft.config import RayftConfig
from rayft.data import fs

CONFIG_KEY = "in_process"  # the Keeper's key in train_loop_config (passed by reference)
REPORTS_LOGGER = "ray.train.v2._internal.execution.train_fn_utils"


def checkpoint_dir_name() -> str:
    """The name Ray Train gives a checkpoint: the time it was saved, which sorts."""
    return datetime.now().strftime("checkpoint_%Y-%m-%d_%H-%M-%S.%f")


class Keeper:
    """The checkpoints and reports of one in-process run."""

    def __init__(
        self, run_dir: str, keep: int, metric: str, mode: str, callbacks: list[Any]
    ) -> None:
        self.run_dir = run_dir
        self.keep = keep
        self.metric = metric
        self.sign = 1.0 if mode == "max" else -1.0
        self.callbacks = callbacks
        self.kept: list[tuple[Any, dict[str, Any]]] = []  # (Checkpoint, metrics), oldest first

    def report(self, metrics: dict[str, Any], directory: str | None) -> Any:
        """Move ``directory`` (a local checkpoint, or None) into storage, drop the ones
        no longer kept, tell the callbacks; the stored Checkpoint, or None."""
        import ray.train

        checkpoint = None
        if directory is not None:
            target = fs.move_tree(directory, fs.join(self.run_dir, checkpoint_dir_name()))
            checkpoint = ray.train.Checkpoint(target)
            self.kept.append((checkpoint, dict(metrics)))
            self._prune()
        for callback in self.callbacks:
            callback.after_report(None, [metrics], checkpoint)
        return checkpoint

    def _score(self, metrics: dict[str, Any]) -> float:
        """Higher is better; a checkpoint without a finite score ranks last."""
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return -math.inf
        return self.sign * value

    def _prune(self) -> None:
        if len(self.kept) <= self.keep:
            return
        ranked = sorted(self.kept, key=lambda item: self._score(item[1]), reverse=True)
        dropped = [item for item in ranked[self.keep :] if item is not self.kept[-1]]
        for checkpoint, _ in dropped:
            fs.remove(checkpoint.path)
        self.kept = [item for item in self.kept if all(item is not d for d in dropped)]

    def result(self, local: Any) -> Any:
        """Ray Train's local-mode Result, with what a controller's would hold: the
        stored final checkpoint, the kept checkpoints and the run's directory."""
        import ray.train

        return ray.train.Result(
            metrics=local.metrics,
            checkpoint=self.kept[-1][0] if self.kept else local.checkpoint,
            error=None,
            path=self.run_dir,
            metrics_dataframe=None,
            best_checkpoints=list(self.kept),
            return_value=local.return_value,
        )


def ingest(dataset: Any, cfg: RayftConfig) -> Any:
    """``dataset`` as Ray Train's ingest would give it to a worker: read in order, and
    with the worker's CPUs (and GPU) left out of what Ray Data may use, since no worker
    holds them here. A split already in the object store runs nothing, and stays."""
    from ray.data import ExecutionResources
    from ray.data.dataset import MaterializedDataset

    from rayft.trainer import ingest_options

    if isinstance(dataset, MaterializedDataset):
        return dataset
    s = cfg.scaling
    options = ingest_options()
    options.exclude_resources = options.exclude_resources.add(
        ExecutionResources(cpu=s.cpus_per_worker, gpu=1 if s.use_gpu else 0)
    )
    copy = dataset.copy(dataset)
    copy.context.execution_options = options
    return copy


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def release_group() -> None:
    """Destroy this process's torch.distributed group, if any, and make DeepSpeed forget
    the subgroups it cached for it (a clone of the world group among them). DeepSpeed lets
    go of them only when a group is destroyed through `deepspeed.comm`; Ray Train's local
    mode, a notebook or a test destroy it through torch, and the next engine in the
    process would then use a group that no longer exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    release = getattr(groups, "_release_process_group_references", None)  # DeepSpeed 0.19
    if release is not None:
        release(None)


@contextmanager
def worker_environment(cfg: RayftConfig) -> Iterator[None]:
    """This process set up as Ray Train sets up a worker of one: a torch.distributed
    group of one rank (gloo, or NCCL on a GPU) that DeepSpeed adopts, torch's threads
    at `scaling.cpus_per_worker`. Everything is put back afterwards, the group
    destroyed, so the process can run again."""
    import torch
    import torch.distributed as dist

    from rayft.trainer import RUNTIME_ENV

    if dist.is_initialized():
        raise RuntimeError(
            "scaling.in_process: torch.distributed is already initialized in this process; "
            "run rayft in a process of its own, or set scaling.in_process=false"
        )
    # Not LOCAL_WORLD_SIZE: with all of torchrun's variables Ray Train's local mode would
    # build the group itself, with NCCL wherever CUDA exists; this one follows use_gpu.
    variables = {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
        **RUNTIME_ENV["env_vars"],
    }  # fmt: skip
    saved_env = {key: os.environ.get(key) for key in variables}
    threads = torch.get_num_threads()
    # Local mode logs every report whole (history included); rank 0's lines say enough.
    reports_log = logging.getLogger(REPORTS_LOGGER)
    level = reports_log.level
    reports_log.setLevel(logging.WARNING)
    os.environ.update(variables)
    try:
        if not cfg.scaling.use_gpu:
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        release_group()  # what an engine before this run left behind
        dist.init_process_group(
            "nccl" if cfg.scaling.use_gpu else "gloo",
            init_method=f"tcp://127.0.0.1:{variables['MASTER_PORT']}",
            rank=0,
            world_size=1,
        )
        yield
    finally:
        release_group()
        torch.set_num_threads(threads)
        reports_log.setLevel(level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
