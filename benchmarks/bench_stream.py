"""A streamed training split: how long the worker waits for each batch, first and after.

rayft's data stage prepares SST-2 rows (``--rows``); the training split is then built as
a run with `data.materialize: never` builds it (`build_datasets`: read, flag, tokenize
with MiniLM's tokenizer) and read as one Ray Train worker reads it: a streaming split of
1 with rayft's ingest options, batches of ``--batch-size`` with 2 prefetched. Each batch is
followed by ``--step-ms`` of 2-thread matrix products standing in for a training step
(the cores are shared with the reading and tokenizing, as in a run). For each of
``--epochs`` epochs: the wait for its first batch and for all the others.

    python benchmarks/bench_stream.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from bench_overhead import (
    MINILM,
    environment,
    quiet_run_config,
    sst2_dev_subset,
    sst2_subset,
    start_ray,
    write_result,
)


def streamed_split(work: str, rows: int) -> Any:
    """The training split as a `materialize: never` run streams it, split for 1 worker."""
    import ray.data

    from rayft.config import resolve_paths, validate_config
    from rayft.data.prepare import check_sources, prepare
    from rayft.loop import Plan
    from rayft.trainer import build_datasets, ingest_options

    cfg = resolve_paths(validate_config(quiet_run_config({
        "task": "sequence_classification", "method": "full",
        "output_dir": os.path.join(work, "run"), "model": {"name_or_path": MINILM},
        "data": {"train": sst2_subset(rows, work), "eval": sst2_dev_subset(64, work),
                 "text_column": "sentence", "label_column": "label", "dedup": {"near": False},
                 "materialize": "never", "cache_dir": os.path.join(work, "cache")},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2},
    })))  # fmt: skip
    prepared = prepare(cfg, check_sources(cfg))
    plan = Plan.derive(cfg, prepared.labels, prepared.units, 1)
    train = build_datasets(cfg, prepared, plan)["train"]
    ray.data.DataContext.get_current().execution_options = ingest_options()
    return train.streaming_split(1, equal=True)[0]


def epoch(split: Any, batch_size: int, step_seconds: float) -> dict[str, Any]:
    import torch

    a = torch.randn(700, 700)
    waits = []
    started = waited = time.perf_counter()
    for _ in split.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
        waits.append(time.perf_counter() - waited)
        busy = time.perf_counter()
        while time.perf_counter() - busy < step_seconds:
            a @ a
        waited = time.perf_counter()
    return {"batches": len(waits), "seconds": time.perf_counter() - started,
            "first_batch_wait_seconds": waits[0], "other_batches_wait_seconds": sum(waits[1:]),
            "largest_other_wait_seconds": max(waits[1:], default=0.0)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20000, help="SST-2 train rows")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--step-ms", type=float, default=94.0,
                        help="busy time per batch (bench_peer's host-bound step: ~94 ms)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--name", default="stream")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)  # as the worker's torch, holding 2 CPUs
    work = tempfile.mkdtemp(prefix="rayft-bench-stream-")
    start_ray(2 + 2)  # init_ray's count: 2 CPUs of the worker + 2 for data
    split = streamed_split(work, args.rows)
    epochs = []
    for index in range(args.epochs):
        epochs.append(epoch(split, args.batch_size, args.step_ms / 1000))
        print(f"epoch {index}: " + ", ".join(f"{k} {v:.2f}" for k, v in epochs[-1].items()),
              flush=True)  # fmt: skip
    print("wrote", write_result(args.name, {
        **environment(), "rows": args.rows, "batch_size": args.batch_size,
        "step_ms": args.step_ms, "epochs": epochs,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
