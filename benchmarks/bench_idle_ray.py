"""What an idle local Ray costs a training loop beside it, by how Ray was started.

bench_overhead's plain loop (all-MiniLM-L6-v2, the same SST-2 rows, batches, optimizer
and threads) runs in this process with no Ray on the machine, and beside a fresh local Ray
started four ways: Ray's defaults, without its dashboard, with idle workers exiting
(`RAY_num_workers_soft_limit=0`), and both. Before each loop a data job reads the
prepared rows on that Ray, as a run's data stage would leave it. Settings alternate
(forward, reversed, ...); each loop's steps after the warm-up are averaged and its CPU is
split by process (bench_overhead's `CpuCensus`, inside `run_plain`).

    python benchmarks/bench_idle_ray.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from bench_overhead import (
    environment,
    helper_share,
    median,
    plain_rows,
    prepare_run,
    rayft_config,
    run_plain,
    sst2_dev_subset,
    sst2_subset,
    start_ray,
    write_result,
)

IDLE_WORKERS_EXIT = {"RAY_num_workers_soft_limit": "0", "RAY_prestart_worker_first_driver": "0"}
# name -> (include_dashboard, environment of the raylet); None: no Ray at all
SETTINGS: dict[str, tuple[bool | None, dict[str, str]] | None] = {
    "no_ray": None,
    "ray_defaults": (None, {}),
    "no_dashboard": (False, {}),
    "idle_workers_exit": (None, IDLE_WORKERS_EXIT),
    "both": (False, IDLE_WORKERS_EXIT),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1280, help="train rows (sentence-length)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=10, help="left out of the mean")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    args.work, _ = prepare_run(args.work, "idle-ray")
    args.eval_every, args.max_seq_len = 10, 128  # what rayft_config reads; no rayft run here

    import ray

    from rayft.config import resolve_paths, validate_config
    from rayft.data.prepare import check_sources, prepare

    train, eval_ = sst2_subset(args.rows, args.work), sst2_dev_subset(64, args.work)
    cfg = resolve_paths(validate_config(rayft_config(args, train, eval_, args.work)))
    start_ray(4)
    prepare(cfg, check_sources(cfg), outputs=False)
    rows = plain_rows(cfg)
    ray.shutdown()

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
    for r in range(args.repeats):
        order = list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]
        for name in order:
            setting = SETTINGS[name]
            if setting is not None:
                dashboard, env = setting
                os.environ.update(env)
                start_ray(4, include_dashboard=dashboard)
                plain_rows(cfg)  # a data job: Ray Data's actors and workers, as after a run's
                time.sleep(3)
            done = run_plain(cfg, rows, 2, args.warmup_steps)
            window = done["step_seconds"][args.warmup_steps :]
            roles = done["steady_cpu_roles"]
            runs[name].append({
                "step_seconds": sum(window) / len(window),
                "helper_cpu_share": helper_share(roles, "driver"),
                "ray_processes": sum(v["processes"] for k, v in roles.items()
                                     if k not in ("driver", "foreign")),
                "steady_cpu_roles": roles,
            })  # fmt: skip
            if ray.is_initialized():
                ray.shutdown()
            for key in IDLE_WORKERS_EXIT:
                os.environ.pop(key, None)
            last = runs[name][-1]
            print(f"repeat {r} {name}: {last['step_seconds']:.3f} s/step, Ray's processes "
                  f"{last['helper_cpu_share']:.1%} of the machine ({last['ray_processes']})",
                  flush=True)  # fmt: skip
            time.sleep(2)

    summary = {}
    for name, done in runs.items():
        ratios = [
            d["step_seconds"] / n["step_seconds"] for d, n in zip(done, runs["no_ray"], strict=True)
        ]
        summary[name] = {
            "step_seconds": median([d["step_seconds"] for d in done]),
            "ratio_to_no_ray": median(ratios),
            "ratio_to_no_ray_per_repeat": ratios,
            "helper_cpu_share": median([d["helper_cpu_share"] for d in done]),
        }
        print(f"{name}: {summary[name]['step_seconds']:.3f} s/step, "
              f"{summary[name]['ratio_to_no_ray']:.2f}x no Ray ("
              + " / ".join(f"{x:.2f}" for x in ratios) + ")", flush=True)  # fmt: skip
    path = write_result(
        "idle_ray",
        {**environment(), "setup": {"rows": args.rows, "batch_size": args.batch_size,
                                    "warmup_steps": args.warmup_steps, "torch_threads": 2},
         "summary": summary, "runs": runs},
    )  # fmt: skip
    print(path)


if __name__ == "__main__":
    main()
