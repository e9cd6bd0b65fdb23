"""Training checkpoints (DeepSpeed shards + rayft state) and Hugging Face exports.

A checkpoint directory, as Ray Train merges it from every worker:

    rayft_state.json            written by rank 0: phase, epoch, step, world size, metrics
    deepspeed/ckpt/...          each rank's ZeRO shard, written by that rank
    deepspeed/complete.rank<r>  written by rank r once its shard is on disk
    model/, adapter/            only in the final checkpoint: the exported model
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rayft.config import RayftConfig

STATE_FILE = "rayft_state.json"
DS_DIR = "deepspeed"
TAG = "ckpt"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
RUN_INFO = "rayft.json"


class IncompleteCheckpoint(RuntimeError):
    pass


def save_training_state(engine: Any, state: dict[str, Any], rank: int) -> str:
    """Every rank writes its shard into its own local temp dir (Ray merges them)."""
    root = tempfile.mkdtemp(prefix="rayft-ckpt-")
    ds_dir = os.path.join(root, DS_DIR)
    engine.save_checkpoint(ds_dir, tag=TAG)
    Path(ds_dir, f"complete.rank{rank}").touch()
    if rank == 0:
        Path(root, STATE_FILE).write_text(json.dumps(state, indent=2))
    return root


def read_state(directory: str) -> dict[str, Any]:
    """The rayft state of a checkpoint, after checking that every rank's shard arrived."""
    state_path = Path(directory, STATE_FILE)
    if not state_path.is_file():
        raise IncompleteCheckpoint(f"{directory}: no {STATE_FILE}")
    state = json.loads(state_path.read_text())
    missing = [
        r
        for r in range(state["world_size"])
        if not Path(directory, DS_DIR, f"complete.rank{r}").is_file()
    ]
    if missing:
        raise IncompleteCheckpoint(f"{directory}: shards of rank(s) {missing} are missing")
    return state


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
