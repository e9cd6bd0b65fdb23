"""Memory planner: the memory each GPU (or CPU worker) needs for a run, and the cheapest
setting that fits (`rayft plan`; docs/plan.md).

The estimate is a pure function of numbers (`estimate`): parameter counts, model
dimensions, ZeRO stage, offload, micro-batch, sequence length, precision and world size.
`model_shape` reads those numbers from a config by building the model on torch's ``meta``
device (no weights are read or allocated) and applying the run's method to it, so LoRA and
`frozen` count only what they train. Terms, per worker:

- model states, ZeRO paper (Rajbhandari et al. 2020): mixed precision keeps 2 bytes of
  parameter per parameter, and 2 of gradient and 12 of optimizer state (fp32 master, Adam
  m and v) per *trainable* parameter; fp32 keeps 4 + 4 + 8. Stage 1 divides the optimizer
  states by the world size, stage 2 also the gradients, stage 3 also the parameters.
  DeepSpeed's ZeRO optimizers (stages 1-3) clone an fp32 master partition even in fp32
  (+4 bytes per trainable parameter, divided like the optimizer states).
- DeepSpeed buffers: the gradient reduce bucket (`reduce_bucket_size`, 5e8 elements by
  default, two of them with `overlap_comm`), and under stage 3 the parameters gathered
  whole while they are in use (up to `stage3_max_live_parameters`, 1e9 by default: a model
  smaller than that is gathered whole during the forward pass).
- activations, per layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in
  Large Transformer Models", sbh(34 + 5as/h) bytes in 16-bit with a 4h MLP), generalized
  to element size e, MLP width f and the dropout masks the device keeps; see
  `activation_bytes`.
- the optimizer step's temporaries (`step_bytes`), which live after the backward pass
  has freed the activations: the larger of the two counts.
- a fixed CUDA context / workspace overhead (GPU only).
"""

from __future__ import annotations

import argparse
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from rayft.config import ConfigError, RayftConfig, zero_stage

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
UNITS = {
    "b": 1,
    "kb": 10**3,
    "kib": KiB,
    "mb": 10**6,
    "mib": MiB,
    "gb": 10**9,
    "gib": GiB,
    "tb": 10**12,
    "tib": TiB,
}
DEFAULT_GPU_MEMORY = 80 * GiB
# CUDA context (~0.5 GiB with lazy module loading), cuBLAS workspaces and NCCL's buffers;
# not measured here (no GPU): a round, conservative figure.
CUDA_OVERHEAD = 2 * GiB
# DeepSpeed's defaults (`zero_optimization.*`) for the buffers it allocates.
REDUCE_BUCKET = 500_000_000
MAX_LIVE_PARAMETERS = 1_000_000_000
PREFETCH_BUCKET = 50_000_000
# Config attributes that hold dropout probabilities, across architectures.
HIDDEN_DROPOUT = ("hidden_dropout_prob", "resid_pdrop", "hidden_dropout", "dropout")
ATTENTION_DROPOUT = ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")


# ------------------------------------------------------------------------------ sizes


def parse_size(text: str) -> int:
    """``"80GiB"`` -> bytes. Units: B, KB/KiB, MB/MiB, GB/GiB, TB/TiB (case-insensitive);
    a bare number is refused: nvidia-smi says MiB, marketing says GB, we do not guess."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]+)\s*", text)
    unit = match and UNITS.get(match.group(2).lower())
    if not match or not unit:
        raise ValueError(
            f"cannot read {text!r} as a memory size: write a number and a unit, "
            "e.g. 80GiB, 80GB or 81920MiB"
        )
    value = int(float(match.group(1)) * unit)
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


def gpu_memory_arg(text: str) -> int:
    """`--gpu-memory` for argparse, which prefixes the flag's name to the message."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_size(n: float) -> str:
    """Bytes as GiB (or MiB below 1 GiB), the units nvidia-smi and torch report in."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


# ------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model (with the method applied)."""

    params: int  # every parameter held (adapters included)
    trainable: int  # parameters with gradients and optimizer states
    largest_module: int  # most parameters held directly by one module (ZeRO-3 gathers it whole)
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    gated_mlp: bool = False  # SwiGLU-style MLP (Llama, Qwen2): gate and up projections
    hidden_dropout: bool = False
    attention_dropout: bool = False
    attention: str = "sdpa"  # transformers' attn_implementation: eager, sdpa, flash_*
    outputs_per_token: int = 0  # logits per position the loss keeps (vocab for causal_lm)
    body_trains: bool = True  # False when only a head trains: the body keeps no activations


