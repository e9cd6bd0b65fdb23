"""rayft on one GPU: correctness first, then throughput, MFU and a peer comparison.

Parts (each in its own process, so one part's GPU memory never shadows the next):

- ``env``: the GPU, driver and library versions.
- ``peak``: the bf16 matmul throughput this GPU reaches (the measured MFU denominator).
- ``check``: a small Llama-layout decoder trained end to end by ``rayft.trainer.fit`` (Ray
  Data, Ray Train, DeepSpeed ZeRO-2, bf16) on the Dolly sample: the training loss must
  fall, the eval loss must fall below the untrained model's, and the engine must be bf16.
- ``sweep``: a ~1.1B-parameter Llama-layout model (random weights from a config) at
  sequence length 2048, bf16: ``full`` and ``lora`` x ZeRO-2 / ZeRO-3 x activation
  checkpointing off / on. Every point is built by rayft's own code (model loading,
  method, DeepSpeed engine) and trained on one fixed batch, so the loss must fall;
  tokens/s, MFU and peak memory are measured after warm-up steps.
- ``e2e``: the same 1.1B model through the whole ``rayft.trainer.fit`` path (Ray Data
  packing Dolly to 2048 tokens, a Ray Train GPU worker): its steady tokens/s against the
  sweep's bare engine figure for the same setting.
- ``peer``: BERT-base and MiniLM-L6 (random weights, same shapes) on all of SST-2 train,
  one epoch, batch 32: rayft against the Hugging Face ``Trainer`` on the same GPU, the
  Trainer both at its defaults and grouping rows by length (as rayft does by default).

MFU = tokens/s x FLOPs per token / peak. Full fine-tuning: 6N + 12·L·d·s per token (N: all
parameters but the input embedding table; the attention term counts the full s x s
product, as in the PaLM paper's appendix B; recomputation under activation checkpointing
is not counted). LoRA: 4N_frozen + 6N_adapter + 12·L·d·s (frozen weights get no weight
gradient, so their backward is one matmul instead of two); also given on the 6N
convention. Both against the datasheet bf16 dense peak (989 TFLOP/s for H100/H200 SXM)
and against the measured matmul peak.

On the lent GPU machine, from the repo root: ``bash benchmarks/gpu/run.sh [parts]``.
Here, on CPU, at toy sizes (the scripts' own test): ``python benchmarks/gpu/bench_gpu.py
--tiny all``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SHARED = next(  # the last: staged by prepare.sh for the GPU machine, where ../shared is not
    (
        os.path.join(ROOT, p)
        for p in ("../shared", "shared", ".gpu-assets/shared")
        if os.path.isdir(os.path.join(ROOT, p))
    ),
    os.path.join(ROOT, "../shared"),
)
DOLLY = os.path.join(SHARED, "data", "instruct", "dolly_hhrlhf_train_small.jsonl")
SST2 = os.path.join(SHARED, "data", "sst2")
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
PARTS = ("env", "peak", "check", "sweep", "e2e", "peer")
PEER_TRAINERS = ("hf_trainer", "hf_trainer_grouped")  # the Trainer's runs in `peer`

# ~1.1B parameters: TinyLlama-1.1B's shape (22 layers, d 2048, MLP 5632, 32 heads, 4 KV).
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
)  # fmt: skip
LLAMA_TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=30522,
)  # fmt: skip
SWEEP_POINTS = [f"{m}:{z}:{c}:4" for m in ("full", "lora") for z in (2, 3) for c in (0, 1)]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write(out: str, name: str, result: Any) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as handle:
        json.dump(result, handle, indent=2)


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- env, peak


def part_env(args: argparse.Namespace) -> dict[str, Any]:
    import deepspeed
    import ray
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "ray": ray.__version__,
        "cpus": os.cpu_count(),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    if cuda():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        info["bf16"] = torch.cuda.is_bf16_supported()
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,power.limit,clocks.max.sm",
             "--format=csv,noheader"], capture_output=True, text=True, check=False,
        )  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip()
    missing = []
    for module in ("sklearn", "yaml", "datasets", "pydantic", "peft", "tqdm", "rich",
                   "datasketch", "seqeval", "matplotlib"):  # fmt: skip
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    info["missing_modules"] = missing
    return info


def datasheet_peak(name: str) -> float | None:
    for key, tflops in DATASHEET_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


def part_peak(args: argparse.Namespace) -> dict[str, Any]:
    """Dense bf16 matmul TFLOP/s: the best of several timed blocks of square matmuls."""
    import torch

    if not cuda():
        return {"skipped": "no GPU"}
    rates = {}
    for n in (4096, 8192, 16384):
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        iters = max(2, int(4e13 / (2 * n**3)))
        for _ in range(3):
            a @ b
        blocks = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                a @ b
            end.record()
            end.synchronize()
            blocks.append(2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12)
        rates[n] = {"median_tflops": statistics.median(blocks), "max_tflops": max(blocks)}
        del a, b
    name = torch.cuda.get_device_name(0)
    best = max(r["median_tflops"] for r in rates.values())  # a median: one fast block is luck
    return {"by_size": rates, "measured_tflops": best, "datasheet_tflops": datasheet_peak(name)}


# --------------------------------------------------------------------------- models


def tokenizer_dir(args: argparse.Namespace) -> str:
    """MiniLM's WordPiece tokenizer with [SEP] as end of sequence (for the decoders)."""
    from transformers import AutoTokenizer

    path = os.path.join(args.work, "tokenizer")
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.assets, "minilm"))
        tokenizer.eos_token = "[SEP]"
        tokenizer.save_pretrained(path)
    return path


