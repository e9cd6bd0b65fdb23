"""Where a run's fixed seconds go before and after its training: Ray Train starting and
stopping a worker group (what a run's `launch` holds: the driver's `run` less the worker's
own wall time, rayft.timing), and the libraries the worker imports (in its `setup`).

Five measurements, on a local Ray of this process's own:

1. `imports`: each library the training function needs, imported in a fresh Python
   process in the order the worker meets them (median of ``--repeats``); `rayft.loop`
   itself imports torch only, the rest are imported once the function runs;
2. `bare`: Ray Train alone, a `TorchTrainer` of 1 worker x 2 CPUs whose function only
   sleeps (3 s, 0.5 s more each repeat, so its end falls at a different point of the
   controller's polling each time) and notes when it started and ended: seconds from
   `fit()` to the function, and from its end back to `fit()` returning; for each Ray
   Train controller poll interval in ``--intervals`` (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`,
   Ray's default 2 s), alternating;
3. `poll_cpu`: what each interval costs while a worker trains: the machine's CPU by
   process over 25 s of a function that only sleeps (a stand-in for the training steps
   the polls interrupt);
4. `rayft`: rayft runs of a 4-step MiniLM job (after one run that warms the data cache),
   their `launch` taken apart by when the driver receives Ray Train's log lines (the
   controller asking for resources, the worker group started, the final report; Ray
   forwards the workers' lines with some delay, so the split is approximate); with
   several ``--rayft-intervals``, that many runs at each controller poll interval,
   alternating;
5. `reports`: rayft runs that evaluate (and so report) at every step, at each of
   ``--rayft-intervals``: the seconds their `ray.train.report` calls took (the `report`
   timing), against their training steps. The controller collects one report per poll.
6. `cli`: `python -m rayft.train` of the 4-step job in a fresh process per run (joining
   this benchmark's Ray, as a run on a machine with `ray start` does), as a worker group
   of one and in the process itself (`scaling.in_process`), alternating after a warming
   run of each: the command's wall time, and its `timings`.

    python benchmarks/bench_launch.py --repeats 4
    python benchmarks/bench_launch.py --parts rayft --name launch_rayft   # rayft's part only
    python benchmarks/bench_launch.py --parts rayft --rayft-intervals 2.0 0.5 --name launch_poll
    python benchmarks/bench_launch.py --parts reports --rayft-intervals 2.0 0.5 --rayft-runs 2 \
        --name launch_reports
    python benchmarks/bench_launch.py --parts cli --rayft-runs 4 --name launch_in_process
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench_overhead import (
    MINILM,
    CpuCensus,
    Timeline,
    alternating,
    environment,
    median,
    quiet_run_config,
    sst2_dev_subset,
    sst2_subset,
    start_ray,
    write_result,
)

from rayft.loop import POLL_ENV  # Ray Train's controller poll interval, as rayft names it

# Lines of a rayft run whose arrival times split its `launch` (Ray Train's own log lines).
REQUESTED = "Requesting resources"
STARTED = "Started training worker group"
REPORTED = "Reporting training result"
PLANNED = "rows per step"  # rayft's driver: the data stage is done
COPIED = "final checkpoint copied to storage in "  # rank 0, after the final report
CLEANUP = "worker clean-up "  # on the same line: the engine destroyed, scratch removed
# What the worker imports to run rayft's training function, in that order.
IMPORTS = ["torch", "transformers.modeling_utils", "deepspeed", "peft", "ray.train.torch",
           "rayft.loop"]  # fmt: skip
PROBE = """
import importlib, json, time
seconds = {}
for name in %r:
    started = time.perf_counter()
    importlib.import_module(name)
    seconds[name] = time.perf_counter() - started
