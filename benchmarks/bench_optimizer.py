"""AdamW's three torch implementations in rayft's DeepSpeed engine on a CPU: per-tensor
(torch's CPU default), multi-tensor (`foreach`, rayft's until 2026-12-05) and fused
(rayft's since, as the Hugging Face Trainer's default `adamw_torch_fused`).

bench_overhead's job (all-MiniLM-L6-v2, full fine-tuning, fp32, 2 torch threads, rayft's
DeepSpeed engine at ZeRO stage 0 over a 1-rank gloo group, no Ray running): rayft's
tokenized train split, read once and collated as a CPU worker collates it, so every side
trains the same batches. Each repeat trains a fresh engine per side (the order
alternating) and switches only the optimizer's implementation flags; the steady figures
are means after the warm-up steps: the whole step, and `engine.step()` alone (clipping,
AdamW, schedule, zero_grad).

    python benchmarks/bench_optimizer.py --repeats 3
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

# The flags of each side on every param group of torch's AdamW.
SIDES = {
    "per_tensor": {"fused": False, "foreach": False},
    "foreach": {"fused": False, "foreach": True},
    "fused": {"fused": True, "foreach": False},
}


def steady_seconds(
    cfg: Any, batches: list[dict[str, Any]], warmup: int, flags: dict[str, bool]
) -> tuple[float, float]:
    """(mean step seconds, mean `engine.step()` seconds) after ``warmup`` steps."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rayft.config import resolve_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_path(MINILM), num_labels=2)
    engine, _ = deepspeed_alone(model, cfg, len(batches))  # one group for every run
    for group in engine.optimizer.param_groups:
        group.update(flags)
    engine.train()
    steps, updates = [], []
    for batch in batches:
        tick = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        before_step = time.perf_counter()
        engine.step()
        done = time.perf_counter()
        steps.append(done - tick)
        updates.append(done - before_step)
    engine.destroy()
    return mean_after(steps, warmup), mean_after(updates, warmup)


def mean_after(values: list[float], skip: int) -> float:
    tail = values[skip:]
    return sum(tail) / len(tail)


def main() -> None:
    parser = ab_parser(__doc__, "optimizer", repeats=3)
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args()

    import ray
    import torch

    from rayft.config import resolve_paths, validate_config
    from rayft.tasks import get_task
    from rayft.tasks.common import pad_multiple

    work = args.work = tempfile.mkdtemp(prefix="rayft-bench-optimizer-")
    raw = rayft_config(
        args, sst2_subset(args.rows, work), sst2_dev_subset(64, work), os.path.join(work, "run")
    )
    cfg = resolve_paths(validate_config(raw))
    start_ray(4)
    task = get_task(cfg.task)
    batches = [task.collate(b, 0, pad_multiple("cpu")) for b in rayft_features(cfg)]
    ray.shutdown()  # no Ray beside the loop: the sides differ only in the optimizer
    torch.set_num_threads(2)
    print(f"{len(batches)} batches", flush=True)

    step: dict[str, list[float]] = {side: [] for side in SIDES}
    update: dict[str, list[float]] = {side: [] for side in SIDES}
    for repeat, side in alternating(list(SIDES), args.repeats):
        s, u = steady_seconds(cfg, batches, args.warmup_steps, SIDES[side])
        step[side].append(s)
        update[side].append(u)
        print(f"repeat {repeat + 1} {side}: {s:.3f} s/step, engine.step() {u * 1000:.0f} ms",
              flush=True)  # fmt: skip
    torch.distributed.destroy_process_group()

    def ratios(side: str, base: str) -> list[float]:
        return [a / b for a, b in zip(step[side], step[base], strict=True)]

    summary: dict[str, Any] = {
        side: {"step_seconds": median(step[side]), "optimizer_step_seconds": median(update[side])}
        for side in SIDES
    }
    summary.update(
        fused_vs_foreach_step_time_ratio=median(ratios("fused", "foreach")),
        fused_vs_foreach_step_time_ratios=ratios("fused", "foreach"),
        fused_vs_per_tensor_step_time_ratio=median(ratios("fused", "per_tensor")),
        foreach_vs_per_tensor_step_time_ratio=median(ratios("foreach", "per_tensor")),
    )
    path = write_result(
        args.name,
        {
            **environment(),
            "setup": ab_setup(args, len(batches), engine="rayft's DeepSpeed engine, stage 0"),
            "seconds": {"step": step, "optimizer_step": update},
            "summary": summary,
        },
    )
    print("\n| AdamW | s/step (median) | engine.step() ms |\n|---|---|---|")
    for side in SIDES:
        found = summary[side]
        print(f"| {side} | {found['step_seconds']:.3f} | "
              f"{found['optimizer_step_seconds'] * 1000:.0f} |")  # fmt: skip
    print(
        f"\nfused / foreach: {summary['fused_vs_foreach_step_time_ratio']:.3f} (per repeat "
        f"{', '.join(f'{r:.3f}' for r in summary['fused_vs_foreach_step_time_ratios'])}); "
        f"fused / per-tensor {summary['fused_vs_per_tensor_step_time_ratio']:.3f}; {path}"
    )


if __name__ == "__main__":
    sys.exit(main())