@dataclass(frozen=True)
class Setting:
    """The knobs the planner turns, with their config keys in `overrides`."""

    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    gradient_checkpointing: bool = False
    batch_size: int = 1
    grad_accum: int = 1

    @property
    def valid(self) -> bool:
        """DeepSpeed's rules (as `config.consistency_problems` enforces them)."""
        return (not self.offload_param or self.stage == 3) and (
            not self.offload_optimizer or self.stage >= 1
        )

    def overrides(self, base: Setting | None = None) -> list[str]:
        """``key.sub=value`` for every knob, or only those that differ from ``base``."""
        keys = {
            "stage": "deepspeed.stage",
            "offload_optimizer": "deepspeed.offload_optimizer",
            "offload_param": "deepspeed.offload_param",
            "gradient_checkpointing": "model.gradient_checkpointing",
            "batch_size": "train.batch_size",
            "grad_accum": "train.grad_accum",
        }
        out = []
        for field, key in keys.items():
            value = getattr(self, field)
            if base is None or getattr(base, field) != value:
                out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        return out


@dataclass(frozen=True)
class Estimate:
    """Bytes per worker on its device (`host`: what offload moves to CPU memory)."""

    params: int
    grads: int
    optimizer: int
    buffers: int
    activations: int
    overhead: int
    step: int = 0  # the optimizer step's temporaries: alive when the activations are not
    host: int = 0

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        working = max(self.activations, self.step)
        return self.model_states + self.buffers + working + self.overhead

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "model_states": self.model_states, "total": self.total}


def element_size(precision: str) -> int:
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    return 4 if precision == "fp32" else 2


def stores_attention_scores(shape: ModelShape, *, gpu: bool) -> bool:
    """Whether the s x s attention probabilities are kept for the backward pass: always by
    eager attention; by SDPA only where it falls back to its math kernel, i.e. on CPU with
    attention dropout (CUDA's flash / memory-efficient kernels recompute them)."""
    if shape.attention == "eager":
        return True
    return shape.attention == "sdpa" and not gpu and shape.attention_dropout


def layer_activation_bytes(
    shape: ModelShape, *, batch: int, seq_len: int, precision: str, gpu: bool
) -> int:
    """Bytes one transformer layer keeps for its backward pass, following Korthikanti et
    al. 2022 (s tokens, b rows, h hidden, f MLP width, a heads, e bytes per element, m
    bytes per dropout mask: a bool on CUDA, a scaled e-byte tensor on CPU):

    attention  5e·sbh (QKV input, Q, K, V, output projection input) + m·sbh (dropout)
               + e·as²b (softmax) [+ (m + e)·as²b with attention dropout] when the
               scores are kept (`stores_attention_scores`)
    MLP        e·sbh (input) + 2e·sbf (activation input and output) + m·sbh (dropout);
               gated: e·sbh + 4e·sbf (gate, up, activation, product)
    norms      2e·sbh

    With e = 2, m = 1, f = 4h and the scores kept this is the paper's sbh(34 + 5as/h)."""
    e = element_size(precision)
    m = 1 if gpu else e
    s, b, h, f, a = seq_len, batch, shape.hidden, shape.intermediate, shape.heads
    sbh, sbf, ss = s * b * h, s * b * f, a * s * s * b
    hidden_mask = m if shape.hidden_dropout else 0
    attention = 5 * e * sbh + hidden_mask * sbh
    if stores_attention_scores(shape, gpu=gpu):
        attention += e * ss + ((m + e) * ss if shape.attention_dropout else 0)
    mlp = e * sbh + (4 * e * sbf if shape.gated_mlp else 2 * e * sbf + hidden_mask * sbh)
    return attention + mlp + 2 * e * sbh


