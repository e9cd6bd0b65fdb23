"""Where rayft's step-time overhead comes from: the same training steps moved one layer
at a time from a plain loop to a rayft run.

bench_overhead's job (all-MiniLM-L6-v2, full fine-tuning, fp32, the same SST-2 rows,
batches and 2 torch threads) on rungs that each add one thing to the one before:

1. `plain`: the plain loop in this process, no Ray on the machine;
2. `beside_ray`: the same beside an idle local Ray (its daemons, Ray Data's actors);
3. `in_actor`: the same loop inside a Ray actor holding 2 CPUs (a Ray worker process:
   its core-worker threads, the 10 ms signal poll of its main thread);
4. `deepspeed_in_actor`: that loop stepping through rayft's DeepSpeed engine (its config,
   multi-tensor AdamW, clipping and schedule) over a 1-rank gloo group;
5. `deepspeed_in_thread`: the same in a thread of the actor other than its main one (Ray
   Train runs the training function so);
6. `deepspeed_ray_data`: the same fed by rayft's tokenized split through Ray Data's
   iterator (`iter_batches`, 2 batches prefetched, the task's collate), as rayft's worker
   reads its shard; `deepspeed_ray_data_no_prefetch` the same with none prefetched;
   `deepspeed_blocks` the split's Arrow blocks fetched in the training thread, no Ray Data
   iterator (alternatives to rung 6, not steps above it);
7. `rayft`: a rayft run with 1 worker (Ray Train's controller and actors, rayft's loop,
   reports and evaluations).

Rungs 1-6 use the optimizer rayft uses (multi-tensor AdamW), so each step up the ladder
changes one layer. Each repeat runs every rung asked for (`--rungs`, in ladder order; the
ratios are to the rung below and to the first), the order alternating; each rung's steady
step time is averaged over the same step window as rayft's (bench_overhead), and the CPU of
the machine split by process over it.

    python benchmarks/bench_ladder.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any

from bench_overhead import (
    HERE,
    CpuCensus,
    environment,
    helper_share,
    median,
    plain_rows,
    prepare_run,
    rayft_config,
    run_plain,
    run_rayft,
    sst2_dev_subset,
    sst2_subset,
    start_ray,
    write_result,
)

# rung -> how the loop runs inside the actor: (engine, in a thread, how rayft's split is
# read: `rayft_batches`' keyword arguments, None for the rows tokenized in the loop)
IN_ACTOR: dict[str, tuple[str, bool, dict[str, Any] | None]] = {
    "in_actor": ("torch", False, None),
    "deepspeed_in_actor": ("deepspeed", False, None),
    "deepspeed_in_thread": ("deepspeed", True, None),
    "deepspeed_ray_data": ("deepspeed", True, {"prefetch": 2}),
    "deepspeed_ray_data_no_prefetch": ("deepspeed", True, {"prefetch": 0}),
    "deepspeed_blocks": ("deepspeed", True, {"blocks": True}),
}
RUNGS = ["plain", "beside_ray", *IN_ACTOR, "rayft"]
# The rung each is measured against where it is not the one listed before it.
BELOW = {
    "deepspeed_ray_data_no_prefetch": "deepspeed_in_thread",
    "deepspeed_blocks": "deepspeed_in_thread",
    "rayft": "deepspeed_ray_data",
}


def actor_loop(cfg: Any, rows: list[dict[str, Any]], warmup: int, rung: str) -> dict[str, Any]:
    """`run_plain` inside a Ray actor holding 2 CPUs, the CPU split taken from here."""
    import ray

    engine, in_thread, ray_data = IN_ACTOR[rung]

    @ray.remote(num_cpus=2)
    class LoopActor:
        def run(self, cfg_json: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
            sys.path.insert(0, HERE)
            from bench_overhead import run_plain

            from rayft.config import RayftConfig

            cfg = RayftConfig.model_validate(cfg_json)
            kwargs = {"engine": engine, "census": False, "ray_data": ray_data}
            if not in_thread:
                return run_plain(cfg, rows, 2, warmup, **kwargs)
            done: list[Any] = []
            thread = threading.Thread(
                target=lambda: done.append(run_plain(cfg, rows, 2, warmup, **kwargs))
            )
            thread.start()
            thread.join()
            if not done:
                raise RuntimeError(f"{rung}: the training thread failed (its traceback is above)")
            return done[0]

    cpu = CpuCensus()
    cpu.start()
    actor = LoopActor.remote()
    done = ray.get(actor.run.remote(cfg.model_dump(mode="json"), rows))
    ray.kill(actor)
    shares = cpu.stop()
    done.update(
        foreign_cpu_fraction=shares["foreign"],
        steady_cpu_roles=cpu.roles(done["steady_from"], done["steady_until"]),
    )
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1280, help="train rows (sentence-length)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=10, help="left out of steady state")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--rungs", nargs="+", choices=RUNGS, default=RUNGS,
                        help="the rungs to run (at least two; run in ladder order)")  # fmt: skip
    parser.add_argument("--name", default="ladder", help="results: benchmarks/results/NAME.json")
    args = parser.parse_args()
    rungs = [rung for rung in RUNGS if rung in args.rungs]
    if len(rungs) < 2 or "rayft" not in rungs:
        parser.error("--rungs: give at least two, rayft among them (its steps set the window)")
    args.work, timeline = prepare_run(args.work, "ladder")
    args.eval_every, args.max_seq_len = 10, 128

    import ray

    from rayft.config import resolve_paths, validate_config
    from rayft.data.prepare import check_sources, prepare

    train, eval_ = sst2_subset(args.rows, args.work), sst2_dev_subset(64, args.work)
    base = rayft_config(args, train, eval_, os.path.join(args.work, "run"))
    cfg = resolve_paths(validate_config(base))
    start_ray(2 + 2)
    prepare(cfg, check_sources(cfg), outputs=False)  # cold: the rayft runs reuse the shards
    rows = plain_rows(cfg)

    repeats = []
    for r in range(args.repeats):
        order = rungs if r % 2 == 0 else rungs[::-1]
        done: dict[str, Any] = {"order": order}
        for rung in order:
            if rung == "plain" and ray.is_initialized():
                ray.shutdown()
            elif rung != "plain" and not ray.is_initialized():
                start_ray(2 + 2)
            if rung == "rayft":
                raw = json.loads(json.dumps(base))
                raw["output_dir"] = os.path.join(args.work, f"run-{r}")
                done[rung] = run_rayft(raw, timeline, args.warmup_steps)
            elif rung in ("plain", "beside_ray"):
                done[rung] = run_plain(cfg, rows, 2, args.warmup_steps)
            else:
                done[rung] = actor_loop(cfg, rows, args.warmup_steps, rung)
        steady = done["rayft"]["steady"]
        for rung in rungs:
            if rung != "rayft":
                window = done[rung]["step_seconds"][steady["from_step"] : steady["to_step"]]
                done[rung]["steady_step_seconds"] = sum(window) / len(window)
            else:
                done[rung]["steady_step_seconds"] = steady["step_seconds"]
            training = "RayTrainWorker" if rung == "rayft" else "LoopActor"
            training = "driver" if rung in ("plain", "beside_ray") else training
            done[rung]["helper_cpu_share"] = helper_share(done[rung]["steady_cpu_roles"], training)
        repeats.append(done)
        print(f"repeat {r}: " + ", ".join(f"{rung} {done[rung]['steady_step_seconds']:.3f}"
                                          for rung in rungs) + " s/step", flush=True)  # fmt: skip

    summary: dict[str, Any] = {}
    for i, rung in enumerate(rungs):
        steps = [rep[rung]["steady_step_seconds"] for rep in repeats]
        to_first = [
            s / rep[rungs[0]]["steady_step_seconds"] for s, rep in zip(steps, repeats, strict=True)
        ]
        below = BELOW[rung] if BELOW.get(rung) in rungs else rungs[max(i - 1, 0)]
        to_below = [
            s / rep[below]["steady_step_seconds"] for s, rep in zip(steps, repeats, strict=True)
        ]
        summary[rung] = {
            "steady_step_seconds": median(steps),
            "rung_below": below,
            "ratio_to_first_rung": median(to_first),
            "ratio_to_first_rung_per_repeat": to_first,
            "ratio_to_rung_below": median(to_below),
            "ratio_to_rung_below_per_repeat": to_below,
            "helper_cpu_share": median([rep[rung]["helper_cpu_share"] for rep in repeats]),
        }
    if rungs[0] == "plain":
        summary["overhead_ratio"] = summary["rayft"]["ratio_to_first_rung"]
    path = write_result(
        args.name,
        {**environment(),
         "setup": {"rows": len(rows), "batch_size": args.batch_size,
                   "warmup_steps": args.warmup_steps, "torch_threads": 2,
                   "optimizer_below_rayft": "torch AdamW, fused, as rayft's",
                   "rungs": rungs},
         "summary": summary, "repeats": repeats},
    )  # fmt: skip
    print(
        f"\n| rung | s/step (median) | against the rung below (per repeat) | x {rungs[0]} | Ray's "
        "other processes |\n|---|---|---|---|---|"
    )
    for rung in rungs:
        s = summary[rung]
        print(
            f"| {rung} | {s['steady_step_seconds']:.3f} | {s['ratio_to_rung_below']:.3f} "
            f"{'' if s['rung_below'] == rung else 'x ' + s['rung_below']} ("
            + " / ".join(f"{x:.2f}" for x in s["ratio_to_rung_below_per_repeat"])
            + f") | {s['ratio_to_first_rung']:.3f} | {s['helper_cpu_share']:.1%} |"
        )
    print(path)


if __name__ == "__main__":
    main()