print("IMPORTS " + json.dumps(seconds))
"""


def imports(repeats: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", PROBE % IMPORTS], capture_output=True, text=True, check=True
        ).stdout
        line = next(line for line in out.splitlines() if line.startswith("IMPORTS "))
        runs.append(json.loads(line[len("IMPORTS ") :]))
    per_module = {name: median([r[name] for r in runs]) for name in IMPORTS}
    return {"seconds": per_module, "total_seconds": median([sum(r.values()) for r in runs]),
            "runs": runs}  # fmt: skip


def bare_fit(work: str, interval: str, sleep: float = 0.0) -> dict[str, float]:
    """One `TorchTrainer.fit()` of a function that notes when it starts and ends."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stamp = os.path.join(work, f"stamp-{time.time_ns()}")

    def note_times(config: dict[str, Any]) -> None:
        started = time.time()
        time.sleep(config["sleep"])
        with open(config["stamp"], "w") as handle:
            handle.write(f"{started} {time.time()}")

    os.environ[POLL_ENV] = interval  # Ray Train passes it from the driver to its controller
    started = time.time()
    TorchTrainer(
        note_times,
        train_loop_config={"stamp": stamp, "sleep": sleep},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
        run_config=RunConfig(storage_path=os.path.join(work, "storage"), name=f"bare-{started}"),
    ).fit()
    returned = time.time()
    with open(stamp) as handle:
        fn_start, fn_end = map(float, handle.read().split())
    return {"to_function_seconds": fn_start - started, "after_function_seconds": returned - fn_end,
            "fit_seconds": returned - started, "fn_start": fn_start, "fn_end": fn_end}  # fmt: skip


@contextlib.contextmanager
def poll_interval_restored() -> Any:
    """The measurements set `POLL_ENV` run by run; what follows gets the caller's back."""
    default = os.environ.get(POLL_ENV)
    try:
        yield
    finally:
        if default is None:
            os.environ.pop(POLL_ENV, None)
        else:
            os.environ[POLL_ENV] = default


def arrival(timeline: Timeline, needle: str, since: float, *, last: bool = False) -> float:
    """When the first (``last``: the last) line holding ``needle`` arrived after ``since``."""
    hits = timeline.every(needle, since)
    if not hits:
        raise ValueError(f"no '{needle}' line in the run's output since {since}")
    return hits[-1 if last else 0][0]


def seconds_after(lines: list[tuple[float, str]], label: str) -> float:
    """The seconds rayft's last line among ``lines`` gives after ``label`` (NaN without
    one: runs before 2026-12-05 did not say them)."""
    if not lines or label not in lines[-1][1]:
        return float("nan")
    return float(lines[-1][1].split(label)[1].split(" s")[0])


def warmed_schedule(intervals: list[str], runs: int) -> list[str]:
    """The poll interval of each rayft run: a first one that warms the data cache (and may
    build DeepSpeed's CPU op; not measured), then ``runs`` per interval, alternating."""
    return [intervals[0]] + [interval for _, interval in alternating(intervals, runs)]


def minilm_job(
    work: str,
    name: str,
    train: str,
    dev: str,
    checkpoint: dict[str, Any] | None = None,
    **train_section: Any,
) -> Any:
    """The benchmarks' rayft job: full fine-tuning of MiniLM, 1 worker x 2 CPUs, batch 16,
    one epoch at most, the prepared data shared through one cache; ``train_section``
    adds to or replaces its `train` settings, ``checkpoint`` sets its `checkpoint` ones."""
    from rayft.config import validate_config

    return validate_config(quiet_run_config({
        "task": "sequence_classification", "method": "full",
        "output_dir": os.path.join(work, name), "model": {"name_or_path": MINILM},
        "data": {"train": train, "eval": dev, "text_column": "sentence",
                 "label_column": "label", "dedup": {"near": False},
                 "cache_dir": os.path.join(work, "cache")},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2},
        "train": {"epochs": 1, "batch_size": 16, "log_every_steps": 1000, **train_section},
        "checkpoint": checkpoint or {},
    }))  # fmt: skip


