"""What padding to a multiple of 8 costs on a CPU: the same steps on batches padded to
the longest row against the same batches rounded up to a multiple of 8.

Before 5caeeeb every batch was rounded up to a multiple of 8 (Tensor Core tiles on a GPU);
a CPU worker now pads to its batch's longest row (`rayft.tasks.common.pad_multiple`).
bench_overhead's job (all-MiniLM-L6-v2, full fine-tuning, fp32, 2 torch threads, rayft's
DeepSpeed engine over a 1-rank gloo group): rayft's tokenized train split, read once and
collated both ways, so the rows and their order are the same on both sides and only the
padding differs. Each repeat trains a fresh model on each side (the order alternating);
the steady step time is the mean after the warm-up steps.

    python benchmarks/bench_padding.py --repeats 3
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

from bench_overhead import (
    MINILM,
    ab_parser,
    ab_setup,
    alternating,
    deepspeed_alone,
    environment,
    median,
    rayft_config,
    rayft_features,
    sst2_dev_subset,
    sst2_subset,
    start_ray,
    write_result,
)


def steady_step_seconds(cfg: Any, batches: list[dict[str, Any]], warmup: int) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification

    from rayft.config import resolve_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_path(MINILM), num_labels=2)
    engine, _ = deepspeed_alone(model, cfg, len(batches))  # one group for every run
    engine.train()
    seconds = []
    for batch in batches:
        tick = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        seconds.append(time.perf_counter() - tick)
    engine.destroy()
    steady = seconds[warmup:]
    return sum(steady) / len(steady)


def main() -> None:
    parser = ab_parser(__doc__, "padding", repeats=3)
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args()

    import ray
    import torch

    from rayft.config import resolve_paths, validate_config
    from rayft.tasks import get_task

    work = args.work = tempfile.mkdtemp(prefix="rayft-bench-padding-")
    raw = rayft_config(
        args, sst2_subset(args.rows, work), sst2_dev_subset(64, work), os.path.join(work, "run")
    )
    cfg = resolve_paths(validate_config(raw))
    start_ray(4)
    raw_batches = list(rayft_features(cfg))
    ray.shutdown()  # no Ray beside the loop: the two sides differ only in padding
    torch.set_num_threads(2)
    task = get_task(cfg.task)
    sides = {"longest": 1, "multiple_of_8": 8}
    batches = {
        side: [task.collate(batch, 0, multiple) for batch in raw_batches]
        for side, multiple in sides.items()
    }
    positions = {side: sum(b["input_ids"].numel() for b in bs) for side, bs in batches.items()}
    steady_positions = {
        side: sum(b["input_ids"].numel() for b in bs[args.warmup_steps :])
        for side, bs in batches.items()
    }
    print(f"{len(raw_batches)} batches, padded positions {positions}", flush=True)

    seconds: dict[str, list[float]] = {side: [] for side in sides}
    for repeat, side in alternating(list(sides), args.repeats):
        seconds[side].append(steady_step_seconds(cfg, batches[side], args.warmup_steps))
        print(f"repeat {repeat + 1} {side}: {seconds[side][-1]:.3f} s/step", flush=True)
    torch.distributed.destroy_process_group()
    ratios = [
        eight / longest
        for eight, longest in zip(seconds["multiple_of_8"], seconds["longest"], strict=True)
    ]
    summary = {
        "step_seconds_longest": median(seconds["longest"]),
        "step_seconds_multiple_of_8": median(seconds["multiple_of_8"]),
        "padding_time_ratio": median(ratios),
        "padding_time_ratios": ratios,
        "steady_positions_ratio": steady_positions["multiple_of_8"] / steady_positions["longest"],
    }
    path = write_result(
        args.name,
        {
            **environment(),
            "setup": ab_setup(args, len(raw_batches), padded_positions=positions),
            "seconds": seconds,
            "summary": summary,
        },
    )
    print(
        f"\n| padding | s/step (median) |\n|---|---|\n"
        f"| longest row | {summary['step_seconds_longest']:.3f} |\n"
        f"| multiple of 8 | {summary['step_seconds_multiple_of_8']:.3f} |\n\n"
        f"multiple of 8 / longest: {summary['padding_time_ratio']:.3f} "
        f"(per repeat {', '.join(f'{r:.3f}' for r in ratios)}); positions "
        f"{summary['steady_positions_ratio']:.3f}x over the steady steps; {path}"
    )


if __name__ == "__main__":
    sys.exit(main())
