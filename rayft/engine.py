"""DeepSpeed: our config -> a DeepSpeed config -> an initialized engine."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from rayft.config import RayftConfig, deep_merge, zero_stage
from rayft.modeling import torch_dtype

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def deepspeed_config(cfg: RayftConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this run; `deepspeed.overrides` is merged over it last."""
    t, ds = cfg.train, cfg.deepspeed
    dtype = torch_dtype(cfg)
    stage = zero_stage(cfg, world_size)
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True}
    if cfg.scaling.use_gpu:
        zero["overlap_comm"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16, "loss_scale": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # rayft prints its own progress
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's own CPUAdam.
        conf["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": list(ADAM_BETAS), "eps": ADAM_EPS},
        }
    return deep_merge(conf, ds.overrides)


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, with no weight decay on biases and norm weights (ndim < 2)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    return [g for g in groups if g["params"]]


def lr_lambda(cfg: RayftConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``step``: warmup, then decay."""
    t = cfg.train
    warmup = min(int(t.warmup_ratio * total_steps), max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if t.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(progress, 1.0)
        if t.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def initialize(
    model: torch.nn.Module, cfg: RayftConfig, lr: float, total_steps: int, world_size: int
) -> Any:
    """Wrap ``model`` (its trainable parameters as set by the method) in a DeepSpeed engine."""
    import deepspeed

    conf = deepspeed_config(cfg, world_size)
    groups = param_groups(model, lr, cfg.train.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: the method froze everything")
    optimizer = None
    if "optimizer" not in conf:
        # torch's fused AdamW (one kernel per step over every tensor), on CPU as on CUDA;
        # nothing to compile. torch picks it by itself on neither: on CPU its default is a
        # per-tensor loop, several times slower (benchmarks/RESULTS.md, "The optimizer").
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
    else:
        conf["optimizer"]["params"]["lr"] = lr
    schedule = lr_lambda(cfg, total_steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=conf,
        dist_init_required=False,
    )
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        # Alone, a rank's gradients are already the global ones: skip DeepSpeed's
        # flatten + all-reduce + copy-back of every gradient at each step.
        engine.enable_backward_allreduce = False
    return engine


def zero3_init_context(cfg: RayftConfig, world_size: int) -> Any:
    """Under ZeRO-3, build models already partitioned (transformers reads this object while
    it exists), so no rank ever holds a whole multi-billion-parameter model."""
    if zero_stage(cfg, world_size) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_config(cfg, world_size))
