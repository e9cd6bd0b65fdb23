"""Training checkpoints (DeepSpeed shards + rayft state) and Hugging Face exports.

A checkpoint directory, as Ray Train merges it from every worker:

    rayft_state.json            written by rank 0: phase, epoch, step, world size, metrics
    deepspeed/ckpt/...          each rank's ZeRO shard, written by that rank
    deepspeed/worker.rank<r>.pt rank r's RNG states and running totals (weights_only)
    deepspeed/complete.rank<r>  written by rank r last: the size of every file it wrote
    model/, adapter/            only in the final checkpoint: the exported model

A checkpoint is used only when complete: the state file is there and every rank's files
are there at the sizes their marker records, so one cut short while being written (a
node lost mid-save, a full disk) is told apart from a good one.
"""

from __future__ import annotations

import glob
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rayft.config import RayftConfig, zero_stage

STATE_FILE = "rayft_state.json"
DS_DIR = "deepspeed"
TAG = "ckpt"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
RUN_INFO = "rayft.json"


WORKER_FILE = "worker.rank{rank}.pt"
MARKER_FILE = "complete.rank{rank}"
LOCAL_PREFIX = "rayft-ckpt-"  # each save's local temp dir, removed once Ray has copied it


class IncompleteCheckpoint(RuntimeError):
    pass


def save_training_state(
    engine: Any, state: dict[str, Any], rank: int, worker: dict[str, Any] | None = None
) -> str:
    """Every rank writes its shard (and its own RNG states and totals, ``worker``) into
    its own local temp dir, which Ray merges with the others; the completion marker,
    listing every file the rank wrote and its size, comes last."""
    root = tempfile.mkdtemp(prefix=LOCAL_PREFIX)
    ds_dir = os.path.join(root, DS_DIR)
    engine.save_checkpoint(ds_dir, tag=TAG)
    if worker is not None:
        torch.save(worker, os.path.join(ds_dir, WORKER_FILE.format(rank=rank)))
    if rank == 0:
        Path(root, STATE_FILE).write_text(json.dumps(state, indent=2))
    written = {
        str(path.relative_to(root)): path.stat().st_size
        for path in sorted(Path(root).rglob("*"))
        if path.is_file()
    }
    Path(ds_dir, MARKER_FILE.format(rank=rank)).write_text(json.dumps(written, indent=1))
    return root


def local_copies() -> set[str]:
    """The local checkpoint directories on this machine not (yet) removed: those of saves
    still being copied to storage, and any a killed worker left behind."""
    return set(glob.glob(os.path.join(tempfile.gettempdir(), f"{LOCAL_PREFIX}*")))


def read_state(directory: str) -> dict[str, Any]:
    """The rayft state of a local checkpoint directory, once `check_complete` passes."""
    check_complete(directory)
    return json.loads(Path(directory, STATE_FILE).read_text())