def rayft_launch(
    work: str, timeline: Timeline, runs: int, intervals: list[str]
) -> list[dict[str, Any]]:
    """``runs`` rayft runs of a 4-step job on the local Ray per controller poll interval
    (alternating), after one that warms the data cache; each one's timings and the
    seconds between the lines that split its launch."""
    from rayft.trainer import fit

    train, dev = sst2_subset(400, work), sst2_dev_subset(64, work)
    found = []
    for run, interval in enumerate(warmed_schedule(intervals, runs)):
        os.environ[POLL_ENV] = interval  # Ray Train passes it from the driver to its controller
        cfg = minilm_job(work, f"rayft-{run}", train, dev, max_steps=4, eval_every_steps=100)
        started = time.time()
        timings = fit(cfg)["timings"]
        returned = time.time()
        if run == 0:
            continue  # the data stage ran cold, DeepSpeed's CPU op may have been built
        planned, requested, begun, reported = (
            arrival(timeline, needle, started, last=needle == REPORTED)
            for needle in (PLANNED, REQUESTED, STARTED, REPORTED)
        )
        copied = timeline.every(COPIED, started)
        found.append({
            "timings": timings,
            "poll_interval": interval,
            "data_ready_to_resources_requested_seconds": requested - planned,
            "resources_requested_to_group_started_seconds": begun - requested,
            "final_report_to_fit_returned_seconds": returned - reported,
            # the worker's own measure of its final `ray.train.report` (the copy into
            # storage_path): rayft's line since 2026-12-05, absent from older runs
            "final_report_call_seconds": seconds_after(copied, COPIED),
            "worker_cleanup_seconds": seconds_after(copied, CLEANUP),
        })  # fmt: skip
        print(f"rayft run {run}, poll {interval} s: launch {timings['launch']:.1f} s, " + ", ".join(
            f"{k} {v:.1f}" for k, v in found[-1].items() if k not in ("timings", "poll_interval")),
            flush=True)  # fmt: skip
    return found