def activation_bytes(
    shape: ModelShape,
    *,
    batch: int,
    seq_len: int,
    precision: str,
    gpu: bool,
    checkpointing: bool,
) -> int:
    """Activations kept at the peak of a training step, per worker.

    Every layer keeps `layer_activation_bytes`; with gradient checkpointing only each
    layer's input (e·sbh) is kept and one layer at a time is recomputed. The embeddings
    keep their sum and LayerNorm output (2e·sbh + mask). Logits the loss keeps (causal LM:
    s·b·vocab) cost e + 4 (fp32 copy, when e < 4) + 4 (log-softmax) + 4 (its gradient)
    bytes each. When only a head trains, the body keeps nothing: one layer's worth is the
    forward pass's working set."""
    e = element_size(precision)
    m = 1 if gpu else e
    sbh = seq_len * batch * shape.hidden
    layer = layer_activation_bytes(
        shape, batch=batch, seq_len=seq_len, precision=precision, gpu=gpu
    )
    logits = seq_len * batch * shape.outputs_per_token * (e + (4 if e < 4 else 0) + 8)
    if not shape.body_trains:
        return layer + logits
    embeddings = 2 * e * sbh + (m * sbh if shape.hidden_dropout else 0)
    kept = shape.layers * (e * sbh) + layer if checkpointing else shape.layers * layer
    return kept + embeddings + logits


def estimate(
    shape: ModelShape,
    setting: Setting,
    *,
    seq_len: int,
    precision: str,
    world_size: int,
    gpu: bool = True,
    reduce_bucket: int = REDUCE_BUCKET,
    max_live_parameters: int = MAX_LIVE_PARAMETERS,
    prefetch_bucket: int = PREFETCH_BUCKET,
    overhead: int | None = None,
) -> Estimate:
    """Peak memory per worker for ``setting``; a pure function of its arguments.

    ``gpu=False`` (CPU workers): no CUDA overhead, no second reduce bucket (rayft turns
    `overlap_comm` on for GPUs only), buffers count only the pages a step writes (the CPU
    allocator commits memory lazily; CUDA's reserves it whole), and under stage 3 gloo's
    all-gather stages each prefetched bucket in a temporary of its size (NCCL writes in
    place)."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not setting.valid:
        raise ValueError(f"invalid setting: {' '.join(setting.overrides())}")
    e = element_size(precision)
    n, stage = world_size, setting.stage
    total, trainable = shape.params, shape.trainable
    # Adam: fp32 master + m + v in mixed precision; in fp32, m + v, plus the master
    # partition DeepSpeed's ZeRO optimizers clone even then (stage 0 steps in place).
    optimizer_bytes = 12 if e == 2 or stage >= 1 else 8
    params = total * e / (n if stage == 3 else 1)
    grads = trainable * e / (n if stage >= 2 else 1)
    optimizer = trainable * optimizer_bytes / (n if stage >= 1 else 1)
    host = 0.0
    if setting.offload_optimizer:
        # ZeRO-Offload steps on the CPU: the optimizer states and the fp32 gradient
        # partition live there; the GPU keeps only the reduce bucket.
        host += optimizer + trainable * 4 / n
        optimizer, grads = 0.0, 0.0
    if setting.offload_param:
        host += params
        params = 0.0

    def committed(elements: int) -> int:
        return elements if gpu else min(elements, trainable)

    buffers = 0
    if stage in (1, 2):
        buffers += committed(reduce_bucket) * e * (2 if gpu else 1)
    elif stage == 3:
        buffers += committed(reduce_bucket) * e
        buffers += min(total, max(max_live_parameters, shape.largest_module)) * e
        if not gpu and n > 1:
            buffers += min(total, prefetch_bucket) * e
    activations = activation_bytes(
        shape,
        batch=setting.batch_size,
        seq_len=seq_len,
        precision=precision,
        gpu=gpu,
        checkpointing=setting.gradient_checkpointing,
    )
    step = step_bytes(shape, setting, precision=precision, world_size=world_size, gpu=gpu)
    if overhead is None:
        overhead = CUDA_OVERHEAD if gpu else 0
    return Estimate(
        params=round(params),
        grads=round(grads),
        optimizer=round(optimizer),
        buffers=int(buffers),
        activations=int(activations),
        overhead=int(overhead),
        step=step,
        host=round(host),
    )


def step_bytes(
    shape: ModelShape, setting: Setting, *, precision: str, world_size: int, gpu: bool
) -> int:
    """Temporaries of the optimizer step, after the backward pass has freed the
    activations (so the larger of the two counts). DeepSpeed's stage 1/2 optimizer
    flattens the gradient partition and converts it to fp32 (e + 4 bytes per trainable
    parameter in mixed precision, 4 in fp32, divided by the world size). On CPU torch's
    unfused AdamW also makes two temporaries the size of the tensor it steps (sqrt(v) and
    its quotient): the flat partition under ZeRO, the largest parameter without it. With
    the optimizer offloaded the step runs in host memory."""
    if setting.offload_optimizer:
        return 0
    e = element_size(precision)
    stage, trainable = setting.stage, shape.trainable
    partition = trainable / world_size if stage >= 1 else min(trainable, shape.largest_module)
    step = 0.0
    if stage in (1, 2):
        step += partition * (4 + (e if e < 4 else 0))
    if not gpu:
        step += 2 * 4 * partition
    return int(step)


def candidates(current: Setting) -> list[Setting]:
    """Settings to try, most preferred first: the current one, then a higher ZeRO stage,
    gradient checkpointing, optimizer offload, parameter offload, and last a smaller
    micro-batch (a divisor of the current one, grad_accum raised to keep the effective
    batch). A knob the config already turned on stays on; the stage never goes down."""
    out = []
    smaller = [d for d in range(current.batch_size - 1, 0, -1) if current.batch_size % d == 0]
    for batch in [current.batch_size, *smaller]:
        accum = current.grad_accum * current.batch_size // batch
        for offload_param in sorted({current.offload_param, True}):
            for offload_optimizer in sorted({current.offload_optimizer, True}):
                for checkpointing in sorted({current.gradient_checkpointing, True}):
                    for stage in range(current.stage, 4):
                        setting = Setting(
                            stage,
                            offload_optimizer,
                            offload_param,
                            checkpointing,
                            batch,
                            accum,
                        )
                        if setting.valid:
                            out.append(setting)
    return out


def recommend(
    shape: ModelShape, current: Setting, *, budget: int, **estimate_kwargs: Any
) -> tuple[Setting, Estimate] | None:
    """The most preferred of `candidates` whose estimate fits ``budget`` bytes, with its
    estimate; None when even the last resort does not fit."""
    for setting in candidates(current):
        found = estimate(shape, setting, **estimate_kwargs)
        if found.total <= budget:
            return setting, found
    return None


# ------------------------------------------------------------------ from a config


def resolved_precision(cfg: RayftConfig) -> str:
    """`auto` is bf16 on GPU workers (what rayft picks on any GPU with bf16), fp32 on CPU."""
    precision = cfg.deepspeed.precision
    if precision == "auto":
        return "bf16" if cfg.scaling.use_gpu else "fp32"
    return precision


def setting_of(cfg: RayftConfig) -> Setting:
    ds, t = cfg.deepspeed, cfg.train
    return Setting(
        stage=zero_stage(cfg),
        offload_optimizer=ds.offload_optimizer,
        offload_param=ds.offload_param,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
    )


def _zero_option(cfg: RayftConfig, key: str, default: int) -> int:
    """A buffer size from `deepspeed.overrides.zero_optimization`, else DeepSpeed's."""
    zero = cfg.deepspeed.overrides.get("zero_optimization", {})
    aliases = {
        "max_live_parameters": "stage3_max_live_parameters",
        "prefetch_bucket_size": "stage3_prefetch_bucket_size",
    }
    value = zero.get(key, zero.get(aliases.get(key, key), default))
    return int(float(value))


