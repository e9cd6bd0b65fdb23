"""Driver side of a training run: datasets and TorchTrainer from the config, and `fit`."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from rayft import checkpoint as ckpt
from rayft import inprocess, tracking
from rayft.config import (
    ConfigError,
    RayftConfig,
    baselines,
    dump_config,
    in_process_note,
    resolve_paths,
    single_worker_zero_note,
    sync_upload_note,
    validate_config,
)
from rayft.console import say
from rayft.data import fs
from rayft.data.features import tokenize_block
from rayft.data.prepare import (
    Prepared,
    check_sources,
    machine_cores,
    ordered_execution,
    prepare,
)
from rayft.evaluate import within_forgetting_key
from rayft.forgetting import read_general_text
from rayft.loop import GENERATIONS_FILE, HISTORY_FILE, PREDICTIONS_FILE, Plan, train_fn_per_worker
from rayft.plan import warn_if_unfit
from rayft.resilience import fault_from_env
from rayft.tasks import get_task
from rayft.timing import Timings


def _mark_pad(batch: pa.Table, *, value: bool) -> pa.Table:
    # Arrow in, Arrow out: list columns (NER's words and tags) stay Arrow lists.
    return batch.append_column("_pad", pa.array(np.full(batch.num_rows, value)))


def ingest_options() -> Any:
    """Ray Train's data ingest options, in order, so runs are reproducible."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def build_datasets(cfg: RayftConfig, prepared: Prepared, plan: Plan) -> dict[str, Any]:
    """Streaming datasets of tokenized rows. Each split is padded by repeating its first
    rows up to a multiple of the worker count (as torch's DistributedSampler does), so
    Ray's equal split drops nothing and every worker runs the same number of steps;
    padded eval rows are flagged and left out of the metrics."""
    with ordered_execution():
        return _build_datasets(cfg, prepared, plan)


def _build_datasets(cfg: RayftConfig, prepared: Prepared, plan: Plan) -> dict[str, Any]:
    import ray.data

    task = get_task(cfg.task)
    cfg_json = cfg.model_dump_json()
    datasets = {}
    for split in [s for s in ("train", "eval", "test") if s in prepared.splits]:
        # Windowed tasks were tokenized when the data was prepared (features, counted).
        path = prepared.features.get(split) if task.windowed else prepared.splits[split]
        if path is None:
            continue  # no rows in this split: the plan has none either
        rows = ray.data.read_parquet(path, columns=None if task.windowed else task.row_columns)
        ds = rows.map_batches(functools.partial(_mark_pad, value=False), batch_format="pyarrow")
        pad = plan.pad_rows.get(split, 0)
        if pad:
            extra = rows.limit(pad).map_batches(
                functools.partial(_mark_pad, value=True), batch_format="pyarrow"
            )
            ds = ds.union(extra)
        if not task.windowed:
            ds = ds.map_batches(
                functools.partial(tokenize_block, cfg_json=cfg_json, label2id=prepared.label2id),
                batch_format="numpy",
            )
        if _materialize(cfg, path):
            ds = ds.materialize()
        datasets[split] = ds
    return datasets


def _materialize(cfg: RayftConfig, path: str) -> bool:
    """Small splits are tokenized once and kept in the object store: a Ray Data execution
    costs seconds to start, and would otherwise recur every epoch and evaluation."""
    mode = cfg.data.materialize
    if mode != "auto":
        return mode == "always"
    return fs.tree_size(path) <= cfg.data.materialize_max_mb * 2**20


