"""`rayft export`: a Hugging Face model directory from a training checkpoint.

A checkpoint holds every rank's ZeRO shard and, in `rayft_state.json`, the run's config,
labels and new-head names. The shards are consolidated into one fp32 state dict with
DeepSpeed's own `zero_to_fp32` (stages 1-3; a stage-0 checkpoint holds the whole module),
then written as safetensors with the tokenizer, as the end of a run does: the same code
(`checkpoint.export_model`), so both exports load and predict alike.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import torch

from rayft import checkpoint as ckpt
from rayft.config import ConfigError, RayftConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def consolidated_state(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The model's full fp32 weights from every rank's shard."""
    ds_dir = os.path.join(checkpoint_dir, ckpt.DS_DIR)
    tag_dir = os.path.join(ds_dir, ckpt.TAG)
    if any(name.endswith("optim_states.pt") for name in os.listdir(tag_dir)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=ckpt.TAG)
        return {k: v.float() for k, v in state.items()}
    # ZeRO stage 0: rank 0's file holds the whole module (a pickle of the run's own
    # storage, hence not weights_only: DeepSpeed stores its config objects beside it).
    saved = torch.load(
        os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False
    )
    return {k: v.float() for k, v in saved["module"].items()}


def export_checkpoint(
    checkpoint_dir: str, out_dir: str, *, merge_lora: bool = True, dtype: str = "fp32"
) -> str:
    """Write `out_dir`: the model (LoRA merged into it with `merge_lora`, else the peft
    adapter) with its tokenizer and label maps. Returns what was written."""
    if not os.path.isdir(checkpoint_dir):
        raise ConfigError([f"--checkpoint {checkpoint_dir}: no such directory"])
    try:
        state = ckpt.read_state(checkpoint_dir)  # every rank's shard must be there
    except ckpt.IncompleteCheckpoint as exc:
        raise ConfigError([f"--checkpoint: {exc}; pick a complete checkpoint"]) from None
    if "config" not in state:
        raise ConfigError(
            [f"--checkpoint {checkpoint_dir}: written by an older rayft without the run's "
             "config; export its run's model/ directory instead"]
        )  # fmt: skip
    if dtype not in DTYPES:
        raise ConfigError([f"--dtype {dtype}: use one of {', '.join(DTYPES)}"])
    cfg = RayftConfig.model_validate(state["config"])
    weights = consolidated_state(checkpoint_dir)
    with tempfile.TemporaryDirectory(prefix="rayft-export-") as staging:
        ckpt.export_model(
            weights, cfg, state["labels"], state["heads"], staging, dtype=DTYPES[dtype]
        )
        chosen = ckpt.ADAPTER_DIR if cfg.method == "lora" and not merge_lora else ckpt.MODEL_DIR
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(os.path.join(staging, chosen), out_dir)
    return out_dir


def main_args(args: Any) -> int:
    out = export_checkpoint(args.checkpoint, args.out, merge_lora=args.merge_lora, dtype=args.dtype)
    print(f"exported {args.checkpoint} to {out}")
    return 0