def check_complete(path: str, filesystem: Any = None) -> dict[str, Any]:
    """The checkpoint's rayft state if every rank's files are there at the sizes their
    markers recorded; IncompleteCheckpoint saying what is missing otherwise. Works on
    storage URIs (or a pyarrow ``filesystem``) without downloading the shards."""
    import pyarrow.fs as pafs

    from rayft.data.fs import _resolve

    if filesystem is None:
        filesystem, path = _resolve(path)

    def read(relative: str) -> str | None:
        where = f"{path.rstrip('/')}/{relative}"
        if filesystem.get_file_info(where).type != pafs.FileType.File:
            return None
        with filesystem.open_input_stream(where) as stream:
            return stream.read().decode()

    text = read(STATE_FILE)
    if text is None:
        raise IncompleteCheckpoint(f"{path}: no {STATE_FILE}")
    try:
        state = json.loads(text)
        world = int(state["world_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise IncompleteCheckpoint(f"{path}: unreadable {STATE_FILE} ({exc})") from None
    selector = pafs.FileSelector(path, recursive=True)
    sizes = {
        info.path[len(path.rstrip("/")) + 1 :]: info.size
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File
    }
    markers = {}
    for rank in range(world):
        marker = read(f"{DS_DIR}/{MARKER_FILE.format(rank=rank)}")
        if marker is None:
            raise IncompleteCheckpoint(
                f"{path}: rank {rank} of {world} never finished writing its shard"
            )
        try:
            markers[rank] = json.loads(marker)
        except ValueError:
            raise IncompleteCheckpoint(f"{path}: rank {rank}'s marker is cut short") from None
    for rank, expected in markers.items():
        for name, size in expected.items():
            if sizes.get(name) != size:
                found = "missing" if name not in sizes else f"{sizes[name]} bytes"
                raise IncompleteCheckpoint(
                    f"{path}: {name} of rank {rank} is {found}, expected {size} bytes"
                )
    return state


def newest_complete(
    paths: list[str], filesystem: Any = None
) -> tuple[str, dict[str, Any], list[str]]:
    """The newest complete checkpoint of ``paths`` (oldest first), its state, and why each
    newer one was passed over. IncompleteCheckpoint when none is complete: a run that
    was asked to resume must not quietly start again at step 0."""
    skipped = []
    for path in reversed(paths):
        try:
            return path, check_complete(path, filesystem), skipped
        except IncompleteCheckpoint as exc:
            skipped.append(str(exc))
    raise IncompleteCheckpoint(
        "no complete checkpoint to resume from (refusing to start again at step 0): "
        + ("; ".join(skipped) or "none found")
    )


def resume_candidate(run_dir: str) -> tuple[str, dict[str, Any], list[str]] | None:
    """The newest complete checkpoint of a run (path, state, why newer ones were passed
    over); None when the run has no checkpoint at all. IncompleteCheckpoint when it has
    some but none complete."""
    paths = checkpoints_of_run(run_dir)
    return newest_complete(paths) if paths else None


def saved_zero_stage(state: dict[str, Any]) -> int | None:
    """The ZeRO stage a checkpoint's run used: recorded as `zero_stage` since
    `deepspeed.stage: auto`, before that its config's stage (then always a number)."""
    if "zero_stage" in state:
        return state["zero_stage"]
    stage = state.get("config", {}).get("deepspeed", {}).get("stage")
    return stage if isinstance(stage, int) else None


def resume_problem(path: str, state: dict[str, Any], cfg: RayftConfig, world: int) -> str | None:
    """Why this run cannot continue from the checkpoint at ``path`` (its ``state``): a
    ZeRO checkpoint holds one shard per rank, laid out by its stage, so it resumes only
    at its own world size and stage. None when it can."""
    export = f"`rayft export --checkpoint {path}` and start a new run from the exported model"
    saved = state["world_size"]
    if saved != world:
        return (
            f"{path} was written by {saved} workers and this run has {world}: a ZeRO "
            f"checkpoint resumes only at its own world size. Set scaling.num_workers={saved}, "
            f"or {export}"
        )
    stage, now = saved_zero_stage(state), zero_stage(cfg, world)
    if stage is not None and stage != now:
        return (
            f"{path} was written at ZeRO stage {stage} and this run's deepspeed.stage "
            f"({cfg.deepspeed.stage}) is stage {now}: a ZeRO checkpoint resumes only at its "
            f"own stage. Set deepspeed.stage={stage}, or {export}"
        )
    return None


def checkpoints_of_run(run_dir: str, filesystem: Any = None) -> list[str]:
    """The checkpoint directories Ray Train wrote for a run, oldest first (their names
    hold the time they were saved). Paths are ``run_dir``'s kind: a URI or local path,
    or paths within ``filesystem`` when one is given."""
    import pyarrow.fs as pafs

    from rayft.data.fs import _resolve, join

    where = run_dir
    if filesystem is None:
        filesystem, where = _resolve(run_dir)
    selector = pafs.FileSelector(where, allow_not_found=True)
    names = sorted(
        info.base_name
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )
    return [join(run_dir, name) for name in names]


def restore_training_state(engine: Any, directory: str) -> None:
    load_path, _ = engine.load_checkpoint(
        os.path.join(directory, DS_DIR),
        tag=TAG,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise IncompleteCheckpoint(f"{directory}: DeepSpeed found no checkpoint to load")


def set_base_lr(engine: Any, lr: float) -> bool:
    """Continue a restored run at another peak learning rate (PBT's perturbation): the
    schedule keeps its position, scaled to the new peak. True if anything changed."""
    scheduler = engine.lr_scheduler
    if scheduler is None or all(math.isclose(b, lr) for b in scheduler.base_lrs):
        return False
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = lr * factor(scheduler.last_epoch)
    return True


def gather_params(model: torch.nn.Module, only_trainable: bool = True) -> dict[str, torch.Tensor]:
    """Full copies of (trainable) parameters on every rank, ZeRO-3 partitions gathered."""
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not only_trainable]
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().to("cpu", copy=True) for n, p in named}


def load_params(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``model``'s parameters (also when ZeRO-3 partitioned them)."""
    import deepspeed

    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise KeyError(f"carried parameters not in the model: {unknown[:5]}")
    targets = [params[n] for n in tensors]
    with deepspeed.zero.GatheredParameters(targets, modifier_rank=0), torch.no_grad():
        for name, value in tensors.items():
            params[name].data.copy_(value.to(params[name].dtype))


def full_state_dict(engine: Any, rank: int) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere). Collective under ZeRO-3."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        return {k: v.cpu() for k, v in state.items()} if rank == 0 else None
    if rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def export_model(
    state: dict[str, torch.Tensor],
    cfg: RayftConfig,
    labels: list[str],
    heads: list[str],
    out_dir: str,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write a Hugging Face model directory (safetensors + tokenizer + label maps) from a
    full state dict; for LoRA also the peft adapter, and the merged model as the model."""
    from rayft.methods import lora_config
    from rayft.modeling import build_skeleton, load_tokenizer
    from rayft.tasks import get_task

    task = get_task(cfg.task)
    model = build_skeleton(task, cfg, labels)
    tokenizer = load_tokenizer(cfg)
    model_dir = os.path.join(out_dir, MODEL_DIR)
    if cfg.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg, heads, task.peft_task_type))
        model.load_state_dict(state, strict=True)
        adapter_dir = os.path.join(out_dir, ADAPTER_DIR)
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        model = model.merge_and_unload()
    else:
        model.load_state_dict(state, strict=True)
    model.to(dtype).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    info = {
        "task": cfg.task,
        "method": cfg.method,
        "labels": labels,
        "base_model": cfg.model.name_or_path,
        "max_seq_len": cfg.train.max_seq_len,
    }
    Path(model_dir, RUN_INFO).write_text(json.dumps(info, indent=2))


@contextmanager
def local_dir(checkpoint: Any) -> Iterator[str]:
    with checkpoint.as_directory() as directory:
        yield directory
