"""Which threads wake up while a rayft run trains, and how often: the source of the
preemptions that keep one worker's steps above a plain loop's on a machine whose cores
all train (bench_overhead.py, "Session 8").

One rayft run of a MiniLM job (full fine-tuning, 1 worker x 2 CPUs, batch 16, no
evaluation before the end) on a local Ray of this process's own, after one that warms
the data cache. ``--after`` seconds into it (steady training), every thread of every Ray
and Python process on the machine is read from /proc twice, ``--window`` seconds apart:
its voluntary wake-ups (it slept and was woken) and involuntary switches (it was
preempted) per second, and its CPU. Threads are grouped by process role (the Ray
process title) and thread name.

    python benchmarks/bench_wakeups.py
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import threading
import time
from typing import Any

from bench_launch import minilm_job
from bench_overhead import (
    environment,
    prepare_run,
    sst2_dev_subset,
    sst2_subset,
    start_ray,
    write_result,
)

TICKS = os.sysconf("SC_CLK_TCK")
TICKING_HZ = 90  # a main thread woken at least this often counts as on the 10 ms timer


def role(pid: int) -> str | None:
    """A process's role: its Ray title (`ray::TrainController.run`), else its program;
    None for processes that are neither Ray's nor Python."""
    try:
        with open(f"/proc/{pid}/cmdline") as handle:
            argv = handle.read().split("\0")
    except OSError:
        return None
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    if not any("ray" in a or "python" in a for a in argv[:3]):
        return None
    if len(argv) > 1 and argv[1] == "-c":  # a program given inline (Ray's dashboard)
        return f"{os.path.basename(argv[0])} -c"
    return " ".join(os.path.basename(a) for a in argv[:2] if a)[:60]


def thread_counts(pid: int) -> dict[int, tuple[str, int, int, int]]:
    """tid -> (thread name, CPU ticks, voluntary switches, involuntary switches)."""
    found = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(f"{task}/comm") as handle:
                name = handle.read().strip()
            with open(f"{task}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"{task}/status") as handle:
                status = dict(
                    line.split(":\t", 1) for line in handle.read().splitlines() if ":\t" in line
                )
            found[int(os.path.basename(task))] = (
                name,
                int(fields[11]) + int(fields[12]),
                int(status["voluntary_ctxt_switches"]),
                int(status["nonvoluntary_ctxt_switches"]),
            )
        except (OSError, KeyError, IndexError, ValueError):
            continue
    return found


def census(after: float, window: float, into: dict[str, Any]) -> None:
    """Per thread alive over the whole window: wake-ups, preemptions and CPU per second."""
    time.sleep(after)
    roles = {int(p[6:]): r for p in glob.glob("/proc/[0-9]*") if (r := role(int(p[6:])))}
    first = {pid: thread_counts(pid) for pid in roles}
    started = time.time()
    time.sleep(window)
    seconds = time.time() - started
    rows = []
    for pid, name in roles.items():
        for tid, (thread, cpu, vol, inv) in thread_counts(pid).items():
            if tid not in first.get(pid, {}):
                continue
            _, cpu0, vol0, inv0 = first[pid][tid]
            rows.append({
                "process": name, "pid": pid, "thread": thread, "main": tid == pid,
                "wakeups_per_second": (vol - vol0) / seconds,
                "preempted_per_second": (inv - inv0) / seconds,
                "cpu_share_of_a_core": (cpu - cpu0) / TICKS / seconds,
            })  # fmt: skip
    into["rows"] = sorted(rows, key=lambda r: -r["wakeups_per_second"])
    into["window_seconds"] = seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--after", type=float, default=40.0, help="seconds into the run")
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--name", default="wakeups", help="results/NAME.json")
    args = parser.parse_args()
    work, _ = prepare_run(None, "wakeups")
    start_ray(2 + 2)
    train, dev = sst2_subset(16 * args.steps, work), sst2_dev_subset(64, work)
    from rayft.trainer import fit

    fit(minilm_job(work, "warm", train, dev, max_steps=2))
    found: dict[str, Any] = {}
    sampler = threading.Thread(target=census, args=(args.after, args.window, found))
    sampler.start()
    metrics = fit(minilm_job(work, "run", train, dev, max_steps=args.steps))
    sampler.join()
    if metrics["timings"]["train"] < args.after + args.window:
        print(f"WARNING: training took {metrics['timings']['train']:.0f} s: the window was "
              "not all steady training; raise --steps", flush=True)  # fmt: skip
    rows = found["rows"]
    # Ray Python processes whose main thread ticks at ~100 Hz (the core worker's 10 ms
    # signal check); the agents' main threads run an event loop instead.
    ticking = [r for r in rows if r["process"].startswith("ray::") and r["main"]
               and r["wakeups_per_second"] >= TICKING_HZ]  # fmt: skip
    training = [r for r in rows if r["process"].startswith("ray::RayTrainWorker")]
    summary = {
        "all_wakeups_per_second": sum(r["wakeups_per_second"] for r in rows),
        "ray_processes_ticking_at_100hz": len(ticking),
        "their_main_thread_wakeups_per_second": sum(r["wakeups_per_second"] for r in ticking),
        "training_process_preempted_per_second": sum(r["preempted_per_second"] for r in training),
    }
    path = write_result(args.name, {
        **environment(sys.argv),
        "setup": {"steps": args.steps, "after": args.after, "window": args.window,
                  "job": "MiniLM full, 1 worker x 2 CPUs, batch 16"},
        "summary": summary, "rows": rows,
    })  # fmt: skip
    print("\n| process | thread | wake-ups/s | preempted/s | CPU, share of a core |")
    print("|---|---|---|---|---|")
    for r in rows[:30]:
        thread = f"{r['thread']} (main)" if r["main"] else r["thread"]
        print(f"| {r['process']} | {thread} | {r['wakeups_per_second']:.1f} | "
              f"{r['preempted_per_second']:.1f} | {r['cpu_share_of_a_core']:.1%} |")  # fmt: skip
    print("\n" + ", ".join(f"{k} {v:.0f}" for k, v in summary.items()))
    print(path)


if __name__ == "__main__":
    main()