def llama_dir(args: argparse.Namespace, shape: dict[str, int]) -> str:
    """Random Llama-layout weights from a config, saved once (bf16) for every part."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tag = "x".join(str(shape[k]) for k in ("num_hidden_layers", "hidden_size"))
    path = os.path.join(args.work, f"llama-{tag}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    config = LlamaConfig(
        **shape, max_position_embeddings=4096, pad_token_id=0, bos_token_id=101,
        eos_token_id=102, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    device = "cuda" if cuda() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    gc.collect()
    return path


def flops_per_token(shape: dict[str, int], seq: int, params: int, adapter: int) -> dict[str, float]:
    n = params - shape["vocab_size"] * shape["hidden_size"]  # no FLOPs in the embedding lookup
    attention = 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq
    return {
        "n_params_counted": n,
        "full": 6 * n + attention,
        "lora_executed": 4 * (n - adapter) + 6 * adapter + attention,
    }


# --------------------------------------------------------------------------- sweep


def rayft_config(args: argparse.Namespace, model_dir: str, **over: Any) -> Any:
    from rayft.config import validate_config

    base: dict[str, Any] = {
        "task": "causal_lm",
        "method": "full",
        "output_dir": os.path.join(args.work, "run"),
        "model": {"name_or_path": model_dir, "tokenizer": tokenizer_dir(args)},
        "data": {"train": DOLLY, "split": {"train": 0.95, "eval": 0.05}, "packing": True,
                 "dedup": {"near": False}},
        "scaling": {"num_workers": 1, "use_gpu": cuda()},
        "deepspeed": {"stage": 2, "precision": "bf16" if cuda() else "fp32"},
        "train": {"epochs": 1, "batch_size": 4, "lr": 1e-4, "warmup_ratio": 0.0,
                  "lr_schedule": "constant", "max_seq_len": 2048},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": LORA_TARGETS},
        "eval": {"report": False, "general_text": None},
    }  # fmt: skip
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            base.setdefault(section, {})[field] = value
        else:
            base[section] = value
    return validate_config(base)


def init_single_process_group() -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 500))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    backend = "nccl" if cuda() else "gloo"
    if cuda():
        torch.cuda.set_device(0)
    dist.init_process_group(backend, rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def measure_point(
    args: argparse.Namespace, model_dir: str, shape: dict[str, int], point: dict[str, Any]
) -> dict[str, Any]:
    """Build one setting with rayft's code, train on one fixed batch, time steady steps."""
    import torch

    from rayft import methods
    from rayft.engine import initialize, zero3_init_context
    from rayft.modeling import build_model
    from rayft.tasks import get_task

    method, stage, checkpointing = point["method"], point["stage"], point["checkpointing"]
    lr = 1e-4 if method == "full" else 1e-3
    cfg = rayft_config(
        args, model_dir, method=method, deepspeed__stage=stage,
        model={"name_or_path": model_dir, "tokenizer": tokenizer_dir(args),
               "gradient_checkpointing": checkpointing, "attn_implementation": point["attention"]},
        train__lr=lr, train__batch_size=args.batch, train__max_seq_len=args.seq,
    )  # fmt: skip
    task = get_task("causal_lm")
    before = 0.0
    if cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**30  # what earlier points left behind
    started = time.perf_counter()
    zero3 = zero3_init_context(cfg, 1)  # noqa: F841 (transformers reads it while it lives)
    model, heads = build_model(task, cfg, [])
    phase = methods.phases(cfg)[0]
    model = methods.apply(model, heads, cfg, phase, task.peft_task_type)
    trainable, total = methods.trainable_summary(model)
    engine = initialize(model, cfg, lr, args.warmup + args.steps, 1)
    build_seconds = time.perf_counter() - started
    param = next(p for p in engine.module.parameters())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    if point["packed"]:  # documents of a quarter sequence each, as rayft's packing makes
        document = max(1, args.seq // 4)
        batch["position_ids"] = (torch.arange(args.seq) % document).expand(args.batch, -1)
    else:
        batch["attention_mask"] = torch.ones_like(ids)
    batches = [{k: v.to(engine.device) for k, v in batch.items()}]
    if point["packed"] == 2:
        batches = [{k: v.to(engine.device) for k, v in b.items()} for b in args.real_batches]
    losses = []
    processed = real = 0  # tokens the GPU ran (padding included); non-pad ones for real data
    engine.train()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync()
            t0 = time.perf_counter()
        batch = batches[i % len(batches)]
        if i >= args.warmup:
            processed += batch["input_ids"].numel()
            real += args.real_tokens[i % len(batches)] if point["packed"] == 2 else 0
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.detach())
    sync()
    seconds = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    tokens_per_second = processed / seconds
    flops = flops_per_token(shape, args.seq, total, trainable if method == "lora" else 0)
    per_token = flops["full"] if method == "full" else flops["lora_executed"]
    result = {
        "method": method,
        "zero_stage": stage,
        "activation_checkpointing": checkpointing,
        "micro_batch": args.batch,
        "seq_len": args.seq,
        "packed": point["packed"],
        "attention": point["attention"],
        "params": total,
        "trainable_params": trainable,
        "param_dtype": str(param.dtype).replace("torch.", ""),
        "bf16_engine": bool(engine.bfloat16_enabled()),
        "build_seconds": build_seconds,
        "step_seconds": seconds / args.steps,
        "tokens_per_second": tokens_per_second,
        "real_tokens_per_second": real / seconds if real else None,
        "model_tflops": tokens_per_second * per_token / 1e12,
        "model_tflops_6n": tokens_per_second * flops["full"] / 1e12,
        "flops_per_token": per_token,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_falls": losses[-1] < losses[0] - 0.05,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda() else None,
        "memory_before_gib": before,
    }
    engine.destroy()
    del engine, model, batch, out
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
    return result


