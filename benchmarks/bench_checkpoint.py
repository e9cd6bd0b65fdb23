"""What checkpoints cost a run's steps: `checkpoint.upload: sync` (the workers wait while
Ray Train copies each checkpoint to `storage_path` and its controller collects the report)
against `async` (a background thread does both and the workers train on).

rayft runs of a MiniLM job (full fine-tuning, 1 worker x 2 CPUs, batch 16) that
checkpoint, and so evaluate 64 dev rows, every ``--every`` steps for ``--steps`` steps
(with ``--eval-every``, also evaluate and report without a checkpoint in between), on
a local Ray of this process's own; ``--runs`` per upload mode, alternating, after a run
that warms the data cache. Per run: `fit()`'s wall time, the worker's `train`,
`checkpoint` (writing the states locally) and `report` (handing them to Ray Train)
sections, `launch` (Ray Train's start and stop, which now holds what an async run still
had to send when training ended), and whether every checkpoint kept in storage is
complete and no local copy was left behind.

    python benchmarks/bench_checkpoint.py --steps 60 --every 10 --runs 3
    python benchmarks/bench_checkpoint.py --steps 60 --every 0 --eval-every 6 --runs 3 \
        --name checkpoint_reports   # reports of metrics only: what waiting for the poll costs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from typing import Any

from bench_launch import minilm_job, warmed_schedule
from bench_overhead import (
    environment,
    median,
    sst2_dev_subset,
    sst2_subset,
    start_ray,
    write_result,
)

from rayft import checkpoint as ckpt

SECTIONS = ("train", "eval", "checkpoint", "report", "launch")


def run_once(
    work: str, run: int, mode: str, steps: int, every: int, eval_every: int
) -> dict[str, Any]:
    from rayft.config import resolve_paths
    from rayft.data import fs
    from rayft.trainer import fit, resumed_run_name

    train, dev = sst2_subset(max(400, 16 * steps), work), sst2_dev_subset(64, work)
    cfg = minilm_job(
        work, f"ckpt-{run}", train, dev,
        checkpoint={"every_steps": every or None, "upload": mode, "keep": 2},
        max_steps=steps, **({"eval_every_steps": eval_every} if eval_every else {}),
    )  # fmt: skip
    before = ckpt.local_copies()  # the workers of this local Ray share its temp dir
    started = time.perf_counter()
    metrics = fit(cfg)
    wall = time.perf_counter() - started
    cfg = resolve_paths(cfg)
    run_dir = fs.join(cfg.storage_path, resumed_run_name(cfg))  # the run fit just ran
    kept = ckpt.checkpoints_of_run(run_dir)
    complete = []
    for path in kept:
        with contextlib.suppress(ckpt.IncompleteCheckpoint):
            complete.append(ckpt.check_complete(path)["step"])
    timings = metrics["timings"]
    return {
        "upload": mode,
        "wall_seconds": wall,
        **{f"{s}_seconds": timings.get(s, 0.0) for s in SECTIONS},
        "samples_per_second": metrics["train_samples"] / timings["train"],
        "checkpoints_kept": len(kept),
        "checkpoints_complete_steps": complete,
        "local_copies_left": len(ckpt.local_copies() - before),
        "eval_loss": metrics["eval_loss"],
        "timings": timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--every",
        type=int,
        default=10,
        help="checkpoint (and evaluate) every N steps; 0: only at the end",
    )
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also evaluate (and report) every N steps")  # fmt: skip
    parser.add_argument("--runs", type=int, default=3, help="measured runs per upload mode")
    parser.add_argument("--uploads", nargs="+", default=["sync", "async"])
    parser.add_argument("--name", default="checkpoint", help="results/NAME.json")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="rayft-bench-ckpt-")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    start_ray(2 + 2)
    runs = []
    for run, mode in enumerate(warmed_schedule(args.uploads, args.runs)):
        found = run_once(work, run, mode, args.steps, args.every, args.eval_every)
        print(f"run {run}, upload {mode}: " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in found.items() if k not in ("upload", "timings")), flush=True)  # fmt: skip
        if run:
            runs.append(found)
    summary: dict[str, Any] = {}
    for mode in args.uploads:
        mine = [r for r in runs if r["upload"] == mode]
        summary[mode] = {
            key: median([r[key] for r in mine])
            for key in ("wall_seconds", *(f"{s}_seconds" for s in SECTIONS),
                        "samples_per_second")
        }  # fmt: skip
        summary[mode]["steps_plus_checkpoints_seconds"] = median(
            [r["train_seconds"] + r["checkpoint_seconds"] + r["report_seconds"] for r in mine]
        )
    first = summary[args.uploads[0]]
    for mode in args.uploads[1:]:
        entry = summary[mode]
        entry[f"wall_ratio_vs_{args.uploads[0]}"] = entry["wall_seconds"] / first["wall_seconds"]
        entry[f"steps_plus_checkpoints_ratio_vs_{args.uploads[0]}"] = (
            entry["steps_plus_checkpoints_seconds"] / first["steps_plus_checkpoints_seconds"]
        )
    path = write_result(args.name, {
        **environment(sys.argv),
        "setup": {"steps": args.steps, "every": args.every, "eval_every": args.eval_every,
                  "runs": args.runs,
                  "uploads": args.uploads, "job": "MiniLM full, 1 worker x 2 CPUs, batch 16, "
                  "64 dev rows evaluated with each checkpoint, keep 2, local storage_path"},
        "summary": summary, "runs": runs,
    })  # fmt: skip
    print(
        "\n| upload | wall s | train s | checkpoint s | report s | launch s | "
        "steps + checkpoints s | samples/s |\n|---|---|---|---|---|---|---|---|"
    )
    for mode in args.uploads:
        s = summary[mode]
        print(f"| {mode} | {s['wall_seconds']:.1f} | {s['train_seconds']:.1f} | "
              f"{s['checkpoint_seconds']:.1f} | {s['report_seconds']:.1f} | "
              f"{s['launch_seconds']:.1f} | {s['steps_plus_checkpoints_seconds']:.1f} | "
              f"{s['samples_per_second']:.1f} |")  # fmt: skip
    print(path)


if __name__ == "__main__":
    main()