def model_shape(cfg: RayftConfig) -> ModelShape:
    """Counts and dimensions of the config's model with its method applied (the phase
    that trains the most, for `two_stage`), built on the meta device: only the model's
    config file is read. The new head is sized for `data.labels` (2 labels when unset);
    heads are a rounding error next to a pretrained body."""
    import torch

    from rayft import methods
    from rayft.config import resolve_paths
    from rayft.modeling import head_modules, model_config
    from rayft.tasks import get_task

    cfg = resolve_paths(cfg)  # `pkg:` and relative model paths
    task = get_task(cfg.task)
    labels = [str(label) for label in cfg.data.labels] if cfg.data.labels else ["0", "1"]
    try:
        config = model_config(task, cfg, labels)
    except OSError as exc:
        raise ConfigError(
            [f"model.name_or_path: cannot read the config of {cfg.model.name_or_path}: {exc}"]
        ) from None
    rank = {"head": 0, "adapter": 1, "all": 2}
    phase = max(methods.phases(cfg), key=lambda p: rank[p.trainable])
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft's deprecation notices
        model = task.auto_class().from_config(config, trust_remote_code=cfg.model.trust_remote_code)
        # Heads are found by name here (no checkpoint is read to see which weights it lacks).
        heads = head_modules(model, ())
        try:
            model = methods.apply(model, heads, cfg, phase, task.peft_task_type)
        except ValueError as exc:  # e.g. no LoRA target modules known for the architecture
            raise ConfigError([str(exc)]) from None
    trainable, total = methods.trainable_summary(model)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    names = [name for name, _ in model.named_modules()]
    hidden = int(config.hidden_size)
    outputs = {
        "causal_lm": int(config.vocab_size),
        "token_classification": len(labels),
        "question_answering": 2,
    }.get(cfg.task, 0)

    def dropout(attributes: tuple[str, ...]) -> bool:
        values = [getattr(config, a, None) for a in attributes]
        return any(isinstance(v, (int, float)) and v > 0 for v in values)

    return ModelShape(
        params=total,
        trainable=trainable,
        largest_module=largest,
        hidden=hidden,
        layers=int(config.num_hidden_layers),
        heads=int(config.num_attention_heads),
        intermediate=int(
            getattr(config, "intermediate_size", None)
            or getattr(config, "n_inner", None)
            or 4 * hidden
        ),
        vocab=int(config.vocab_size),
        gated_mlp=any(name.endswith(("gate_proj", "gate_up_proj")) for name in names),
        hidden_dropout=dropout(HIDDEN_DROPOUT),
        attention_dropout=dropout(ATTENTION_DROPOUT),
        attention=str(getattr(config, "_attn_implementation", None) or "sdpa"),
        outputs_per_token=outputs,
        body_trains=phase.trainable != "head",
    )