def point_spec(spec: str) -> dict[str, Any]:
    """``method:stage:checkpointing:micro_batch[:packed[:attention]]``, e.g. ``full:2:0:4``
    or ``full:2:0:4:1:flex_attention`` (packed: four 512-token documents per sequence,
    positions restarting, no attention mask, as rayft feeds packed causal-LM data)."""
    fields = spec.split(":")
    method, stage, checkpointing, batch = fields[:4]
    return {
        "method": method,
        "stage": int(stage),
        "checkpointing": bool(int(checkpointing)),
        "batch": int(batch),
        # 0: no, 1: four equal documents per sequence, 2: the e2e run's own Dolly windows
        "packed": int(fields[4]) if len(fields) > 4 else 0,
        "attention": fields[5] if len(fields) > 5 else "auto",
    }


def described(point: dict[str, Any]) -> dict[str, Any]:
    """A point's settings under the names its results use."""
    return {
        "method": point["method"], "zero_stage": point["stage"],
        "activation_checkpointing": point["checkpointing"], "micro_batch": point["batch"],
        "packed": point["packed"], "attention": point["attention"],
    }  # fmt: skip


def dolly_batches(args: argparse.Namespace, batch_size: int) -> list[dict[str, Any]]:
    """The e2e run's own training windows (Dolly packed to the sequence length by rayft's
    data stage), collated by rayft's causal-LM collate into micro-batches."""
    import numpy as np
    import pyarrow.dataset as pads
    import ray

    from rayft.config import resolve_paths
    from rayft.data.prepare import check_sources, prepare, prepared_root
    from rayft.tasks import causal_lm
    from rayft.tasks.common import pad_multiple

    cfg = resolve_paths(rayft_config(args, tokenizer_dir(args), output_dir=os.path.join(
        args.work, "windows"), train__max_seq_len=args.seq))  # fmt: skip
    init_ray()
    files = check_sources(cfg)
    prepare(cfg, files)
    features = os.path.join(prepared_root(cfg, files), "features", "train")
    table = pads.dataset(features, format="parquet").to_table(
        columns=["input_ids", "labels", "position_ids"]
    )
    ray.shutdown()
    rows = {k: np.array(table.column(k).to_pylist() + [[]], dtype=object)[:-1] for k in
            ("input_ids", "labels", "position_ids")}  # fmt: skip
    batches, args.real_tokens = [], []
    for i in range(0, table.num_rows - batch_size + 1, batch_size):
        chunk = {k: v[i : i + batch_size] for k, v in rows.items()}
        batches.append(causal_lm.collate(chunk, 0, pad_multiple("cuda")))
        args.real_tokens.append(sum(len(x) for x in rows["input_ids"][i : i + batch_size]))
    return batches


