"""ZeRO stages 0-3 at 2 workers: training throughput, peak memory per worker, and the
memory of the model states per parameter against the ZeRO formulas.

Model: all-MiniLM-L6-v2 (22.7M parameters, full fine-tuning, fp32 on CPU, gloo).
Throughput: a rayft run per stage (`rayft.trainer.fit`, 2 workers x 1 CPU, 16 sentence-
length SST-2 rows per worker per step), its steady-state pace from history.jsonl after a
warm-up. Memory: `benchmarks/bench_plan.py`'s measurement, reused as is (fresh rank
processes, RssAnon sampled every millisecond, the process's baseline after imports, gloo
and a throw-away model build subtracted; 2 steps of 16 x 128 tokens). Model states are
read after the second backward pass, when weights, gradients and Adam's states (created
by the first step) all exist and the activations are freed; divided by the parameter
count they give bytes per parameter, set beside the ZeRO paper's fp32 formulas (N
workers: stage 0 4+4+8, stage 1 4+4+8/N, stage 2 4+(4+8)/N, stage 3 16/N) and beside
`rayft.plan`'s estimate (which adds DeepSpeed's fp32 master copy and its buffers).

    python benchmarks/bench_zero.py --steps 24 --eval-every 8 --repeats 2

With ``--workers 1`` it measures what each stage costs a run of one worker, which ZeRO
has nothing to partition for (why `deepspeed.stage: auto` runs stage 0 there):

    python benchmarks/bench_zero.py --workers 1 --steps 24 --eval-every 8 --repeats 2 \
        --name zero_1worker
"""

from __future__ import annotations

import argparse
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
    read_history,
    sst2_dev_subset,
    sst2_subset,
    start_ray,
    steady_state,
    write_result,
)
from bench_plan import measure, planned

STAGES = (0, 1, 2, 3)


def zero_formula(stage: int, n: int) -> float:
    """Bytes per parameter of fp32 model states (weights, gradients, Adam m and v)."""
    return {0: 4 + 4 + 8, 1: 4 + 4 + 8 / n, 2: 4 + (4 + 8) / n, 3: 16 / n}[stage]


def rayft_config(args: argparse.Namespace, stage: int, out: str) -> dict[str, Any]:
    return quiet_run_config({
        "task": "sequence_classification", "method": "full", "output_dir": out,
        "model": {"name_or_path": MINILM},
        "data": {"train": args.train, "eval": args.dev, "text_column": "sentence",
                 "label_column": "label", "dedup": {"near": False},
                 "cache_dir": os.path.join(args.work, "cache")},
        "scaling": {"num_workers": args.workers, "cpus_per_worker": 1},
        "deepspeed": {"stage": stage, "precision": "fp32"},
        "train": {"epochs": 1, "batch_size": args.batch_size, "lr": 2e-5,
                  "max_steps": args.steps, "eval_every_steps": args.eval_every,
                  "max_seq_len": args.max_seq_len, "log_every_steps": 1000},
    })  # fmt: skip


def throughput(args: argparse.Namespace, stage: int, repeat: int) -> dict[str, Any]:
    from rayft.config import validate_config
    from rayft.trainer import fit

    out = os.path.join(args.work, f"z{stage}-{repeat}")
    cpu = CpuCensus()
    cpu.start()
    started = time.time()
    metrics = fit(validate_config(rayft_config(args, stage, out)))
    steady = steady_state(read_history(out), args.eval_every)
    return {
        "wall_seconds": time.time() - started,
        "samples_per_second": steady["samples_per_second"],
        "step_seconds": steady["step_seconds"],
        "tokens_per_second": steady["tokens_per_second"],
        "run_samples_per_second": metrics["train_samples_per_second"],
        "data_wait_fraction": metrics["data_wait_fraction"],
        "cpu_shares": cpu.stop(),  # foreign: other people's jobs
    }