def rayft_reports(
    work: str, runs: int, intervals: list[str], steps: int, every: int
) -> list[dict[str, Any]]:
    """``runs`` rayft runs per controller poll interval (alternating, after one that warms
    the data cache) of a ``steps``-step MiniLM job that evaluates 16 dev rows every
    ``every`` steps and reports each time (no checkpoint but the final one): how long its
    `ray.train.report` calls took against its training steps and evaluations, and its
    training samples/s (with ``every`` past the last step: what the polls cost a run that
    reports only at its end)."""
    from rayft.trainer import fit

    train, dev = sst2_subset(max(400, 16 * steps), work), sst2_dev_subset(16, work)
    found = []
    for run, interval in enumerate(warmed_schedule(intervals, runs)):
        os.environ[POLL_ENV] = interval
        cfg = minilm_job(
            work, f"reports-{run}", train, dev, max_steps=steps, eval_every_steps=every
        )
        metrics = fit(cfg)
        timings = metrics["timings"]
        if run == 0:
            continue
        reports = max((steps - 1) // every, 1)  # the final report covers the last step
        found.append({
            "poll_interval": interval,
            "timings": timings,
            "reports": reports,
            "report_seconds": timings.get("report", 0.0),
            "seconds_per_report": timings.get("report", 0.0) / reports,
            "train_seconds": timings["train"],
            "eval_seconds": timings["eval"],
            "samples_per_second": metrics["train_samples"] / timings["train"],
        })  # fmt: skip
        print(f"reports run {run}, poll {interval} s: " + ", ".join(
            f"{k} {v:.2f}" for k, v in found[-1].items() if k not in ("timings", "poll_interval")),
            flush=True)  # fmt: skip
    return found


def cli_runs(work: str, runs: int) -> list[dict[str, Any]]:
    """``runs`` commands per mode (worker group, in-process), alternating after a warming
    run of each (the data cache; DeepSpeed's CPU op): each its wall time and timings."""
    from rayft.config import dump_config

    train, dev = sst2_subset(400, work), sst2_dev_subset(64, work)
    found = []
    schedule = [False, True] + [mode for _, mode in alternating([False, True], runs)]
    for run, in_process in enumerate(schedule):
        cfg = minilm_job(work, f"cli-{run}", train, dev, max_steps=4, eval_every_steps=100)
        path = os.path.join(work, f"cli-{run}.yaml")
        with open(path, "w") as handle:
            handle.write(dump_config(cfg))
        command = [sys.executable, "-m", "rayft.train", "--config", path,
                   f"scaling.in_process={str(in_process).lower()}"]  # fmt: skip
        started = time.time()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.time() - started
        with open(os.path.join(cfg.output_dir, "metrics.json")) as handle:
            timings = json.load(handle)["timings"]
        print(f"rayft.train run {run}, in_process {in_process}: {wall:.1f} s; " + ", ".join(
            f"{k} {v:.1f}" for k, v in timings.items()), flush=True)  # fmt: skip
        if run >= 2:
            found.append({"in_process": in_process, "command_seconds": wall, "timings": timings})
    return found


def cli_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    sections = list(dict.fromkeys(k for r in runs for k in r["timings"]))  # in run order
    modes: dict[str, Any] = {}
    for name, in_process in (("worker_group", False), ("in_process", True)):
        mine = [r for r in runs if r["in_process"] is in_process]
        modes[name] = {
            "command_seconds": median([r["command_seconds"] for r in mine]),
            **{k: median([r["timings"].get(k, 0.0) for r in mine]) for k in sections},
        }
    modes["in_process_command_time_ratio"] = (
        modes["in_process"]["command_seconds"] / modes["worker_group"]["command_seconds"]
    )
    return modes


def rayft_summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians of rayft runs' launch parts, and of their `launch` and `setup`."""
    return {
        key: median([r[key] for r in runs]) for key in runs[0]
        if key not in ("timings", "poll_interval")
    } | {f"{section}_seconds": median([r["timings"][section] for r in runs])
         for section in ("launch", "setup")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--intervals", nargs="+", default=["2.0", "0.25"],
                        help=f"{POLL_ENV} values (seconds)")  # fmt: skip
    parser.add_argument(
        "--rayft-runs",
        type=int,
        default=3,
        help="rayft runs measured (per --rayft-intervals value)",
    )
    parser.add_argument("--rayft-intervals", nargs="+", default=["2.0"],
                        help=f"{POLL_ENV} values for the rayft runs (alternating)")  # fmt: skip
    parser.add_argument("--report-steps", type=int, default=16,
                        help="steps of each `reports` run")  # fmt: skip
    parser.add_argument("--report-every", type=int, default=1,
                        help="a `reports` run evaluates and reports every N steps")  # fmt: skip
    parser.add_argument("--name", default="launch", help="results: benchmarks/results/NAME.json")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["imports", "bare", "rayft"],
        choices=["imports", "bare", "rayft", "reports", "cli"],
        help="measurements to run",
    )
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="rayft-bench-launch-")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Ray Train's lines reach the driver on stderr, rayft's on stdout: both are timed.
    timeline = Timeline(sys.stdout, keep=("[rayft]", REQUESTED, STARTED, REPORTED))
    sys.stdout = sys.stderr = timeline

    summary: dict[str, Any] = {}
    found: dict[str, Any] = {}
    if "imports" in args.parts:
        found = imports(args.repeats)
        summary["imports_seconds"] = found["total_seconds"]
        print("imports, s: " + ", ".join(f"{k} {v:.2f}" for k, v in found["seconds"].items())
              + f"; total {found['total_seconds']:.2f}", flush=True)  # fmt: skip
    start_ray(2 + 2)
    bare: dict[str, list[dict[str, float]]] = {}
    poll_cpu: dict[str, dict[str, Any]] = {}
    if "bare" in args.parts:
        with poll_interval_restored():
            bare, poll_cpu = bare_fits(work, args.intervals, args.repeats)
        summary.update(bare_summary(bare, poll_cpu, args.intervals))
    rayft: list[dict[str, Any]] = []
    if "rayft" in args.parts:
        with poll_interval_restored():
            rayft = rayft_launch(work, timeline, args.rayft_runs, args.rayft_intervals)
        by_interval = {i: [r for r in rayft if r["poll_interval"] == i]
                       for i in args.rayft_intervals}  # fmt: skip
        summary["rayft"] = rayft_summary(by_interval[args.rayft_intervals[0]])
        for interval in args.rayft_intervals[1:]:
            summary[f"rayft_poll_{interval}s"] = rayft_summary(by_interval[interval])
            summary[f"rayft_poll_{interval}s"]["launch_ratio_vs_first_interval"] = (
                summary[f"rayft_poll_{interval}s"]["launch_seconds"]
                / summary["rayft"]["launch_seconds"]
            )
    reports: list[dict[str, Any]] = []
    if "reports" in args.parts:
        with poll_interval_restored():
            reports = rayft_reports(
                work, args.rayft_runs, args.rayft_intervals, args.report_steps, args.report_every
            )
        for interval in args.rayft_intervals:
            runs = [r for r in reports if r["poll_interval"] == interval]
            summary[f"reports_poll_{interval}s"] = {
                key: median([r[key] for r in runs])
                for key in ("report_seconds", "seconds_per_report", "train_seconds",
                            "eval_seconds", "samples_per_second")
            }  # fmt: skip
        first = summary[f"reports_poll_{args.rayft_intervals[0]}s"]
        for interval in args.rayft_intervals[1:]:
            entry = summary[f"reports_poll_{interval}s"]
            entry["report_ratio_vs_first_interval"] = entry["report_seconds"] / max(
                first["report_seconds"], 1e-9
            )
            entry["samples_per_second_ratio_vs_first_interval"] = (
                entry["samples_per_second"] / first["samples_per_second"]
            )
    cli: list[dict[str, Any]] = []
    if "cli" in args.parts:
        cli = cli_runs(work, args.rayft_runs)
        summary["cli"] = cli_summary(cli)
    path = write_result(args.name, {
        **environment(),
        "setup": {"workers": "1 x 2 CPUs, a function that sleeps 3 s + 0.5 s per repeat",
                  "report_steps": args.report_steps, "report_every": args.report_every,
                  "poll_env": POLL_ENV, "intervals": args.intervals, "repeats": args.repeats,
                  "rayft_intervals": args.rayft_intervals,
                  "parts": args.parts},
        "summary": summary, "imports": found, "bare": bare, "poll_cpu": poll_cpu,
        "rayft_runs": rayft, "report_runs": reports, "cli_runs": cli,
    })  # fmt: skip
    if bare:
        print(
            "\n| poll interval | fit() to the function, s | function end to fit() return, s "
            "| fit() in all, s | controller + worker CPU while training |\n|---|---|---|---|---|"
        )
        for i in args.intervals:
            s = summary[f"poll_{i}s"]
            print(f"| {i} s | {s['to_function_seconds']:.2f} | {s['after_function_seconds']:.2f} | "
                  f"{s['fit_seconds']:.2f} | {s['train_controller_cpu_share'] + s['train_worker_cpu_share']:.2%} |")  # fmt: skip
    for interval in args.rayft_intervals if rayft else []:
        first = interval == args.rayft_intervals[0]
        r = summary["rayft" if first else f"rayft_poll_{interval}s"]
        print(f"\nrayft, poll {interval} s (median of {args.rayft_runs}): launch {r['launch_seconds']:.1f} s = data ready "
              f"-> resources requested {r['data_ready_to_resources_requested_seconds']:.1f} + "
              f"-> worker group started {r['resources_requested_to_group_started_seconds']:.1f} + "
              f"final report -> fit() returned {r['final_report_to_fit_returned_seconds']:.1f} "
              f"(the worker's final report call {r['final_report_call_seconds']:.1f}, its clean-up "
              f"{r['worker_cleanup_seconds']:.1f}) "
              f"(+ the rest); setup {r['setup_seconds']:.1f} s")  # fmt: skip
    for interval in args.rayft_intervals if reports else []:
        r = summary[f"reports_poll_{interval}s"]
        print(f"\nreporting every {args.report_every} step(s), poll {interval} s (median of "
              f"{args.rayft_runs}): report {r['report_seconds']:.1f} s ({r['seconds_per_report']:.2f}"
              f" s per report), train {r['train_seconds']:.1f} s ({r['samples_per_second']:.1f} "
              f"samples/s), eval {r['eval_seconds']:.1f} s")  # fmt: skip
    if cli:
        print(f"\n| `python -m rayft.train`, 4 steps (median of {args.rayft_runs}) | command s | "
              + " | ".join(k for k in summary["cli"]["in_process"] if k != "command_seconds")
              + " |")  # fmt: skip
        for name in ("worker_group", "in_process"):
            r = summary["cli"][name]
            print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in r.values()) + " |")
        print(f"in-process / worker group: {summary['cli']['in_process_command_time_ratio']:.2f}x")
    if found:
        print(f"the worker's imports: {found['total_seconds']:.2f} s")
    print(path)