def build_trainer(
    cfg: RayftConfig,
    plan: Plan,
    datasets: dict[str, Any],
    *,
    run_name: str | None = None,
    callbacks: list[Any] | None = None,
    resume_from: str | None = None,
    prompts: list[dict[str, Any]] | None = None,
    general_text: list[str] | None = None,
) -> Any:
    """A Ray Train TorchTrainer running `train_fn_per_worker` on `scaling.num_workers`,
    or in this process (Ray Train's local mode) with `scaling.in_process`."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    run_name = run_name or cfg.run_name or default_run_name(cfg)
    run_dir = fs.join(cfg.storage_path, run_name)
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    # Ray Train V2 has no resume_from_checkpoint: a checkpoint from elsewhere (PBT, a
    # resumed search) travels by path and the workers load it when their own run has
    # none yet.
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "plan": asdict(plan),
        "resume_from": resume_from,
        "prompts": prompts,
        "general_text": general_text,  # eval.general_text, read by the driver
        "run_dir": run_dir,  # ledger, injected faults
        "fault": fault_from_env(),
        "driver_pid": os.getpid(),
    }
    if s.in_process:  # local mode: num_workers=0 is Ray Train's switch for it
        loop_config[inprocess.CONFIG_KEY] = inprocess.Keeper(
            run_dir, cfg.checkpoint.keep, checkpoint_score(cfg), cfg.checkpoint.mode,
            callbacks or [],
        )  # fmt: skip
        scaling = ScalingConfig(num_workers=0)
        datasets = {name: inprocess.ingest(ds, cfg) for name, ds in datasets.items()}
    else:
        scaling = ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        )
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=RunConfig(
            name=run_name,
            storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep,
                checkpoint_score_attribute=checkpoint_score(cfg),
                checkpoint_score_order=cfg.checkpoint.mode,
            ),
            failure_config=FailureConfig(max_failures=s.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=DataConfig(
            datasets_to_split=datasets_to_split(datasets, s.num_workers),
            execution_options=ingest_options(),
        ),
    )


def datasets_to_split(datasets: dict[str, Any], num_workers: int) -> list[str]:
    """The splits Ray Train hands out through a streaming split. Each such split runs a
    coordinator actor (a process of its own) for the whole run; a single worker reading a
    split already in the object store has nothing to coordinate, so it reads the split
    directly. A streamed split keeps its coordinator, which runs the reading and
    tokenizing outside the training process."""
    from ray.data.dataset import MaterializedDataset

    if num_workers > 1:
        return list(datasets)
    return [name for name, ds in datasets.items() if not isinstance(ds, MaterializedDataset)]


RUN_FILE = "run.json"  # in output_dir: the run it last started, for `--resume`


class TrainingFailed(RuntimeError):
    """The worker group failed more often than `scaling.max_failures` allows."""

    @classmethod
    def from_ray(cls, error: BaseException, cfg: RayftConfig) -> TrainingFailed:
        budget = cfg.scaling.max_failures
        allowed = "no restarts" if budget == 0 else f"{budget} restart(s)"
        failures = getattr(error, "worker_failures", None) or {}
        if failures:
            what = "; ".join(
                _describe_worker_failure(rank, exc) for rank, exc in sorted(failures.items())
            )
        else:
            what = " ".join(str(error).split())[:600]
        return cls(
            f"training failed after {allowed} (scaling.max_failures={budget}): {what}. "
            "Raise scaling.max_failures to restart from the latest checkpoint, or rerun "
            "the command with --resume to continue from it."
        )


def _describe_worker_failure(rank: int, error: BaseException) -> str:
    """ "worker rank 1 (pid 2448 on 10.0.0.3) ...": who failed and the gist of why."""
    import re

    text = str(error)
    pid = re.search(r"\bpid=(\d+)", text)
    node = re.search(r"node_ip='([^']+)'", text)
    where = ", ".join(part for part in (pid and f"pid {pid[1]}", node and f"on {node[1]}") if part)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    gist = [line for line in lines if "died" in line and len(line) < 200][:1] or lines[-1:]
    if gist and "died" in gist[0]:
        gist.append("(killed, out of memory, or crashed)")
    return f"worker rank {rank}{f' ({where})' if where else ''} failed: {' '.join(gist)}"


def run_trainer(trainer: Any, cfg: RayftConfig) -> Any:
    """`trainer.fit()`, its failures (Ray raises some, returns others) as TrainingFailed.

    In the main thread Ray Train installs a Ctrl-C handler that holds its controller
    actor and keeps it for good: the controller, and the dataset manager and split
    coordinators it owns, would outlive the run (four processes using CPU beside whatever
    runs next) and the caller's own handler would be gone. The caller's handler comes
    back when the run ends, which lets those actors go."""
    from ray.train import TrainingFailedError

    keeper = trainer.train_loop_config.get(inprocess.CONFIG_KEY)
    if keeper is not None:  # scaling.in_process: the function's errors are raised as they are
        with inprocess.worker_environment(cfg):
            return keeper.result(trainer.fit())
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        raise TrainingFailed.from_ray(exc, cfg) from exc
    finally:
        if handler is not None:  # None: not set from Python, nothing to put back
            signal.signal(signal.SIGINT, handler)
    if result.error is not None:
        raise TrainingFailed.from_ray(result.error, cfg) from result.error
    return result


def resumed_run_name(cfg: RayftConfig) -> str:
    """The run `--resume` continues: `run_name`, else the one output_dir last started."""
    if cfg.run_name:
        return cfg.run_name
    recorded = os.path.join(cfg.output_dir, RUN_FILE)
    if not os.path.isfile(recorded):
        raise ConfigError(
            [f"--resume: {recorded} not found, so no run was started with output_dir "
             f"{cfg.output_dir}; set run_name to the run to continue, or drop --resume"]
        )  # fmt: skip
    with open(recorded) as handle:
        return json.load(handle)["run_name"]


def resume_point(cfg: RayftConfig, run_name: str, *, required: bool) -> str | None:
    """The newest complete checkpoint of the run `run_name` in `storage_path`, checked on
    the driver before any worker starts: an incomplete newer one is skipped with a
    warning; none complete, or one written by another number of workers or at another ZeRO
    stage, is an error.
    None when the run has no checkpoint (and ``required`` is false): a fresh start."""
    run_dir = fs.join(cfg.storage_path, run_name)
    try:
        found = ckpt.resume_candidate(run_dir)
    except ckpt.IncompleteCheckpoint as exc:
        raise ConfigError([f"run {run_name}: {exc}"]) from None
    if found is None:
        if required:
            raise ConfigError(
                [f"--resume: run {run_name} has no checkpoint in {run_dir}; start it again "
                 "without --resume"]
            )  # fmt: skip
        return None
    path, state, skipped = found
    for problem in skipped:
        say(f"WARNING: skipping an incomplete checkpoint: {problem}")
    if problem := ckpt.resume_problem(path, state, cfg, cfg.scaling.num_workers):
        raise ConfigError([problem])
    say(f"continuing run {run_name} from {path} (step {state['step']})")
    return path


def checkpoint_score(cfg: RayftConfig) -> str:
    """What ranks checkpoints: `checkpoint.metric`, within `eval.max_forgetting` first."""
    if cfg.eval.max_forgetting is None:
        return cfg.checkpoint.metric
    return within_forgetting_key(cfg.checkpoint.metric)


def default_run_name(cfg: RayftConfig) -> str:
    return f"rayft-{cfg.task}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


WORKER_NICENESS_ENV = "RAY_worker_niceness"  # read by the raylet that a local ray.init starts
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # read by Ray Train's controller
RUNTIME_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # the job's config, set by `ray job submit`


def runtime_env() -> dict[str, Any]:
    """The job's runtime env: rayft's variables, and the cluster's address when this
    driver was given one (`ray job submit` sets it). Ray Train's placement-group cleaner,
    an actor of the job, finds its cluster from it: without it, on a machine running a
    second Ray instance, the cleaner fails and the worker groups of runs that Tune
    stops (ASHA, PBT's exploits) keep their CPUs, so later trials wait for workers
    forever. Variables the job already sets are left to it (Ray refuses the same key
    twice); a Ray Client address (ray://) means nothing to a worker and is not passed."""
    env_vars = dict(RUNTIME_ENV["env_vars"])
    address = os.environ.get("RAY_ADDRESS", "")
    if address and "://" not in address:
        env_vars["RAY_ADDRESS"] = address
    job = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}")
    already = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {"env_vars": {k: v for k, v in env_vars.items() if k not in already}}


def init_ray(cfg: RayftConfig, trials: int = 1, driver_cpus: float = 0.0) -> None:
    """Join the cluster this process belongs to (``RAY_ADDRESS``, `ray job submit`, or a
    running local head); otherwise start a local Ray with enough logical CPUs for the
    workers plus the data pipeline, which needs CPUs of its own to stream batches."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env())
        return
    try:
        ray.init(address="auto", runtime_env=runtime_env())
        return
    except ConnectionError:
        pass
    s = cfg.scaling
    needed = math.ceil(trials * (s.num_workers * s.cpus_per_worker + driver_cpus)) + 2
    start_local_ray(needed)


def start_local_ray(num_cpus: int, *, include_dashboard: bool | None = None) -> None:
    """A new Ray of this process's own, with at least ``num_cpus`` logical CPUs.

    Ray starts its workers at nice 15, so on a busy machine every Ray daemon preempts the
    training processes. The training workers are the point of a rayft run: they get
    normal priority, as Ray's own job manager gives the jobs it supervises (on an idle
    2-core machine the difference was within noise: benchmarks/RESULTS.md, Overhead). An
    explicit `RAY_worker_niceness` wins. ``include_dashboard``: Ray's own default (on
    where `ray[default]` is installed) unless given."""
    import ray

    os.environ.setdefault(WORKER_NICENESS_ENV, "0")
    # Ray Train's preemption watcher (one more process for every run) follows node
    # drains, which an autoscaler starts on a cluster; this Ray is this machine's alone.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    ray.init(
        address="local",
        num_cpus=max(machine_cores(), num_cpus),
        runtime_env=RUNTIME_ENV,
        include_dashboard=include_dashboard,
    )


def say_launch_advice(cfg: RayftConfig) -> None:
    """What to print before workers start (`train` and `tune`): a GPU run that will not
    fit, ZeRO stages that buy one worker nothing, uploads that stop training."""
    if warning := warn_if_unfit(cfg):
        say(warning)
    for note in (single_worker_zero_note(cfg), sync_upload_note(cfg)):
        if note:
            say(f"NOTE: {note}")


def fit(cfg: RayftConfig, *, resume: bool = False) -> dict[str, Any]:
    """Prepare the data, train, evaluate, run the baselines, and write config.yaml,
    metrics.json, model/ and the report. With ``resume``, continue the run this
    output_dir last started from its newest complete checkpoint (an error if it has none)."""
    started = time.time()
    cfg = resolve_paths(cfg)
    files = check_sources(cfg)  # fail on bad paths/columns before Ray starts
    say_launch_advice(cfg)
    if note := in_process_note(cfg):  # `rayft train` only: a search's trials are groups
        say(f"NOTE: {note}")
    run_name = resumed_run_name(cfg) if resume else cfg.run_name or default_run_name(cfg)
    resume_from = resume_point(cfg, run_name, required=resume)
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as handle:
        handle.write(dump_config(cfg))
    with open(os.path.join(cfg.output_dir, RUN_FILE), "w") as handle:
        json.dump({"run_name": run_name}, handle, indent=2)
    general_text = read_general_text(cfg)  # on the driver: workers may be elsewhere
    tracked = tracking.start(cfg, run_name)  # a tracker that cannot log fails here
    try:
        metrics = _fit(cfg, files, run_name, general_text, tracked, started, resume_from)
    except BaseException:
        tracking.finish(tracked, {}, failed=True)
        raise
    tracking.finish(tracked, metrics)
    return metrics


def _fit(
    cfg: RayftConfig,
    files: dict[str, list[str]],
    run_name: str,
    general_text: list[str] | None,
    tracked: tracking.TrackingRun,
    started: float,
    resume_from: str | None,
) -> dict[str, Any]:
    timings = Timings()
    with timings.section("ray_start"):
        init_ray(cfg)
    with timings.section("data"):
        prepared = prepare(cfg, files)
        plan = Plan.derive(cfg, prepared.labels, prepared.units, cfg.scaling.num_workers)
        _print_plan(cfg, prepared, plan)
        datasets = build_datasets(cfg, prepared, plan)
    trainer = build_trainer(
        cfg,
        plan,
        datasets,
        run_name=run_name,
        callbacks=[tracking.callback(tracked)],
        prompts=sample_prompts(cfg, prepared),
        general_text=general_text,
        resume_from=resume_from,
    )
    with timings.section("run"):
        result = run_trainer(trainer, cfg)
    metrics = write_outputs(cfg, prepared, result, started, timings)
    # After the run's own outputs are safe: a baseline that fails loses nothing else.
    return add_frozen_baseline(cfg, files, run_name, cfg.output_dir) or metrics


def add_frozen_baseline(
    cfg: RayftConfig, files: dict[str, list[str]], run_name: str, output_dir: str
) -> dict[str, Any] | None:
    """Run the frozen-backbone baseline when asked for, add it to output_dir's
    metrics.json and write the report again; the updated metrics, or None if not run."""
    try:
        frozen = frozen_baseline(cfg, files, run_name)
    except Exception as exc:  # the run itself succeeded: report the baseline's failure
        frozen = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        say(f"baseline: the frozen-backbone run failed: {frozen['error']}")
    if frozen is None:
        return None
    path = os.path.join(output_dir, "metrics.json")
    with open(path) as handle:
        metrics = json.load(handle)
    metrics.setdefault("baselines", {})["frozen"] = frozen
    with open(path, "w") as handle:
        json.dump(metrics, handle, indent=2)
    if cfg.eval.report:
        from rayft.report import write_report

        write_report(output_dir)
    if "error" not in frozen:
        shown = ", ".join(
            f"{k} {frozen[k]:.4f}" for k in SUMMARY_KEYS if isinstance(frozen.get(k), float)
        )
        say(f"frozen baseline: {shown}")
    return metrics


def frozen_baseline(
    cfg: RayftConfig, files: dict[str, list[str]], run_name: str
) -> dict[str, Any] | None:
    """The frozen-backbone baseline: a fresh head trained alone on the same prepared data
    (`method: frozen`, `eval.frozen_lr`), its checkpoints under `<storage_path>/baselines`;
    its final eval metrics. None when not asked for, or when the run is itself `frozen`."""
    if "frozen" not in baselines(cfg) or cfg.method == "frozen":
        return None
    started = time.time()
    raw = cfg.model_dump(mode="json")
    raw.update(
        method="frozen",
        output_dir=os.path.join(cfg.output_dir, "baselines", "frozen"),
        storage_path=fs.join(cfg.storage_path, "baselines"),
        run_name=f"{run_name}-frozen-baseline",
        tune=None,
    )
    raw["train"].update(
        lr=cfg.eval.frozen_lr,
        epochs=cfg.eval.frozen_epochs or cfg.train.epochs,
        eval_every_steps=None,
        max_steps=cfg.train.max_steps,  # as cheap as the run it is compared with
    )
    raw["checkpoint"].update(every_steps=None, metric="eval_loss", mode="min", keep=1)
    raw["eval"].update(baselines=[], general_text=None, max_forgetting=None, report=False)
    raw["tracking"] = {"tensorboard": False, "mlflow": False, "wandb": False}
    raw["generate"]["samples"] = 0
    # The same prepared shards: the cache key holds the data settings, not the method.
    raw["data"]["cache_dir"] = cfg.data.cache_dir or fs.join(cfg.storage_path, "prepared")
    base = resolve_paths(validate_config(raw))
    say(
        f"baseline: training a fresh head on the frozen backbone (lr {base.train.lr:g}, "
        f"{base.train.epochs} epoch(s)) on the same data"
    )
    prepared = prepare(base, files, outputs=False)
    plan = Plan.derive(base, prepared.labels, prepared.units, base.scaling.num_workers)
    result = run_trainer(build_trainer(base, plan, build_datasets(base, prepared, plan)), base)
    task = get_task(cfg.task)
    final = result.metrics
    scores = {k: final[k] for k in (*task.metric_names, "eval_loss") if k in final}
    return {
        **scores,
        "epochs": base.train.epochs,
        "lr": base.train.lr,
        "wall_seconds": time.time() - started,
        "checkpoint_path": result.checkpoint.path,
    }


def sample_prompts(cfg: RayftConfig, prepared: Prepared) -> list[dict[str, Any]] | None:
    """Generative tasks: the first `generate.samples` eval rows as prompts for the trained
    model (read here, a few rows, so every worker asks the same questions)."""
    import ray.data

    task = get_task(cfg.task)
    if task.sample_prompts is None or not cfg.generate.samples or not prepared.rows.get("eval"):
        return None
    from rayft.modeling import load_tokenizer

    rows = ray.data.read_parquet(prepared.splits["eval"], columns=task.row_columns).take(
        cfg.generate.samples
    )
    return task.sample_prompts(rows, load_tokenizer(cfg), cfg)


def _print_plan(cfg: RayftConfig, prepared: Prepared, plan: Plan) -> None:
    t, world = cfg.train, cfg.scaling.num_workers
    pad = plan.pad_rows.get("train", 0)
    padding = f" (+{pad} repeated to split evenly)" if pad else ""
    rows = f"{prepared.rows['train']:,} train rows{padding}, {prepared.rows['eval']:,} eval rows"
    if prepared.features:
        units = prepared.units
        rows = (
            f"{prepared.rows['train']:,} train rows in {units['train']:,} windows{padding}, "
            f"{prepared.rows['eval']:,} eval rows in {units['eval']:,} windows"
        )
    say(
        f"{rows}, {len(plan.labels)} labels; {world} worker(s) x micro-batch "
        f"{t.batch_size} x grad_accum {t.grad_accum} = {world * t.batch_size * t.grad_accum} "
        f"rows per step; {plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps in all"
    )


def write_outputs(
    cfg: RayftConfig,
    prepared: Prepared,
    result: Any,
    started: float,
    timings: Timings | None = None,
) -> dict[str, Any]:
    """Copy the exported model out of the final checkpoint; write metrics.json (with the
    baselines, forgetting, slices, the selected checkpoint and, from the driver's
    ``timings`` and the workers', where the wall time went) and the report."""
    outputs_started = time.perf_counter()
    out = cfg.output_dir
    with ckpt.local_dir(result.checkpoint) as directory:
        for name in (ckpt.MODEL_DIR, ckpt.ADAPTER_DIR):
            source = os.path.join(directory, name)
            if os.path.isdir(source):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
                shutil.copytree(source, os.path.join(out, name))
        for name in (HISTORY_FILE, PREDICTIONS_FILE, GENERATIONS_FILE):
            if os.path.exists(os.path.join(directory, name)):
                shutil.copy(os.path.join(directory, name), os.path.join(out, name))
    final = dict(result.metrics)
    final.pop("done", None)
    spent = (timings or Timings()).with_workers(final.pop("timings", None))
    pretrained = final.pop("pretrained_eval", None)
    forgetting = final.pop("forgetting", None)
    slices = final.pop("slices", None)
    metrics: dict[str, Any] = {
        **final,
        "wall_seconds": None,  # set last, once the outputs are written
        "train_rows": prepared.rows["train"],
        **({"train_windows": prepared.units["train"]} if prepared.features else {}),
        "checkpoint_path": result.checkpoint.path,
    }
    task = get_task(cfg.task)
    wanted = baselines(cfg)
    compared: dict[str, Any] = {}
    if "majority" in wanted and prepared.labels and task.baseline is not None:
        compared["majority"] = task.baseline(
            prepared.label_counts["train"], prepared.label_counts["eval"], prepared.labels
        )
    if pretrained is not None:
        compared["pretrained"] = pretrained
    if compared:
        metrics["baselines"] = compared
    if cfg.method == "frozen":
        metrics["baselines_note"] = (
            "This run is the frozen-backbone baseline itself (a new head on a frozen body). "
            "To see what adapting the backbone buys, run the same config with method=lora "
            "(cheap) or method=full."
        )
    if forgetting is not None:
        if "ratio" in forgetting:
            limit = cfg.eval.max_forgetting
            # NaN (a diverged run) counts as over the limit.
            over = limit is not None and not forgetting["ratio"] <= limit
            forgetting.update(max_forgetting=limit, exceeded=over)
        metrics["forgetting"] = forgetting
    if slices is not None:
        metrics["slices"] = slices
    selected = _selected_checkpoint(cfg, result)
    if selected is not None:
        metrics["selected_checkpoint"] = selected
    spent.add("outputs", time.perf_counter() - outputs_started)
    metrics["wall_seconds"] = time.time() - started
    metrics["timings"] = spent.as_dict()
    with open(os.path.join(out, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)
    if cfg.eval.report:
        from rayft.report import write_report

        write_report(out)
    _print_summary(cfg, metrics)
    return metrics


def _selected_checkpoint(cfg: RayftConfig, result: Any) -> dict[str, Any] | None:
    """The best checkpoint Ray Train kept by `checkpoint.metric`, those within
    `eval.max_forgetting` ranked first."""
    key = checkpoint_score(cfg)
    ranked = [(c, m) for c, m in (result.best_checkpoints or []) if isinstance(m.get(key), float)]
    if not ranked:
        return None
    sign = 1 if cfg.checkpoint.mode == "max" else -1
    checkpoint, metrics = max(ranked, key=lambda item: sign * item[1][key])
    ratio = metrics.get("forgetting_ratio")
    limit = cfg.eval.max_forgetting
    return {
        "path": checkpoint.path,
        "step": metrics.get("step"),
        "metric": cfg.checkpoint.metric,
        "value": metrics.get(cfg.checkpoint.metric),
        "forgetting_ratio": ratio,
        "within_forgetting": None if limit is None or ratio is None else ratio <= limit,
    }


SUMMARY_KEYS = (
    "accuracy", "token_accuracy", "exact_match", "f1", "perplexity", "eval_loss", "test_f1",
    "test_accuracy",
)  # fmt: skip


def _print_summary(cfg: RayftConfig, metrics: dict[str, Any]) -> None:
    keys = SUMMARY_KEYS
    shown = [f"{k} {metrics[k]:.4f}" for k in keys if k in metrics]
    majority = metrics.get("baselines", {}).get("majority")
    if majority:
        scores = ", ".join(f"{k} {majority[k]:.4f}" for k in keys if k in majority)
        shown.append(f"(majority baseline: {scores})")
    say(f"done in {metrics['wall_seconds']:.0f}s: " + ", ".join(shown))
    for name, scores in metrics.get("baselines", {}).items():
        if name == "pretrained":
            shown = ", ".join(f"{k} {scores[k]:.4f}" for k in keys if k in scores)
            say(f"{name} baseline: {shown}")
    forgetting = metrics.get("forgetting", {})
    if "ratio" in forgetting:
        flag = " EXCEEDS eval.max_forgetting" if forgetting.get("exceeded") else ""
        say(
            f"forgetting: general-text {forgetting['measure']} {forgetting['before']:.4f} -> "
            f"{forgetting['after']:.4f}, ratio {forgetting['ratio']:.3f}{flag}"
        )
    slices = metrics.get("slices")
    if slices and slices.get("gap") is not None:
        flag = " EXCEEDS eval.max_slice_gap" if slices["exceeded"] else ""
        say(
            f"slices by {slices['column']}: {slices['metric']} gap {slices['gap']:.4f} "
            f"({slices['best']} vs {slices['worst']}){flag}"
        )
    where = os.path.join(cfg.output_dir, ckpt.MODEL_DIR)
    adapter = os.path.join(cfg.output_dir, ckpt.ADAPTER_DIR)
    extra = f" (peft adapter: {adapter})" if cfg.method == "lora" else ""
    say(f"model saved to {where}{extra}; metrics in {cfg.output_dir}/metrics.json")