def memory(args: argparse.Namespace, stage: int) -> dict[str, Any]:
    spec = {
        "name": f"minilm full z{stage} w{args.workers}", "model": MINILM,
        "task": "sequence_classification", "method": "full", "stage": stage,
        "workers": args.workers, "batch": args.batch_size, "seq": args.max_seq_len,
        "ckpt": False,
    }  # fmt: skip
    cpu = CpuCensus()
    cpu.start()
    ranks = measure(spec, 29700 + stage)
    shares = cpu.stop()
    plan = planned(spec)
    params = plan["shape"]["params"]

    def after(event: str, index: int) -> int:
        """The larger rank's resident memory (over its baseline) at the index-th event."""
        return max([e for e in r["trace"] if e[0] == event][index][1] for r in ranks)

    states = after("backward", 1)  # second step: Adam's states exist, activations freed
    return {
        "params": params,
        "peak_bytes": max(r["peak"] for r in ranks),  # over the process's baseline
        "baseline_bytes": max(r["base"] for r in ranks),  # imports, gloo: before the model
        "built_bytes": max(r["built"] for r in ranks),
        "model_states_bytes": states,
        "resting_bytes": after("step", 1),  # after the step: gradients released
        "built_bytes_per_param": max(r["built"] for r in ranks) / params,
        "model_states_bytes_per_param": states / params,
        "zero_formula_bytes_per_param": zero_formula(stage, args.workers),
        "measured_vs_formula_ratio": states / params / zero_formula(stage, args.workers),
        "planner_states_and_buffers_bytes_per_param": (plan["model_states"] + plan["buffers"])
        / params,
        "planner_peak_bytes": plan["total"],
        "planner_peak_error": (plan["total"] - max(r["peak"] for r in ranks))
        / max(r["peak"] for r in ranks),
        "step_seconds_full_length": ranks[0]["step_seconds"],
        "ranks": ranks,
        "cpu_shares": shares,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    parser.add_argument("--eval-every", type=int, default=8, help="also the warm-up")
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="throughput runs per stage")
    parser.add_argument("--stages", type=int, nargs="+", default=list(STAGES))
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--name", default="zero", help="results: benchmarks/results/NAME.json")
    args = parser.parse_args()
    args.work, _ = prepare_run(args.work, "zero")
    rows = args.steps * args.batch_size * args.workers
    args.train = sst2_subset(rows + rows // 10, args.work)  # a margin for deduplication
    args.dev = sst2_dev_subset(args.eval_rows, args.work)

    # Memory first, in fresh processes and without Ray running beside them.
    mem = {}
    for stage in args.stages:
        mem[stage] = memory(args, stage)
        m = mem[stage]
        print(f"stage {stage}: peak {m['peak_bytes'] / 2**20:.0f} MiB, model states "
              f"{m['model_states_bytes_per_param']:.2f} B/param (formula "
              f"{m['zero_formula_bytes_per_param']:.2f})", flush=True)  # fmt: skip

    ray_start = start_ray(args.workers + 2)
    runs: dict[int, list[dict[str, Any]]] = {s: [] for s in args.stages}
    for r in range(args.repeats):
        for stage in args.stages if r % 2 == 0 else args.stages[::-1]:
            runs[stage].append(throughput(args, stage, r))
            print(f"stage {stage} repeat {r}: {runs[stage][-1]}", flush=True)

    base = args.stages[0]
    speed = {s: median([x["samples_per_second"] for x in runs[s]]) for s in args.stages}
    summary = {
        f"stage{s}": {
            "samples_per_second": speed[s],
            "throughput_vs_stage0_ratio": speed[s] / speed[base],
            "peak_mib_per_worker": mem[s]["peak_bytes"] / 2**20,
            "peak_vs_stage0_ratio": mem[s]["peak_bytes"] / mem[base]["peak_bytes"],
            "process_baseline_mib": mem[s]["baseline_bytes"] / 2**20,
            "model_states_bytes_per_param": mem[s]["model_states_bytes_per_param"],
            "zero_formula_bytes_per_param": mem[s]["zero_formula_bytes_per_param"],
            "measured_vs_formula_ratio": mem[s]["measured_vs_formula_ratio"],
            "planner_states_and_buffers_bytes_per_param": mem[s][
                "planner_states_and_buffers_bytes_per_param"
            ],
            "built_bytes_per_param": mem[s]["built_bytes_per_param"],
        }
        for s in args.stages
    }
    result = {
        **environment(),
        "setup": {
            "model": "all-MiniLM-L6-v2 (22.7M), full fine-tuning, fp32, gloo",
            "workers": f"{args.workers} x 1 CPU",
            "throughput": f"rayft fit, {args.steps} steps of {args.batch_size} sentence-length "
            f"SST-2 rows per worker, steady state after step {args.eval_every}",
            "memory": f"bench_plan.measure: 2 steps of {args.batch_size} x {args.max_seq_len} "
            "random tokens per worker; RssAnon over the pre-build baseline, larger rank",
            "ray_start_seconds": ray_start,
        },
        "summary": summary,
        "memory": {str(s): m for s, m in mem.items()},
        "throughput_runs": {str(s): x for s, x in runs.items()},
    }
    path = write_result(args.name, result)
    print("\n| stage | samples/s | vs stage 0 | peak MiB/worker | model states B/param "
          "| ZeRO formula | measured/formula | rayft.plan states+buffers |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for s in args.stages:
        f = summary[f"stage{s}"]
        print(f"| {s} | {f['samples_per_second']:.1f} | {f['throughput_vs_stage0_ratio']:.2f} "
              f"| {f['peak_mib_per_worker']:.0f} | {f['model_states_bytes_per_param']:.2f} "
              f"| {f['zero_formula_bytes_per_param']:.2f} | {f['measured_vs_formula_ratio']:.2f} "
              f"| {f['planner_states_and_buffers_bytes_per_param']:.2f} |")  # fmt: skip
    print(f"\n{path}")


if __name__ == "__main__":
    main()