def bare_fits(
    work: str, intervals: list[str], repeats: int
) -> tuple[dict[str, list[dict[str, float]]], dict[str, dict[str, Any]]]:
    """`repeats` bare fits per poll interval, alternating, then each interval's CPU cost
    while the worker sleeps."""
    bare: dict[str, list[dict[str, float]]] = {i: [] for i in intervals}
    for repeat, interval in alternating(intervals, repeats):
        bare[interval].append(bare_fit(work, interval, sleep=3.0 + 0.5 * repeat))
        print(f"repeat {repeat}, poll {interval} s: {bare[interval][-1]}", flush=True)
    poll_cpu: dict[str, dict[str, Any]] = {}
    for interval in intervals:
        cpu = CpuCensus(interval=1.0)
        cpu.start()
        times = bare_fit(work, interval, sleep=30.0)
        cpu.stop()
        # 25 s inside the function, away from its start and end
        roles = cpu.roles(times["fn_start"] + 2.5, times["fn_start"] + 27.5)
        poll_cpu[interval] = {
            "train_controller_share": roles.get("TrainController", {}).get("share", 0.0),
            "train_worker_share": roles.get("RayTrainWorker", {}).get("share", 0.0),
            "all_ray_share": sum(r["share"] for k, r in roles.items() if k != "foreign"),
            "roles": roles,
        }
        print(f"poll {interval} s while the worker sleeps: " + ", ".join(
            f"{k} {v:.2%}" for k, v in poll_cpu[interval].items() if k != "roles"), flush=True)  # fmt: skip
    return bare, poll_cpu


def bare_summary(
    bare: dict[str, list[dict[str, float]]], poll_cpu: dict[str, dict[str, Any]],
    intervals: list[str],
) -> dict[str, Any]:  # fmt: skip
    summary = {f"poll_{i}s": {
        "to_function_seconds": median([b["to_function_seconds"] for b in bare[i]]),
        "after_function_seconds": median([b["after_function_seconds"] for b in bare[i]]),
        "fit_seconds": median([b["fit_seconds"] for b in bare[i]]),
        "train_controller_cpu_share": poll_cpu[i]["train_controller_share"],
        "train_worker_cpu_share": poll_cpu[i]["train_worker_share"],
        "all_ray_cpu_share": poll_cpu[i]["all_ray_share"],
    } for i in intervals}  # fmt: skip
    first = intervals[0]
    for i in intervals[1:]:
        summary[f"poll_{i}s"][f"fit_time_ratio_vs_poll_{first}s"] = (
            summary[f"poll_{i}s"]["fit_seconds"] / summary[f"poll_{first}s"]["fit_seconds"]
        )
    return summary


if __name__ == "__main__":
    main()
