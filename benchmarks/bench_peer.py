"""rayft against the Hugging Face Trainer on the same classification job: end-to-end wall
time, training throughput (samples/s) and dev accuracy.

The job: all-MiniLM-L6-v2 fine-tuned on sentence-length rows of SST-2's train.tsv, scored
on all 872 rows of dev.tsv, with the same learning rate, epochs, global batch, warmup,
weight decay (not on biases and norms), clipping, linear decay and max_seq_len, and dynamic
padding on both sides (`DataCollatorWithPadding` for the Trainer). The Trainer trains the
rows rayft kept after its data stage (exact duplicates and copies of dev sentences
removed), so both see the same examples. The Trainer runs in this process (torch on both
cores); rayft runs with 1 worker x 2 CPUs and with 2 workers x 1 CPU (half the batch
each), ZeRO stage 0, each from a cold data stage, in one Ray started once (its start-up
is added to rayft's wall time). Runs rotate order across repeats; medians are reported.

Each side's wall time is split into a fixed part (everything but the training steps:
start-up, data, evaluation; rayft's from its `timings`) and the training steps, so the
summary can say from how many training samples on rayft's wall time is the lower one
(`crossover_train_samples`, from wall = fixed + samples / throughput). A larger job
checks that figure directly (`--name` keeps its results apart):

    python benchmarks/bench_peer.py --rows 2000 --epochs 1 --methods full lora --repeats 2
    python benchmarks/bench_peer.py --rows 6000 --methods full lora --scenarios hf_trainer \
        rayft_1x2 --name peer_large
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from bench_overhead import (
    MINILM,
    CpuCensus,
    environment,
    median,
    prepare_run,
    quiet_run_config,
    sst2_dev_subset,
    sst2_subset,
    start_ray,
    write_result,
)

# A Trainer scenario maps to (whether it groups by length, torch threads or None for this
# process's); a rayft one to its scaling (and its ZeRO stage or length-grouping window
# where they are not the benchmark's).
TRAINERS = {
    "hf_trainer": (False, None),
    "hf_trainer_grouped": (True, None),
    # One thread, a core left free: the setting rayft_1x1_group50 matches.
    "hf_trainer_grouped_1cpu": (True, 1),
}
SCENARIOS = {
    **dict.fromkeys(TRAINERS),
    "rayft_1x2": {"num_workers": 1, "cpus_per_worker": 2},
    "rayft_2x1": {"num_workers": 2, "cpus_per_worker": 1},
    # The setting of the 2026-11-22 GPU sitting (ZeRO-2 on one worker), for a before/after.
    "rayft_1x2_zero2": {"num_workers": 1, "cpus_per_worker": 2, "stage": 2},
    # Length grouping over windows of 50 batches, the size of the Trainer's megabatches.
    "rayft_1x2_group50": {"num_workers": 1, "cpus_per_worker": 2, "group_by_length": 50},
    "rayft_1x1_group50": {"num_workers": 1, "cpus_per_worker": 1, "group_by_length": 50},
    # The training split streamed (read and tokenized by Ray Data while the worker trains,
    # as a split larger than data.materialize_max_mb is) instead of kept in the object store.
    "rayft_1x2_stream": {"num_workers": 1, "cpus_per_worker": 2, "materialize": "never"},
    # Trained in the benchmark's own process (`scaling.in_process`, Ray Train's local mode):
    # no controller or worker group to start and stop.
    "rayft_1x2_in_process": {"num_workers": 1, "cpus_per_worker": 2, "in_process": True},
}
# A host-bound model: BERT's layout at 12 layers x 64 wide (random weights, MiniLM's
# tokenizer), so a step is mostly Python and kernel dispatch, as BERT-base's is on a GPU at
# batch 32 x ~25 tokens. Throughput only: its accuracy means nothing.
TINY = {"hidden_size": 64, "num_hidden_layers": 12, "num_attention_heads": 2,
        "intermediate_size": 256}  # fmt: skip


def model_path(args: argparse.Namespace) -> str:
    """The model both sides load: MiniLM, or (``--model tiny``) a random BERT of the
    ``TINY`` layout saved once into the scratch directory with MiniLM's tokenizer."""
    from rayft.config import resolve_path

    if args.model == "minilm":
        return MINILM
    out = os.path.join(args.work, "tiny-model")
    if not os.path.isdir(out):
        import torch
        from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

        tokenizer = AutoTokenizer.from_pretrained(resolve_path(MINILM))
        torch.manual_seed(42)
        config = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=2, **TINY)
        BertForSequenceClassification(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def rayft_config(
    args: argparse.Namespace, method: str, scaling: dict[str, Any], out: str, cache: str
) -> dict[str, Any]:
    scaling = dict(scaling)
    stage = scaling.pop("stage", 0)
    grouping = (
        {"group_by_length": scaling.pop("group_by_length")} if "group_by_length" in scaling else {}
    )
    materialize = scaling.pop("materialize", "auto")
    batch = args.batch_size // scaling["num_workers"]  # the same global batch
    return quiet_run_config({
        "task": "sequence_classification", "method": method, "output_dir": out,
        "model": {"name_or_path": model_path(args)},
        "data": {"train": args.train, "eval": args.dev, "text_column": "sentence",
                 "label_column": "label", "dedup": {"near": False}, "cache_dir": cache,
                 "materialize": materialize},
        "scaling": scaling,
        "deepspeed": {"stage": stage, "precision": "fp32"},
        "train": {"epochs": args.epochs, "batch_size": batch, "eval_batch_size": 64,
                  "lr": lr_of(args, method), "warmup_ratio": args.warmup_ratio,
                  "weight_decay": args.weight_decay, "max_seq_len": args.max_seq_len,
                  "log_every_steps": 1000, **grouping},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
                 "target_modules": ["query", "key", "value", "dense"]},
    })  # fmt: skip


