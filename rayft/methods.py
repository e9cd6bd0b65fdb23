"""Fine-tuning methods as a sequence of phases, each with its own trainable set and lr.

``full``       all weights, one phase
``lora``       peft adapters (+ the new head), one phase
``frozen``     the new head only on a frozen body (feature extraction), one phase
``two_stage``  the head alone for `two_stage.head_epochs`, then all weights at `train.lr`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from rayft.config import RayftConfig
from rayft.modeling import in_modules


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    lr: float
    trainable: Literal["all", "head", "adapter"]


def phases(cfg: RayftConfig) -> list[Phase]:
    t = cfg.train
    if cfg.method == "full":
        return [Phase("full", t.epochs, t.lr, "all")]
    if cfg.method == "lora":
        return [Phase("lora", t.epochs, t.lr, "adapter")]
    if cfg.method == "frozen":
        return [Phase("head", t.epochs, t.lr, "head")]
    if cfg.method == "two_stage":
        s = cfg.two_stage
        return [
            Phase("head", s.head_epochs, s.head_lr, "head"),
            Phase("full", t.epochs, t.lr, "all"),
        ]
    raise ValueError(f"unknown method {cfg.method!r}")


def lora_config(cfg: RayftConfig, heads: list[str], task_type: str) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        modules_to_save=sorted({*heads, *cfg.lora.modules_to_save}) or None,
    )


def apply(model: torch.nn.Module, heads: list[str], cfg: RayftConfig, phase: Phase, task_type: str):
    """Set which weights train in ``phase``; returns the (possibly peft-wrapped) model."""
    if phase.trainable == "adapter":
        from peft import get_peft_model

        try:
            return get_peft_model(model, lora_config(cfg, heads, task_type))
        except ValueError as exc:
            if "target_modules" in str(exc):
                raise ValueError(
                    f"lora.target_modules: peft has no default for model type "
                    f"'{model.config.model_type}'; set lora.target_modules "
                    f"(e.g. [q_proj, v_proj]): {exc}"
                ) from None
            raise
    for name, param in model.named_parameters():
        param.requires_grad = phase.trainable == "all" or in_modules(name, heads)
    return model


def trainable_summary(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitioned params count in full."""

    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)
