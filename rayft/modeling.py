"""Loading pretrained models and tokenizers the same way on the driver and in workers."""

from __future__ import annotations

import functools
from typing import Any

import torch

from rayft.config import RayftConfig
from rayft.tasks import Task

# Heads transformers puts on top of a backbone; trained from scratch by `frozen`,
# `two_stage` and kept trainable (modules_to_save) by `lora`.
KNOWN_HEADS = ("classifier", "pre_classifier", "score", "qa_outputs")


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        # Decoder tokenizers often have no pad token; padding positions are masked anyway.
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {path} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(cfg: RayftConfig):
    """The run's tokenizer (cached per process: Ray Data tasks reuse their workers)."""
    m = cfg.model
    return _load_tokenizer(m.tokenizer or m.name_or_path, m.revision, m.trust_remote_code)


def torch_dtype(cfg: RayftConfig) -> torch.dtype:
    precision = cfg.deepspeed.precision
    if precision == "auto":
        precision = "bf16" if cfg.scaling.use_gpu and _gpu_supports_bf16() else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def _gpu_supports_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def build_model(task: Task, cfg: RayftConfig, labels: list[str]) -> tuple[Any, list[str]]:
    """Load the pretrained model with the task's head; return it and the names of the
    modules whose weights were not in the checkpoint (the new head) or are known heads."""
    m = cfg.model
    model, info = task.auto_class().from_pretrained(
        m.name_or_path,
        config=model_config(task, cfg, labels),
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        dtype=torch_dtype(cfg),
        output_loading_info=True,
        **attention_kwargs(cfg),
    )
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, head_modules(model, info.get("missing_keys", ()))


def attention_kwargs(cfg: RayftConfig) -> dict[str, Any]:
    """`model.attn_implementation` for `from_pretrained` (nothing: transformers decides)."""
    choice = cfg.model.attn_implementation
    return {} if choice == "auto" else {"attn_implementation": choice}


def build_skeleton(task: Task, cfg: RayftConfig, labels: list[str]) -> Any:
    """The same architecture with untrained weights (to load a trained state dict into)."""
    return task.auto_class().from_config(
        model_config(task, cfg, labels),
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=torch.float32,
    )


def model_config(task: Task, cfg: RayftConfig, labels: list[str]) -> Any:
    """The checkpoint's config with the task's head settings and `model.config_overrides`."""
    from transformers import AutoConfig

    m = cfg.model
    config = AutoConfig.from_pretrained(
        m.name_or_path,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        **task.model_kwargs(labels),
    )
    for key, value in m.config_overrides.items():
        if not hasattr(config, key):
            raise ValueError(
                f"model.config_overrides: {type(config).__name__} has no attribute '{key}'"
            )
        setattr(config, key, value)
    # Decoders classify from the last non-pad token, so they must know which id pads.
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = load_tokenizer(cfg).pad_token_id
    return config


def head_modules(model: torch.nn.Module, missing_keys: Any) -> list[str]:
    """Module paths that hold newly initialized weights, or a known head name."""
    names = {name for name, _ in model.named_modules()}
    heads = {name for name in KNOWN_HEADS if name in names}
    for key in missing_keys:
        module = key.rpartition(".")[0]
        if module in names:
            heads.add(module)
    # Keep the outermost paths only ("classifier" covers "classifier.dense").
    return sorted(h for h in heads if not any(h.startswith(o + ".") for o in heads if o != h))


def in_modules(param_name: str, modules: list[str]) -> bool:
    return any(param_name == m or param_name.startswith(m + ".") for m in modules)