@dataclass(frozen=True)
class MemoryPlan:
    """A config's estimate, whether it fits, and the recommended setting."""

    model: str
    method: str
    shape: ModelShape
    precision: str
    seq_len: int
    world_size: int
    gpu: bool
    budget: int
    current: Setting
    estimate: Estimate
    recommended: Setting | None
    recommended_estimate: Estimate | None

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.budget

    def advice(self) -> str:
        """One sentence: keep the setting, change these keys, or nothing fits."""
        if self.fits:
            return "the current setting fits"
        if self.recommended is None or self.recommended_estimate is None:
            return (
                "no setting fits, not even ZeRO-3 with gradient checkpointing, both "
                "offloads and micro-batch 1: add workers (scaling.num_workers), use "
                "larger GPUs, a shorter train.max_seq_len, or method=lora"
            )
        changes = " ".join(self.recommended.overrides(self.current))
        return f"set {changes} (~{format_size(self.recommended_estimate.total)} per worker)"

    def to_json(self) -> dict[str, Any]:
        recommended = None
        if self.recommended is not None and self.recommended_estimate is not None:
            recommended = {
                "setting": asdict(self.recommended),
                "overrides": self.recommended.overrides(self.current),
                "estimate": self.recommended_estimate.to_json(),
            }
        return {
            "model": self.model,
            "method": self.method,
            "shape": asdict(self.shape),
            "precision": self.precision,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "device": "gpu" if self.gpu else "cpu",
            "memory_bytes": self.budget,
            "current": {
                "setting": asdict(self.current),
                "estimate": self.estimate.to_json(),
                "fits": self.fits,
            },
            "recommended": recommended,
            "advice": self.advice(),
        }


def build_plan(cfg: RayftConfig, gpu_memory: int = DEFAULT_GPU_MEMORY) -> MemoryPlan:
    """Estimate the config's run per worker against ``gpu_memory`` bytes and recommend."""
    shape = model_shape(cfg)
    kwargs: dict[str, Any] = {
        "seq_len": cfg.train.max_seq_len,
        "precision": resolved_precision(cfg),
        "world_size": cfg.scaling.num_workers,
        "gpu": cfg.scaling.use_gpu,
        "reduce_bucket": _zero_option(cfg, "reduce_bucket_size", REDUCE_BUCKET),
        "max_live_parameters": _zero_option(cfg, "max_live_parameters", MAX_LIVE_PARAMETERS),
        "prefetch_bucket": _zero_option(cfg, "prefetch_bucket_size", PREFETCH_BUCKET),
    }
    current = setting_of(cfg)
    found = estimate(shape, current, **kwargs)
    best = (current, found) if found.total <= gpu_memory else None
    if best is None:
        best = recommend(shape, current, budget=gpu_memory, **kwargs)
    return MemoryPlan(
        model=cfg.model.name_or_path,
        method=cfg.method,
        shape=shape,
        precision=kwargs["precision"],
        seq_len=kwargs["seq_len"],
        world_size=kwargs["world_size"],
        gpu=kwargs["gpu"],
        budget=gpu_memory,
        current=current,
        estimate=found,
        recommended=best[0] if best else None,
        recommended_estimate=best[1] if best else None,
    )


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 100_000 else f"{n:,}"