def part_point(args: argparse.Namespace) -> dict[str, Any]:
    """One sweep setting, alone in its process (engines of earlier settings are not
    completely freed by ``engine.destroy()``: a process per setting keeps peaks honest)."""
    point = point_spec(args.spec)
    args.batch = point["batch"]
    shape = LLAMA_TINY if args.tiny else LLAMA_1B
    if point["packed"] == 2:
        args.real_batches = dolly_batches(args, point["batch"])
    init_single_process_group()
    try:
        return measure_point(args, llama_dir(args, shape), shape, point)
    except Exception as exc:  # e.g. out of memory: recorded, the sweep goes on
        return {**described(point), "error": f"{type(exc).__name__}: {exc}"[:2000]}


def part_sweep(args: argparse.Namespace) -> dict[str, Any]:
    shape = LLAMA_TINY if args.tiny else LLAMA_1B
    llama_dir(args, shape)  # saved once, before the points load it
    options = ["--out", args.work, "--work", args.work, "--assets", args.assets,
               "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps)]  # fmt: skip
    points = []
    for spec in args.points:
        result = os.path.join(args.work, "gpu_point.json")
        if os.path.exists(result):
            os.remove(result)
        command = [sys.executable, os.path.abspath(__file__), "point", "--single", "--spec", spec]
        code = subprocess.call([*command, *options, *(["--tiny"] if args.tiny else [])])
        if os.path.exists(result):
            with open(result) as handle:
                point = json.load(handle)
        else:
            point = {**described(point_spec(spec)), "error": f"exit code {code}"}
        log(f"{spec}: {json.dumps(point)}")
        points.append(point)
        write(args.out, "gpu_sweep_partial", {"points": points})
    return {"model_shape": shape, "points": points}


# --------------------------------------------------------------------------- e2e, check


def steady_rate(history: list[dict[str, Any]], key: str) -> float | None:
    """Rate between the first and last history rows (after the first row's warm-up)."""
    rows = [h for h in history if "train_seconds" in h and h.get("step", 0) > 0]
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    seconds = last["train_seconds"] - first["train_seconds"]
    return (last[key] - first[key]) / seconds if seconds > 0 else None


def read_history(output_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(output_dir, "history.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def init_ray() -> None:
    """Ray for ``fit`` without a dashboard: the GPU machine's carried Ray has none (rayft's
    own local start would try to launch it)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        )


def part_check(args: argparse.Namespace) -> dict[str, Any]:
    """Correctness on the GPU path: loss falls, eval beats the untrained model, bf16."""
    from rayft.trainer import fit

    model_dir = llama_dir(args, {**LLAMA_TINY, "hidden_size": 256, "intermediate_size": 1024,
                                 "num_hidden_layers": 4, "num_attention_heads": 4})  # fmt: skip
    init_ray()
    out = os.path.join(args.work, "check")
    cfg = rayft_config(
        args, model_dir, output_dir=out, train__epochs=2, train__lr=1e-3, train__max_seq_len=512,
        train__batch_size=8, train__warmup_ratio=0.05, train__lr_schedule="linear",
        train__eval_every_steps=10, train__max_steps=12 if args.tiny else None,
        eval={"report": False, "baselines": ["pretrained"], "general_text": None},
    )  # fmt: skip
    metrics = fit(cfg)
    history = read_history(out)
    train_losses = [h["train_loss"] for h in history if h.get("step", 0) > 0]
    before = next(h["eval_loss"] for h in history if h.get("step") == 0)
    result = {
        "steps": metrics["step"],
        "train_loss_first_report": train_losses[0],
        "train_loss_last_report": train_losses[-1],
        "eval_loss_untrained": before,
        "eval_loss_trained": metrics["eval_loss"],
        "perplexity": metrics.get("perplexity"),
        "precision": cfg.deepspeed.precision,
        "tokens_per_second": metrics["train_tokens_per_second"],
        "data_wait_fraction": metrics["data_wait_fraction"],
    }
    result["passed"] = bool(
        train_losses[-1] < train_losses[0] and metrics["eval_loss"] < before - 0.5
    )
    return result


def part_e2e(args: argparse.Namespace) -> dict[str, Any]:
    """The 1.1B model through ``fit``: steady tokens/s against the bare-engine sweep."""
    from rayft.trainer import fit

    shape = LLAMA_TINY if args.tiny else LLAMA_1B
    model_dir = llama_dir(args, shape)
    init_ray()
    checkpointing = bool(args.e2e_checkpointing)
    out = os.path.join(args.work, f"e2e-ckpt{int(checkpointing)}")
    cfg = rayft_config(
        args, model_dir, output_dir=out,
        model={"name_or_path": model_dir, "tokenizer": tokenizer_dir(args),
               "gradient_checkpointing": checkpointing, "attn_implementation": args.e2e_attention},
        train__epochs=4, train__max_steps=args.e2e_steps, train__batch_size=args.batch,
        train__max_seq_len=args.seq, train__eval_every_steps=args.e2e_steps // 4,
        eval={"report": False, "baselines": [], "general_text": None},
    )  # fmt: skip
    started = time.perf_counter()
    metrics = fit(cfg)
    wall = time.perf_counter() - started
    run = {
        "method": "full", "zero_stage": 2, "activation_checkpointing": checkpointing,
        "attention": args.e2e_attention,
        "micro_batch": args.batch, "seq_len": args.seq, "steps": metrics["step"],
        "wall_seconds": wall, "train_seconds": metrics["train_seconds"],
        "tokens_per_second_overall": metrics["train_tokens_per_second"],
        "tokens_per_second_steady": steady_rate(read_history(out), "train_tokens"),
        "data_wait_fraction": metrics["data_wait_fraction"],
        "train_loss": metrics["train_loss"], "eval_loss": metrics["eval_loss"],
    }  # fmt: skip
    log(f"e2e: {json.dumps(run)}")
    return {"model_shape": shape, "runs": [run]}  # a list: the tables take several


# --------------------------------------------------------------------------- peer


def encoder_dir(args: argparse.Namespace, name: str) -> str:
    """Random weights in BERT-base's or MiniLM-L6's shape, with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = os.path.join(args.work, name)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if name == "bert-base":
        config = BertConfig()  # 12 x 768, 110M parameters
    else:
        config = BertConfig.from_pretrained(os.path.join(args.assets, "minilm"))  # L6-H384
    if args.tiny:
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64)  # fmt: skip
    config.num_labels = 2
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir(args)).save_pretrained(path)
    return path


def sst2_rows(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    import csv

    def read(name: str, limit: int | None) -> list[dict]:
        with open(os.path.join(SST2, name), newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
        return [{"sentence": r["sentence"], "label": int(r["label"])} for r in rows[:limit]]

    return read("train.tsv", args.peer_rows), read("dev.tsv", None)


def hf_trainer_run(
    args: argparse.Namespace, model_dir: str, train: list, dev: list, grouped: bool
) -> dict:
    """The Trainer at its defaults (random sampler) or, ``grouped``, batching rows of similar
    length together (its ``group_by_length`` sampler) as rayft does by default."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )  # fmt: skip

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(batch: dict) -> dict:
        return tokenizer(batch["sentence"], truncation=True, max_length=args.peer_seq)

    train_ds = Dataset.from_list(train).map(encode, batched=True, remove_columns=["sentence"])
    dev_ds = Dataset.from_list(dev).map(encode, batched=True, remove_columns=["sentence"])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    bf16 = cuda() and torch.cuda.is_bf16_supported()
    training_args = TrainingArguments(
        output_dir=os.path.join(args.work, "hf-out"), per_device_train_batch_size=32,
        per_device_eval_batch_size=128, num_train_epochs=1, learning_rate=args.peer_lr,
        weight_decay=0.01, warmup_steps=0.06, lr_scheduler_type="linear", max_grad_norm=1.0,
        bf16=bf16, optim="adamw_torch_fused" if cuda() else "adamw_torch", seed=42,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
        dataloader_num_workers=2, dataloader_pin_memory=cuda(), disable_tqdm=True,
        train_sampling_strategy="group_by_length" if grouped else "random",
    )  # fmt: skip

    def metrics(prediction: Any) -> dict:  # label_ids: grouping reorders evaluation too
        return {"accuracy": float((np.argmax(prediction.predictions, -1) ==
                                   prediction.label_ids).mean())}  # fmt: skip

    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=dev_ds,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=metrics,
    )  # fmt: skip
    out = trainer.train()
    scores = trainer.evaluate()
    wall = time.perf_counter() - started
    del trainer, model
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
    return {
        "runner": "hf_trainer_grouped" if grouped else "hf_trainer",
        "wall_seconds": wall,
        "fixed_seconds": wall - out.metrics["train_runtime"],
        "train_seconds": out.metrics["train_runtime"],
        "samples_per_second": out.metrics["train_samples_per_second"],
        "accuracy": scores["eval_accuracy"],
    }


def rayft_run(args: argparse.Namespace, model_dir: str, name: str, stage: int) -> dict:
    from rayft.config import validate_config
    from rayft.trainer import fit

    out = os.path.join(args.work, f"peer-{name}-z{stage}")
    cfg = validate_config({
        "task": "sequence_classification", "method": "full", "output_dir": out,
        "model": {"name_or_path": model_dir},
        "data": {"train": os.path.join(SST2, "train.tsv") if not args.peer_rows else
                 args.peer_train_file, "eval": os.path.join(SST2, "dev.tsv"),
                 "text_column": "sentence", "label_column": "label",
                 # the same rows as the Trainer gets: nothing removed
                 "dedup": {"exact": False, "near": False, "remove_contaminated": False},
                 "cache_dir": os.path.join(args.work, "data-cache")},
        "scaling": {"num_workers": 1, "use_gpu": cuda()},
        "deepspeed": {"stage": stage},
        "train": {"epochs": 1, "batch_size": 32, "eval_batch_size": 128, "lr": args.peer_lr,
                  "warmup_ratio": 0.06, "weight_decay": 0.01, "max_seq_len": args.peer_seq,
                  "log_every_steps": 500},
        "eval": {"report": False, "baselines": [], "general_text": None},
    })  # fmt: skip
    started = time.perf_counter()
    metrics = fit(cfg)
    wall = time.perf_counter() - started
    return {
        "runner": f"rayft (ZeRO-{stage})",
        "wall_seconds": wall,
        "train_seconds": metrics["train_seconds"],
        "samples_per_second": metrics["train_samples_per_second"],
        "accuracy": metrics["accuracy"],
        "data_wait_fraction": metrics["data_wait_fraction"],
        "train_rows": metrics.get("train_rows"),
        "fixed_seconds": wall - metrics["train_seconds"],
        "timings": metrics.get("timings"),  # where the fixed seconds went
    }


def add_peer_ratios(runs: list[dict[str, Any]]) -> None:
    """Each rayft run against each Trainer run of the same model, in place:
    ``vs_hf_trainer_throughput_ratio``, ``vs_hf_trainer_grouped_time_ratio``, ..."""
    trainers = [r for r in runs if r["runner"] in PEER_TRAINERS]
    for run in runs:
        if run["runner"] in PEER_TRAINERS:
            continue
        for hf in trainers:
            key = hf["runner"]
            run[f"vs_{key}_throughput_ratio"] = run["samples_per_second"] / hf["samples_per_second"]
            run[f"vs_{key}_time_ratio"] = run["wall_seconds"] / hf["wall_seconds"]
            run[f"accuracy_minus_{key}"] = run["accuracy"] - hf["accuracy"]


def part_peer(args: argparse.Namespace) -> dict[str, Any]:
    train, dev = sst2_rows(args)
    if args.peer_rows:  # a subset: written as a file rayft reads like any other
        args.peer_train_file = os.path.join(args.work, "sst2-train-subset.jsonl")
        with open(args.peer_train_file, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in train)
    init_ray()
    models = {}
    for name in args.peer_models:
        model_dir = encoder_dir(args, name)
        runs = []
        for grouping in args.peer_trainers:
            runs.append(hf_trainer_run(args, model_dir, train, dev, grouping == "grouped"))
            log(f"peer {name}: {json.dumps(runs[-1])}")
        for stage in args.peer_stages:
            runs.append(rayft_run(args, model_dir, name, stage))
            log(f"peer {name}: {json.dumps(runs[-1])}")
        add_peer_ratios(runs)
        models[name] = runs
        write(args.out, "gpu_peer_partial", models)
    return {"train_rows": len(train), "dev_rows": len(dev), "models": models}


# --------------------------------------------------------------------------- table


def load(out: str, name: str) -> Any:
    path = os.path.join(out, f"gpu_{name}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def tables(out: str) -> str:
    """The measured figures as Markdown tables (pasted into benchmarks/RESULTS.md)."""
    parts = []
    env, peak = load(out, "env"), load(out, "peak")
    if env:
        parts.append(
            f"Machine: {env.get('gpu', 'no GPU')} ({env.get('gpu_memory_gib', 0):.0f} GiB), "
            f"{env['cpus']} CPUs; python {env['python']}, torch {env['torch']} (CUDA "
            f"{env['cuda']}), transformers {env['transformers']}, peft {env['peft']}, "
            f"deepspeed {env['deepspeed']}, ray {env['ray']}."
        )
    datasheet = measured = None
    if peak and "measured_tflops" in peak:
        datasheet, measured = peak["datasheet_tflops"], peak["measured_tflops"]
        parts.append(
            f"bf16 dense matmul peak measured in the same call: {measured:.0f} TFLOP/s "
            f"(datasheet {datasheet} TFLOP/s)."
        )
    check = load(out, "check")
    if check:
        parts.append(
            "Correctness (`check`, rayft.fit, ZeRO-2, bf16): train loss "
            f"{check['train_loss_first_report']:.3f} -> {check['train_loss_last_report']:.3f}, "
            f"eval loss {check['eval_loss_untrained']:.3f} (untrained) -> "
            f"{check['eval_loss_trained']:.3f}: {'passed' if check['passed'] else 'FAILED'}."
        )
    sweep = load(out, "sweep")
    if sweep:
        rows = []
        for p in sweep["points"]:
            method = (
                p["method"] + {0: "", 1: " packed", 2: " Dolly windows"}[int(p.get("packed", 0))]
            )
            if p.get("attention", "auto") != "auto":
                method += f" ({p['attention']})"
            name = [method, f"ZeRO-{p['zero_stage']}",
                    "on" if p["activation_checkpointing"] else "off"]  # fmt: skip
            if "error" in p:
                rows.append([*name, p.get("micro_batch", ""), p["error"][:80], "", "", "", "", ""])
                continue
            mfu = [p["model_tflops"] / x * 100 if x else None for x in (datasheet, measured)]
            rows.append([
                *name, p["micro_batch"], round(p["tokens_per_second"]), p["model_tflops"],
                f"{mfu[0]:.1f}%" if mfu[0] else "-", f"{mfu[1]:.1f}%" if mfu[1] else "-",
                # what this setting itself allocated at its peak (earlier settings of an
                # in-process sweep may have left memory behind)
                "-" if p["peak_memory_gib"] is None
                else p["peak_memory_gib"] - p.get("memory_before_gib", 0.0),
                f"{p['loss_first']:.2f} -> {p['loss_last']:.2f}",
            ])  # fmt: skip
        parts.append(markdown(
            ["method", "ZeRO", "act. ckpt", "micro-batch", "tokens/s", "model TFLOP/s",
             "MFU (datasheet)", "MFU (measured peak)", "peak GiB", "loss"], rows,
        ))  # fmt: skip
    e2e = load(out, "e2e")
    if e2e:
        rows = [[f"{r['method']} ({r.get('attention', 'auto')})", f"ZeRO-{r['zero_stage']}", r["activation_checkpointing"],
                 r["steps"], round(r["tokens_per_second_steady"] or 0),
                 round(r["tokens_per_second_overall"]), r["data_wait_fraction"], r["wall_seconds"]]
                for r in e2e["runs"]]  # fmt: skip
        parts.append(markdown(
            ["rayft.fit", "ZeRO", "act. ckpt", "steps", "tokens/s (steady)", "tokens/s (all)",
             "data wait", "wall s"], rows,
        ))  # fmt: skip
    peer = load(out, "peer")
    if peer:
        rows = []
        for model, runs in peer["models"].items():
            for r in runs:
                rows.append([
                    model, r["runner"], r["wall_seconds"], r["train_seconds"],
                    round(r["samples_per_second"]), r["accuracy"],
                    *(r.get(f"vs_{hf}_{kind}_ratio", "-") for hf in PEER_TRAINERS
                      for kind in ("throughput", "time")),
                ])  # fmt: skip
        parts.append(markdown(
            ["model", "runner", "wall s", "train s", "samples/s", "dev accuracy",
             "throughput vs HF", "wall time vs HF", "throughput vs HF grouped",
             "wall time vs HF grouped"], rows,
        ))  # fmt: skip
    return "\n\n".join(parts)


def summary(out: str) -> dict[str, Any]:
    """The headline figures and ratios of the JSON files in ``out`` (benchmarks/results/gpu.json)."""
    peak, sweep, e2e, peer = (load(out, n) for n in ("peak", "sweep", "e2e", "peer"))
    result: dict[str, Any] = {"benchmark": "gpu", "source": os.path.relpath(out, ROOT)}
    if peak:
        result["peak_tflops_measured"] = peak["measured_tflops"]
        result["peak_tflops_datasheet"] = peak["datasheet_tflops"]
    points = [p for p in (sweep or {}).get("points", []) if "error" not in p]

    def rate(method: str, stage: int, ckpt: bool, batch: int, packed: int = 0,
             attention: str = "auto") -> float | None:  # fmt: skip
        for p in points:
            if (p["method"], p["zero_stage"], p["activation_checkpointing"], p["micro_batch"],
                    int(p.get("packed", 0)), p.get("attention", "auto")) == (
                    method, stage, ckpt, batch, packed, attention):  # fmt: skip
                return p["tokens_per_second"]
        return None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    if points and peak:
        best = max(points, key=lambda p: p["model_tflops"])
        result["best_point"] = {k: best[k] for k in ("method", "zero_stage",
            "activation_checkpointing", "micro_batch", "tokens_per_second", "model_tflops")}  # fmt: skip
        result["best_mfu_datasheet"] = best["model_tflops"] / peak["datasheet_tflops"]
        result["best_mfu_measured_peak"] = best["model_tflops"] / peak["measured_tflops"]
    dense = rate("full", 2, False, 4)
    result.update({
        "zero3_vs_zero2_full_ratio": ratio(rate("full", 3, False, 4), dense),
        "zero0_vs_zero2_full_ratio": ratio(rate("full", 0, False, 4), dense),
        "checkpointing_on_vs_off_full_b4_ratio": ratio(rate("full", 2, True, 4), dense),
        "checkpointing_on_vs_off_full_b16_ratio": ratio(rate("full", 2, True, 16),
                                                         rate("full", 2, False, 16)),
        "lora_vs_full_tokens_ratio_b4": ratio(rate("lora", 2, False, 4), dense),
        "lora_vs_full_tokens_ratio_b16": ratio(rate("lora", 2, False, 16), rate("full", 2, False, 16)),
        "micro_batch_16_vs_4_ratio": ratio(rate("full", 2, False, 16), dense),
        "packed_4_documents_vs_dense_ratio": ratio(rate("full", 2, False, 4, 1), dense),
        "packed_flex_vs_sdpa_ratio": ratio(rate("full", 2, False, 4, 1, "flex_attention"),
                                           rate("full", 2, False, 4, 1)),
        "dolly_windows_vs_dense_ratio": ratio(rate("full", 2, False, 4, 2), dense),
    })  # fmt: skip
    real = next((p.get("real_tokens_per_second") for p in points if p.get("packed") == 2), None)
    if e2e and real:
        steady = e2e["runs"][0]["tokens_per_second_steady"]
        result["e2e_tokens_per_second_steady"] = steady
        result["bare_engine_dolly_tokens_per_second"] = real
        result["e2e_vs_bare_engine_ratio"] = steady / real
    if peer:
        for model, runs in peer["models"].items():
            for run in runs:
                if run["runner"] in PEER_TRAINERS:
                    continue
                stage = run["runner"].split("ZeRO-")[-1].rstrip(")")
                for key, value in run.items():
                    if key.startswith(("vs_hf_", "accuracy_minus_")):
                        result[f"{model}_zero{stage}_{key}"] = value
    return result


# --------------------------------------------------------------------------- main


def run_part(args: argparse.Namespace, part: str) -> dict[str, Any]:
    return {
        "env": part_env, "peak": part_peak, "check": part_check, "sweep": part_sweep,
        "point": part_point,
        "e2e": part_e2e, "peer": part_peer,
    }[part](args)  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="*", default=["all"], help=f"{', '.join(PARTS)} or all")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu"))
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "rayft-gpu-bench"))
    parser.add_argument("--assets", default=os.path.join(ROOT, ".gpu-assets"))
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU check of the script)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--points", nargs="+", default=SWEEP_POINTS, help="method:stage:ckpt:batch")
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--e2e-steps", type=int, default=24)
    parser.add_argument("--e2e-checkpointing", type=int, default=1)
    parser.add_argument("--e2e-attention", default="auto")
    parser.add_argument("--peer-models", nargs="+", default=["bert-base", "minilm"])
    parser.add_argument("--peer-stages", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--peer-rows", type=int, default=None, help="first N train rows")
    parser.add_argument(
        "--peer-trainers", nargs="+", choices=["default", "grouped"],
        default=["default", "grouped"], help="the Trainer's samplers: random, by length",
    )  # fmt: skip
    parser.add_argument("--peer-seq", type=int, default=128)
    parser.add_argument("--peer-lr", type=float, default=5e-5)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.warmup, args.steps = 2, 64, 1, 3
        args.e2e_steps = 4
        args.peer_rows = args.peer_rows or 256
        args.peer_models = args.peer_models[:1]
    os.makedirs(args.work, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.parts == ["table"]:
        print(tables(args.out))
        print(json.dumps(summary(args.out), indent=2))
        return
    parts = list(PARTS) if args.parts == ["all"] else args.parts
    unknown = sorted(set(parts) - {*PARTS, "point"})
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}: choose from {', '.join(PARTS)} or all")
    if args.single:  # the child process: one part, its result as JSON in --out
        result = run_part(args, parts[0])
        write(args.out, f"gpu_{parts[0]}", result)
        return
    for part in parts:
        log(f"--- {part}")
        started = time.perf_counter()
        options = [a for a in sys.argv[1:] if a not in (*PARTS, "all")]
        child = [sys.executable, os.path.abspath(__file__), part, "--single", *options]
        code = subprocess.call(child)
        log(f"--- {part}: exit {code} after {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