def default_window() -> int:
    """rayft's default length-grouping window (8 until 2026-12-05, 50 since)."""
    from rayft.config import TrainSection

    return TrainSection.model_fields["group_by_length"].default


def lr_of(args: argparse.Namespace, method: str) -> float:
    return args.lora_lr if method == "lora" else args.lr


def run_rayft(raw: dict[str, Any], ray_start: float) -> dict[str, Any]:
    from rayft.config import validate_config
    from rayft.trainer import fit

    started = time.time()
    metrics = fit(validate_config(raw))
    wall = time.time() - started
    return {
        "wall_seconds": wall + ray_start,
        "fit_seconds": wall,
        "train_seconds": metrics["train_seconds"],
        "train_samples": metrics["train_samples"],
        "samples_per_second": metrics["train_samples_per_second"],
        "accuracy": metrics["accuracy"],
        "f1": metrics["f1"],
        "eval_rows": metrics["eval_rows"],
        "steps": metrics["step"],
        "data_wait_fraction": metrics["data_wait_fraction"],
        "fixed_seconds": wall + ray_start - metrics["train_seconds"],
        "timings": {**metrics["timings"], "ray_start": ray_start},  # Ray started above
    }


def prepared_rows(raw: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The train and eval rows rayft kept (from its prepared shards), for the Trainer."""
    import pyarrow.dataset as pads

    from rayft.config import resolve_paths, validate_config
    from rayft.data.prepare import check_sources, prepare

    cfg = resolve_paths(validate_config(raw))
    prepared = prepare(cfg, check_sources(cfg), outputs=False)
    out = {}
    for split in ("train", "eval"):
        table = pads.dataset(prepared.splits[split], format="parquet").to_table(
            columns=["_source", "_line", "text", "label"]
        )
        out[split] = sorted(table.to_pylist(), key=lambda r: (r["_source"], r["_line"]))
    return out


def run_hf_trainer(
    args: argparse.Namespace,
    method: str,
    rows: dict[str, list[dict[str, Any]]],
    out: str,
    group_by_length: bool,
) -> dict[str, Any]:
    """Tokenize, load, train and predict with transformers' Trainer; wall time of it all."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from rayft.config import resolve_path

    started = time.time()
    path = resolve_path(model_path(args))
    tokenizer = AutoTokenizer.from_pretrained(path)
    labels = sorted({r["label"] for r in rows["train"]}, key=int)

    def dataset(split: str) -> Any:
        data = Dataset.from_dict({
            "text": [r["text"] for r in rows[split]],
            "label": [labels.index(r["label"]) for r in rows[split]],
        })  # fmt: skip
        return data.map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_seq_len),
            batched=True,
            remove_columns=["text"],
        )

    train, dev = dataset("train"), dataset("eval")
    torch.manual_seed(42)  # the new head's weights: seeded, as rayft seeds its own
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            task_type="SEQ_CLS", r=16, lora_alpha=32, lora_dropout=0.05,
            target_modules=["query", "key", "value", "dense"],
        ))  # fmt: skip
    steps = args.epochs * -(-len(train) // args.batch_size)
    training = TrainingArguments(
        output_dir=out, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, learning_rate=lr_of(args, method),
        num_train_epochs=args.epochs, warmup_steps=int(args.warmup_ratio * steps),
        weight_decay=args.weight_decay, max_grad_norm=1.0, lr_scheduler_type="linear",
        seed=42, use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trained = trainer.train()
    predicted = trainer.predict(dev)
    wall = time.time() - started
    from sklearn.metrics import f1_score

    pred = np.argmax(predicted.predictions, axis=-1)
    # In the predictions' order: with group_by_length the Trainer also reorders evaluation.
    refs = np.asarray(predicted.label_ids)
    return {
        "wall_seconds": wall,
        "train_seconds": trained.metrics["train_runtime"],
        "train_samples": len(train) * args.epochs,
        "samples_per_second": trained.metrics["train_samples_per_second"],
        "accuracy": float((pred == refs).mean()),
        "f1": float(f1_score(refs, pred, average="macro")),
        "eval_rows": len(refs),
        "fixed_seconds": wall - trained.metrics["train_runtime"],
        "steps": trained.global_step,
        "torch_threads": torch.get_num_threads(),
    }


def crossover(hf: dict[str, float], mine: dict[str, float]) -> float | None:
    """Training samples from which rayft's wall time is below the Trainer's, with each
    side's wall = fixed + samples / throughput; None if rayft's throughput is not higher
    (then its fixed part must be smaller for it to be faster, at any size)."""
    gain = 1 / hf["samples_per_second"] - 1 / mine["samples_per_second"]
    if gain <= 0:
        return None
    return max(mine["fixed_seconds"] - hf["fixed_seconds"], 0.0) / gain


def tables(summary: dict[str, Any]) -> str:
    """The summary as RESULTS.md's two tables: the comparison, and where rayft's fixed
    seconds went."""
    grouped = any("hf_trainer_grouped" in block for block in summary.values())
    lines = [
        "| method | run | wall s | fixed s | train samples/s | dev accuracy | F1 | time ratio "
        "| throughput ratio | accuracy diff | faster from (train samples) |"
        + (" time vs grouped Trainer | throughput vs grouped Trainer |" if grouped else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if grouped else ""),
    ]
    phases: list[str] = []
    for method, block in summary.items():
        for name, f in block.items():
            cells = [
                method,
                name,
                f"{f['wall_seconds']:.0f}",
                f"{f['fixed_seconds']:.0f}",
                f"{f['samples_per_second']:.1f}",
                f"{f['accuracy']:.4f}",
                f"{f['f1']:.4f}",
            ]
            if name not in TRAINERS:
                cross = f.get("crossover_train_samples")
                cells += [
                    f"{f['vs_hf_trainer_time_ratio']:.2f}",
                    f"{f['vs_hf_trainer_throughput_ratio']:.2f}",
                    f"{f['accuracy_difference']:+.4f}",
                    "never" if cross is None else f"{cross:,.0f}",
                ]
                if grouped:
                    cells += [
                        f"{f['vs_hf_trainer_grouped_time_ratio']:.2f}",
                        f"{f['vs_hf_trainer_grouped_throughput_ratio']:.2f}",
                    ]
                phases += [k for k in f["timings"] if k not in phases]
            else:
                cells += [""] * (6 if grouped else 4)
            lines.append("| " + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "| method | run | " + " | ".join(phases) + " |",
              "|---|---|" + "---|" * len(phases)]  # fmt: skip
    for method, block in summary.items():
        for name, f in block.items():
            if name not in TRAINERS:
                cells = [f"{f['timings'].get(k, 0.0):.1f}" for k in phases]
                lines.append(f"| {method} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_of(runs: list[dict[str, Any]], method: str, name: str) -> list[dict[str, Any]]:
    return [x for x in runs if x["method"] == method and x["scenario"] == name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="sentence-length train rows")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch")
    parser.add_argument("--lr", type=float, default=5e-5, help="full fine-tuning")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=["full"], choices=["full", "lora"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--name", default="peer", help="results file: benchmarks/results/NAME.json")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--model", default="minilm", choices=["minilm", "tiny"],
                        help="tiny: a host-bound random BERT (see TINY), for throughput only")  # fmt: skip
    args = parser.parse_args()
    if "hf_trainer" not in args.scenarios or not set(args.scenarios) - set(TRAINERS):
        parser.error("--scenarios: hf_trainer and at least one rayft run (the ratios need both)")
    args.work, _ = prepare_run(args.work, "peer")

    args.train = sst2_subset(args.rows, args.work)
    args.dev = sst2_dev_subset(None, args.work)
    ray_start = start_ray(2 + 2)  # init_ray's count: 2 CPUs of workers + 2 for data
    # The rows the Trainer trains on: rayft's kept rows (prepared once, in a scratch cache).
    rows = prepared_rows(
        rayft_config(
            args, "full", SCENARIOS["rayft_1x2"], args.work, os.path.join(args.work, "rows")
        )
    )
    print(f"ray start {ray_start:.1f}s; {len(rows['train'])} train rows kept of {args.rows}, "
          f"{len(rows['eval'])} dev rows", flush=True)  # fmt: skip

    runs: list[dict[str, Any]] = []
    names = args.scenarios
    for method in args.methods:
        for r in range(args.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                out = os.path.join(args.work, f"{method}-{name}-{r}")
                cpu = CpuCensus()
                cpu.start()
                if name in TRAINERS:
                    import torch

                    grouped, threads = TRAINERS[name]
                    before = torch.get_num_threads()
                    torch.set_num_threads(threads or before)
                    try:
                        figures = run_hf_trainer(args, method, rows, out, grouped)
                    finally:
                        torch.set_num_threads(before)
                else:
                    cache = os.path.join(out, "cache")  # cold: its own data stage
                    raw = rayft_config(args, method, SCENARIOS[name], out, cache)
                    figures = run_rayft(raw, ray_start)
                figures["cpu_shares"] = cpu.stop()  # foreign: other people's jobs
                runs.append({"method": method, "scenario": name, "repeat": r, **figures})
                print(f"{method} {name} repeat {r}: " + json.dumps(figures), flush=True)

    summary: dict[str, Any] = {}
    for method in args.methods:

        def med(name: str, key: str, method: str = method) -> float:
            return median([x[key] for x in runs_of(runs, method, name)])

        keys = ("wall_seconds", "fixed_seconds", "samples_per_second", "accuracy", "f1")
        hf = {k: med("hf_trainer", k) for k in keys}
        block: dict[str, Any] = {"hf_trainer": hf}
        others = [n for n in TRAINERS if n in names and n != "hf_trainer"]
        for other in others:
            block[other] = {k: med(other, k) for k in keys}
        for name in [n for n in names if n not in TRAINERS]:
            mine = {k: med(name, k) for k in (*keys, "data_wait_fraction")}
            for other in others:  # e.g. against the Trainer batching by length as rayft does
                mine[f"vs_{other}_time_ratio"] = mine["wall_seconds"] / block[other]["wall_seconds"]
                mine[f"vs_{other}_throughput_ratio"] = (
                    mine["samples_per_second"] / block[other]["samples_per_second"]
                )
            mine.update(
                vs_hf_trainer_time_ratio=mine["wall_seconds"] / hf["wall_seconds"],
                vs_hf_trainer_throughput_ratio=mine["samples_per_second"]
                / hf["samples_per_second"],
                accuracy_difference=mine["accuracy"] - hf["accuracy"],
                crossover_train_samples=crossover(hf, mine),
                timings={
                    k: median([x["timings"].get(k, 0.0) for x in runs_of(runs, method, name)])
                    for k in runs_of(runs, method, name)[0]["timings"]
                },
            )
            block[name] = mine
        summary[method] = block
    result = {
        **environment(),
        "setup": {
            "model": "all-MiniLM-L6-v2 (22.7M)"
            if args.model == "minilm"
            else {"random BERT, MiniLM's tokenizer": TINY},
            "methods": args.methods,
            "train_rows_requested": args.rows,
            "train_rows_kept": len(rows["train"]),
            "eval_rows": len(rows["eval"]),
            "epochs": args.epochs,
            "global_batch": args.batch_size,
            "lr_full": args.lr,
            "lr_lora": args.lora_lr,
            "warmup_ratio": args.warmup_ratio,
            "weight_decay": args.weight_decay,
            "max_seq_len": args.max_seq_len,
            "ray_start_seconds": ray_start,
            "rayft": "ZeRO stage 0 (rayft_1x2_zero2: stage 2), fp32; rayft_1x2 = 1 worker "
            "x 2 CPUs (batch 32), rayft_2x1 = 2 workers x 1 CPU (batch 16 each); local shuffle and "
            f"group_by_length {default_window()} (rayft's defaults; *_group50: 50); "
            "rayft_1x2_stream: the training split streamed (data.materialize never); "
            "wall = fit() + Ray start, "
            "cold data stage",
            "hf_trainer": "transformers Trainer in this process, random sampler "
            "(hf_trainer_grouped*: its train_sampling_strategy 'group_by_length'; "
            "*_1cpu: 1 torch thread), "
            "DataCollatorWithPadding; wall = tokenize + load + train + predict",
        },  # fmt: skip
        "summary": summary,
        "runs": runs,
    }
    path = write_result(args.name, result)
    print(tables(summary))
    for method, block in summary.items():
        print(f"{method}: the worker's wait for data, share of its training time: " + ", ".join(
            f"{name} {f['data_wait_fraction']:.2%}" for name, f in block.items()
            if "data_wait_fraction" in f))  # fmt: skip
    print(f"\n{path}")


if __name__ == "__main__":
    main()