def _describe(setting: Setting) -> str:
    parts = [f"ZeRO-{setting.stage}"]
    if setting.gradient_checkpointing:
        parts.append("checkpointing")
    if setting.offload_optimizer:
        parts.append("opt offload")
    if setting.offload_param:
        parts.append("param offload")
    parts.append(f"micro-batch {setting.batch_size}, accum {setting.grad_accum}")
    return ", ".join(parts)


def render(plan: MemoryPlan) -> str:
    """The plan as a plain-text table: the current setting and, when it does not fit,
    the recommended one beside it."""
    s = plan.shape
    device = "GPU" if plan.gpu else "CPU worker"
    lines = [
        f"model        {plan.model}",
        f"             {_millions(s.params)} parameters, {_millions(s.trainable)} trainable "
        f"({plan.method}); {s.layers} layers x {s.hidden} hidden, {s.heads} heads, "
        f"MLP {s.intermediate}, attention {s.attention}",
        f"run          {plan.world_size} worker(s) on {'GPUs' if plan.gpu else 'CPUs'}, "
        f"{plan.precision}, {plan.seq_len} tokens per row",
        f"current      {_describe(plan.current)}",
    ]
    columns = [("current", plan.estimate)]
    if not plan.fits and plan.recommended and plan.recommended_estimate:
        lines.append(f"recommended  {_describe(plan.recommended)}")
        columns.append(("recommended", plan.recommended_estimate))
    rows = [
        ("parameters", "params"),
        ("gradients", "grads"),
        ("optimizer states", "optimizer"),
        ("DeepSpeed buffers", "buffers"),
        ("activations", "activations"),
        ("optimizer step temporaries", "step"),
        ("CUDA context, workspace", "overhead"),
        (f"total per {device}", "total"),
        ("offloaded to CPU memory", "host"),
    ]
    width = max(len(name) for name, _ in rows) + 2
    col = 14
    lines.append("")
    lines.append(" " * width + "".join(title.rjust(col) for title, _ in columns))
    for name, key in rows:
        cells = "".join(format_size(getattr(est, key)).rjust(col) for _, est in columns)
        lines.append(name.ljust(width) + cells)
    verdict = "fits" if plan.fits else "does NOT fit"
    used = plan.estimate.total / plan.budget
    lines += [
        "(the total counts the larger of activations and step temporaries: they are not "
        "alive together)",
        "",
        f"{verdict} in {format_size(plan.budget)} (the estimate is {used:.0%} of it)",
        f"recommendation: {plan.advice()}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- before a launch


def cuda_memory() -> int | None:
    """Total memory of this machine's first GPU, or None when no GPU is seen. Read with
    nvidia-smi rather than torch: torch would create a CUDA context in the driver process,
    which holds GPU memory for the driver's lifetime on the GPU a local worker trains on.
    torch answers only when CUDA is already initialized here."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            return int(out.split()[0]) * MiB
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


def warn_if_unfit(cfg: RayftConfig) -> str | None:
    """A warning to print before launching GPU workers whose run will not fit; None when
    it fits, on CPU workers, or when the driver sees no GPU (`cuda_memory`: the driver's
    first GPU stands for the workers')."""
    if not cfg.scaling.use_gpu:
        return None
    memory = cuda_memory()
    if memory is None:
        return None
    try:
        plan = build_plan(cfg, memory)
    except Exception:  # advice only: a planning failure must never stop a run
        return None
    if plan.fits:
        return None
    return (
        f"memory plan: this run needs ~{format_size(plan.estimate.total)} per GPU and the "
        f"GPU has {format_size(memory)}; {plan.advice()} (breakdown: rayft plan --config ...)"
    )
