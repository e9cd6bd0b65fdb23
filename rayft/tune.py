"""`python -m rayft.tune` (also `rayft tune`): hyperparameter search in which every trial
is a full multi-worker Ray Train + DeepSpeed run.

Each trial is a small Tune function (a fraction of a CPU) that launches its own
`TorchTrainer`. A Ray Train callback relays every report of the workers (eval metrics
every `tune.eval_every_steps`, and the checkpoint's location) through a queue to the trial,
which reports them to Tune: the scheduler (ASHA, HyperBand, median, PBT) sees the metric
while the trial trains, and stopping a trial tears down its worker group with it. The
Tune checkpoint of a trial is a pointer to its latest Ray Train checkpoint, which is how
PBT clones a better trial (DeepSpeed or adapter state) and how `tune.resume` continues.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

from rayft import tracking
from rayft.config import (
    ConfigError,
    RayftConfig,
    TuneSection,
    baselines,
    deep_merge,
    dump_config,
    load_config,
    resolve_paths,
    single_worker_zero_note,
    validate_config,
)
from rayft.console import say
from rayft.data import fs
from rayft.evaluate import add_within_forgetting, within_forgetting_key
from rayft.tasks import get_task
from rayft.timing import Timings

TUNE_DIR = "tune"
POINTER_FILE = "rayft_train_checkpoint.json"
DRIVER_CPUS = 0.1  # a trial's own process only waits on its workers; 0 is refused by Tune
BEST_DIR = "best"
COMPLETED = "rayft_completed"  # in a trial's last report once its model is exported


# ------------------------------------------------------------------ the search space


def _nested(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _samples(spec: dict[str, list]) -> list[Any]:
    """Values a distribution can produce at its extremes (to validate before running)."""
    ((kind, args),) = spec.items()
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return list(args)


def check_search_space(cfg: RayftConfig) -> None:
    """Every key must name a config field and every value the distribution can take must
    validate there; all problems are reported at once, before Ray starts."""
    space = cfg.tune.search_space
    base = cfg.model_dump(mode="json", exclude={"tune"})
    problems: list[str] = []
    for key, spec in space.items():
        for value in _samples(spec):
            try:
                validate_config(deep_merge(base, _nested(key, value)))
            except ConfigError as exc:
                problems += [f"tune.search_space.{key} = {value!r}: {p}" for p in exc.problems]
                break
    if cfg.tune.search_alg == "grid":
        for key, spec in space.items():
            if next(iter(spec)) not in ("grid", "choice"):
                problems.append(
                    f"tune.search_space.{key}: search_alg grid needs grid or choice values, "
                    f"got {next(iter(spec))}; use search_alg random or optuna for it"
                )
    known = (*get_task(cfg.task).metric_names, "eval_loss")
    if cfg.tune.metric not in known:
        problems.append(
            f"tune.metric: {cfg.task} reports no {cfg.tune.metric!r} while it trains; "
            f"use one of {', '.join(known)}"
        )
    if cfg.scaling.in_process:
        problems.append(
            "scaling.in_process: a search runs every trial as a worker group of its own "
            "(trials run side by side, and schedulers stop them); set "
            "scaling.in_process=false"
        )
    if cfg.tune.scheduler == "pbt" and "train.lr" not in space:
        problems.append("tune.scheduler pbt perturbs the learning rate: add train.lr to "
                        "tune.search_space")  # fmt: skip
    if problems:
        raise ConfigError(problems)


# What decides whether one worker is given a ZeRO stage that partitions nothing.
ZERO_NOTE_KEYS = (
    "scaling.num_workers",
    "deepspeed.stage",
    "deepspeed.offload_optimizer",
    "deepspeed.offload_param",
)


def trial_zero_notes(cfg: RayftConfig) -> list[str]:
    """`single_worker_zero_note` for the trials a search space makes, where the base
    config has none of its own: e.g. `scaling.num_workers` choosing 1 beside an explicit
    `deepspeed.stage: 2`. One line per combination of the varied values that earns it
    (the extremes of a range, as `check_search_space` validates)."""
    if single_worker_zero_note(cfg):
        return []  # the launch advice says it for every trial already
    space = cfg.tune.search_space
    varied = {key: _samples(space[key]) for key in ZERO_NOTE_KEYS if key in space}
    base = cfg.model_dump(mode="json", exclude={"tune"})
    notes: list[str] = []
    for values in itertools.product(*varied.values()):
        raw = base
        for key, value in zip(varied, values, strict=True):
            raw = deep_merge(raw, _nested(key, value))
        try:
            trial = validate_config(raw)
        except ConfigError:
            continue  # a combination no trial can run: check_search_space's concern
        if note := single_worker_zero_note(trial):
            where = ", ".join(f"{k}={v}" for k, v in zip(varied, values, strict=True))
            notes.append(f"trials with {where}: {note}")
    return notes


def tune_space(space: dict[str, dict[str, list]], search_alg: str) -> dict[str, Any]:
    """Our distributions -> a nested Tune param_space (keys are config paths)."""
    from ray import tune

    param_space: dict[str, Any] = {}
    for key, spec in space.items():
        ((kind, args),) = spec.items()
        if kind == "grid" or (kind == "choice" and search_alg == "grid"):
            value = tune.grid_search(list(args))
        elif kind == "choice":
            value = tune.choice(list(args))
        elif kind == "loguniform":
            value = tune.loguniform(*args)
        elif kind == "uniform":
            value = tune.uniform(*args)
        else:
            value = tune.randint(*args)
        param_space = deep_merge(param_space, _nested(key, value))
    return param_space


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------------- a trial


def _relay_callback(queue: Any) -> Any:
    from ray.train.v2.api.callback import UserCallback

    class Relay(UserCallback):
        """Runs in the Train controller: forwards rank 0's report and the checkpoint's
        location to the trial that owns this run."""

        def after_report(self, run_context, metrics, checkpoint):
            queue.put((dict(metrics[0]), checkpoint.path if checkpoint else None))

    return Relay()


def trial_config(base: dict[str, Any], params: dict[str, Any], trial_id: str) -> RayftConfig:
    out = os.path.join(base["output_dir"], TUNE_DIR, "trials", trial_id)
    raw = deep_merge(base, params)
    # Checkpoints under the search's storage_path (shared storage or s3:// on a cluster:
    # Ray Train checks that every node reaches it), outputs under the driver's output_dir.
    storage = fs.join(base["storage_path"], "trials", trial_id)
    raw.update(output_dir=out, storage_path=storage, run_name=f"trial-{trial_id}")
    # Every trial reads the shards the driver prepared (cache_dir is not part of their key).
    raw["data"]["cache_dir"] = raw["data"]["cache_dir"] or fs.join(base["storage_path"], "prepared")
    return resolve_paths(validate_config(raw))


def objective(cfg: RayftConfig) -> str:
    """What the search optimizes: `tune.metric`, or with `eval.max_forgetting`
    `<metric>_within_forgetting` (the trials within the limit rank first)."""
    metric = cfg.tune.metric
    return metric if cfg.eval.max_forgetting is None else within_forgetting_key(metric)


def run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    metric: str = "eval_loss",
    mode: str = "min",
    general_text: list[str] | None = None,
) -> None:
    """A Tune function trainable: one multi-worker Ray Train + DeepSpeed run; `metric`
    and `mode` are the search's (for `<metric>_within_forgetting`)."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    from rayft.data.prepare import prepare
    from rayft.loop import Plan
    from rayft.trainer import (
        build_datasets,
        build_trainer,
        run_trainer,
        sample_prompts,
        write_outputs,
    )

    started = time.time()
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params, trial_id)
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as handle:
        handle.write(dump_config(cfg))
    timings = Timings()
    with timings.section("data"):
        prepared = prepare(cfg, outputs=False)  # the search driver wrote the data report
        plan = Plan.derive(cfg, prepared.labels, prepared.units, cfg.scaling.num_workers)
        datasets = build_datasets(cfg, prepared, plan)
    run_name, resume = cfg.run_name, None
    restored = tune.get_checkpoint()
    if restored is not None:  # PBT exploit or a resumed search: continue from that state
        with (
            restored.as_directory() as directory,
            open(os.path.join(directory, POINTER_FILE)) as handle,
        ):
            source = json.load(handle)["path"]
        # A new Train run (Train's own resume is for restarts of this run) from a copy:
        # the trial that wrote the state may delete it as its training moves on.
        run_name = f"{cfg.run_name}-restored-{time.strftime('%H%M%S')}"
        resume = fs.copy_tree(source, fs.join(cfg.storage_path, run_name, "from"))
        say(f"trial {trial_id}: continuing from {source}")
    queue = Queue(actor_options={"num_cpus": 0})  # fits in the trial's 0.1-CPU bundle
    trainer = build_trainer(
        cfg,
        plan,
        datasets,
        run_name=run_name,
        callbacks=[_relay_callback(queue)],
        resume_from=resume,
        prompts=sample_prompts(cfg, prepared),
        general_text=general_text,
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            with timings.section("run"):
                outcome["result"] = run_trainer(trainer, cfg)
        except BaseException as exc:  # surfaced in the trial below
            outcome["error"] = exc

    worker = threading.Thread(target=fit, daemon=True)
    worker.start()
    final = None
    while worker.is_alive() or not queue.empty():
        try:
            metrics, path = queue.get(timeout=1.0)
        except Empty:
            continue
        if metrics.get("done"):
            final = metrics  # reported once the model is exported (below)
            continue
        _report(tune, _with_objective(metrics, cfg, metric, mode), path)
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    summary = write_outputs(cfg, prepared, result, started, timings)
    final = {**(final or {}), COMPLETED: 1, "wall_seconds": summary["wall_seconds"]}
    final = _with_objective(final, cfg, metric, mode)
    # No checkpoint: the trial's last Tune checkpoint stays a training state (the export is
    # no place to continue from, for PBT cloning this trial or a resumed search).
    _report(tune, final, None)


def _with_objective(
    metrics: dict[str, Any], cfg: RayftConfig, metric: str, mode: str
) -> dict[str, Any]:
    """Add `<tune.metric>_within_forgetting` when the search is bounded by forgetting."""
    metrics = dict(metrics)
    add_within_forgetting(metrics, cfg, metric, mode)
    return metrics


def _report(tune: Any, metrics: dict[str, Any], path: str | None) -> None:
    # "done" is Tune's own key (set when a trial ends, stopped or not): ours is COMPLETED.
    metrics = {k: v for k, v in metrics.items() if k != "done" and not isinstance(v, (dict, list))}
    if path is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="rayft-pointer-") as directory:
        with open(os.path.join(directory, POINTER_FILE), "w") as handle:
            json.dump({"path": path}, handle)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


# ------------------------------------------------------------------------ the search


def _scheduler(t: TuneSection) -> Any:
    from ray.tune import schedulers

    options = dict(t.scheduler_config)
    try:
        if t.scheduler == "asha":
            from rayft.schedulers import ResumableASHA

            options.setdefault("grace_period", 1)
            options.setdefault("reduction_factor", 2)
            options.setdefault("max_t", 10_000)
            return ResumableASHA(time_attr="training_iteration", **options)
        if t.scheduler == "hyperband":
            options.setdefault("max_t", 81)
            return schedulers.HyperBandScheduler(time_attr="training_iteration", **options)
        if t.scheduler == "median":
            options.setdefault("grace_period", 1)
            options.setdefault("min_samples_required", 2)
            return schedulers.MedianStoppingRule(time_attr="training_iteration", **options)
        if t.scheduler == "pbt":
            from ray import tune

            # The learning rate moves continuously (x0.8 / x1.2, or a fresh draw) within the
            # searched range, also when the search lists values: PBT's list mutation would
            # step between the listed values only.
            ((kind, args),) = t.search_space["train.lr"].items()
            low, high = (
                (args[0], args[1]) if kind in ("loguniform", "uniform") else (min(args), max(args))
            )
            lr = tune.uniform(low, high) if kind == "uniform" else tune.loguniform(low, high)
            options.setdefault("perturbation_interval", 2)
            return schedulers.PopulationBasedTraining(
                time_attr="training_iteration",
                hyperparam_mutations={"train": {"lr": lr}},
                **options,
            )
        return schedulers.FIFOScheduler()
    except TypeError as exc:
        raise ConfigError([f"tune.scheduler_config for {t.scheduler}: {exc}"]) from None


def _search_alg(t: TuneSection) -> Any:
    if t.search_alg != "optuna":
        return None  # random sampling and grid expansion: Tune's variant generator
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError(["tune.search_alg optuna needs `pip install optuna`"]) from None
    return OptunaSearch(seed=t.seed)


def default_concurrency(cfg: RayftConfig) -> int:
    """As many trials as the cluster's CPUs and GPUs allow, after each trial's workers,
    its driver and a CPU for the data pipeline."""
    import ray

    resources = ray.cluster_resources()
    s = cfg.scaling
    per_trial = s.num_workers * s.cpus_per_worker + DRIVER_CPUS
    limit = max(1, math.floor((resources.get("CPU", 1) - 1) / per_trial))
    if s.use_gpu:
        limit = min(limit, max(1, math.floor(resources.get("GPU", 0) / s.num_workers)))
    return limit


def search(cfg: RayftConfig, *, resume: bool = False) -> dict[str, Any]:
    """Prepare the data once, run the trials, and write output_dir/tune/."""
    import functools

    from ray import tune

    from rayft.data.prepare import check_sources, prepare
    from rayft.forgetting import read_general_text
    from rayft.trainer import init_ray, say_launch_advice

    t = cfg.tune
    check_search_space(cfg)
    scheduler, search_alg = _scheduler(t), _search_alg(t)  # their errors too, before Ray
    cfg = resolve_paths(cfg)
    files = check_sources(cfg)
    say_launch_advice(cfg)
    for note in trial_zero_notes(cfg):
        say(f"NOTE: {note}")
    out = os.path.join(cfg.output_dir, TUNE_DIR)
    os.makedirs(out, exist_ok=True)
    init_ray(cfg, trials=t.max_concurrent_trials or 1, driver_cpus=DRIVER_CPUS)
    prepare(cfg, files)  # once, here: every trial reuses the shards
    base = cfg.model_dump(mode="json", exclude={"tune"})
    base["train"]["eval_every_steps"] = t.eval_every_steps or base["train"]["eval_every_steps"]
    # MLflow and W&B log a search through Ray Tune's own callbacks (a run per trial); the
    # frozen baseline runs once, for the best trial, after the search.
    base["tracking"].update(mlflow=False, wandb=False)
    base["eval"]["baselines"] = [b for b in baselines(cfg) if b != "frozen"]
    if t.scheduler == "pbt" and not base["checkpoint"]["every_steps"]:
        # PBT clones the state behind a trial's latest report: every report needs one.
        base["checkpoint"]["every_steps"] = base["train"]["eval_every_steps"]
    trial = functools.partial(
        run_trial,
        base=base,
        metric=t.metric,
        mode=t.resolved_mode,
        general_text=read_general_text(cfg),  # read here: trials may run on other nodes
    )
    trainable = tune.with_resources(trial, {"CPU": DRIVER_CPUS})
    concurrency = t.max_concurrent_trials or default_concurrency(cfg)
    searches = fs.join(cfg.storage_path, TUNE_DIR)  # resolve_paths made it absolute
    experiment = fs.join(searches, "search")
    resuming = resume and tune.Tuner.can_restore(experiment)
    if hasattr(scheduler, "state_path") and "://" not in searches:
        # ASHA's rungs, for a resumed search to judge the remaining trials by.
        scheduler.state_path = os.path.join(searches, "asha_state.pkl")
        os.makedirs(searches, exist_ok=True)
        if not resuming and os.path.exists(scheduler.state_path):
            os.remove(scheduler.state_path)  # a previous search's
    say(f"tune: {t.num_samples} sample(s), scheduler {t.scheduler}, search {t.search_alg}, "
        f"up to {concurrency} trial(s) at once of {cfg.scaling.num_workers} worker(s) each")  # fmt: skip
    if resuming:
        say(f"tune: resuming the search in {experiment}")
        tuner = tune.Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(t.search_space, t.search_alg),
            tune_config=tune.TuneConfig(
                metric=objective(cfg),
                mode=t.resolved_mode,
                num_samples=t.num_samples,
                scheduler=scheduler,
                search_alg=search_alg,
                max_concurrent_trials=concurrency,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name="search",
                storage_path=searches,
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=tracking.tune_callbacks(cfg),
                verbose=1,
            ),
        )
    results = tuner.fit()
    return write_search_outputs(cfg, results)


# ------------------------------------------------------------------------- outputs


def write_search_outputs(cfg: RayftConfig, results: Any) -> dict[str, Any]:
    t = cfg.tune
    metric, key = t.metric, objective(cfg)  # reported, and ranked by (with forgetting)
    out = os.path.join(cfg.output_dir, TUNE_DIR)
    sign = 1 if t.resolved_mode == "max" else -1
    rows, curves = [], {}
    for result in results:
        frame = result.metrics_dataframe
        history = [] if frame is None else frame.to_dict("records")
        scores = [h[metric] for h in history if isinstance(h.get(metric), (int, float))]
        ranked = [h[key] for h in history if isinstance(h.get(key), (int, float))]
        last = history[-1] if history else {}
        trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path)
        if result.error is not None:
            status = "error"
        elif last.get(COMPLETED):
            status = "completed"
        else:
            status = "stopped"
        params = _flatten(result.config or {})
        rows.append(
            {
                "trial_id": trial_id,
                **params,
                f"best_{metric}": max(scores, key=lambda v: sign * v) if scores else None,
                f"last_{metric}": scores[-1] if scores else None,
                **(
                    {"last_within_forgetting": ranked[-1] == scores[-1] if ranked else None}
                    if key != metric
                    else {}
                ),
                "steps": last.get("step"),
                "evaluations": len(scores),
                "status": status,
                "wall_seconds": round(last.get("time_total_s", 0.0), 1),
                "output_dir": os.path.join(out, "trials", trial_id),
                "_rank": ranked[-1] if ranked else None,
            }
        )
        curves[trial_id] = (
            [h.get("step") for h in history if metric in h],
            scores,
            status,
            params,
        )
    columns = [k for k in dict.fromkeys(k for row in rows for k in row) if k != "_rank"]
    with open(os.path.join(out, "trials.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    finished = [r for r in rows if r["status"] == "completed" and r["_rank"] is not None]
    summary: dict[str, Any] = {"metric": metric, "ranked_by": key, "mode": t.resolved_mode,
                               "trials": len(rows),
                               "completed": len(finished),
                               "stopped_early": sum(r["status"] == "stopped" for r in rows),
                               "errored": sum(r["status"] == "error" for r in rows),
                               "trial_steps": sum(r["steps"] or 0 for r in rows)}  # fmt: skip
    if finished:
        best = max(finished, key=lambda r: sign * r["_rank"])
        summary.update(
            best_trial=best["trial_id"],
            best_config={k: best[k] for k in _flatten(results[0].config or {})},
            best_metric=best[f"last_{metric}"],
        )
        if key != metric:
            summary["best_within_forgetting"] = best["last_within_forgetting"]
        shutil.rmtree(os.path.join(out, BEST_DIR), ignore_errors=True)
        shutil.copytree(
            best["output_dir"], os.path.join(out, BEST_DIR), ignore=shutil.ignore_patterns("ray")
        )
        for name in ("data_report.json", "data_report.png"):  # written once, by the search
            if os.path.isfile(os.path.join(cfg.output_dir, name)):
                shutil.copy(os.path.join(cfg.output_dir, name), os.path.join(out, BEST_DIR))
        _best_trial_baseline(cfg, os.path.join(out, BEST_DIR), best["trial_id"])
        with open(os.path.join(out, BEST_DIR, "metrics.json")) as handle:
            best_metrics = json.load(handle)
        summary["best_metrics"] = {
            k: v
            for k, v in best_metrics.items()
            if isinstance(v, (int, float)) or k in ("baselines", "forgetting")
        }
    with open(os.path.join(out, "best.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    plot_trials(curves, metric, os.path.join(out, "trials.png"))
    _say_summary(summary, out)
    return summary


def _best_trial_baseline(cfg: RayftConfig, best_dir: str, trial_id: str) -> None:
    """The frozen-backbone baseline, once, for the best trial (trials skip it): added to
    its metrics.json; the report written again."""
    from rayft.data.prepare import check_sources
    from rayft.trainer import add_frozen_baseline

    trial_cfg = load_config(os.path.join(best_dir, "config.yaml"))
    trial_cfg = trial_cfg.model_copy(update={"eval": cfg.eval, "output_dir": best_dir})
    if add_frozen_baseline(trial_cfg, check_sources(cfg), f"trial-{trial_id}", best_dir):
        return  # the report was written again with it
    if cfg.eval.report:  # again, now with the search's data report beside it
        from rayft.report import write_report

        write_report(best_dir)


def plot_trials(curves: dict[str, tuple], metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for trial_id, (steps, scores, status, params) in curves.items():
        if not scores:
            continue
        label = f"{trial_id} " + ", ".join(
            f"{k.split('.')[-1]}={_short(v)}" for k, v in params.items()
        )
        style = "-" if status == "completed" else "--"
        (line,) = ax.plot(
            steps, scores, style, marker="o", markersize=3, label=f"{label} ({status})"
        )
        if status != "completed":
            ax.plot(steps[-1:], scores[-1:], "x", color=line.get_color(), markersize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} of each trial while it trained (x: stopped early)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _short(value: Any) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)


def _say_summary(summary: dict[str, Any], out: str) -> None:
    say(
        f"tune: {summary['trials']} trial(s): {summary['completed']} completed, "
        f"{summary['stopped_early']} stopped early, {summary['errored']} failed; "
        f"{summary['trial_steps']} training steps in all"
    )
    if "best_metric" in summary:
        majority = summary["best_metrics"].get("baselines", {}).get("majority", {})
        base = (
            f" (majority-class baseline {majority.get(summary['metric']):.4f})"
            if summary["metric"] in majority
            else ""
        )
        say(f"tune: best {summary['metric']} {summary['best_metric']:.4f}{base} with "
            f"{summary['best_config']}; model in {out}/{BEST_DIR}/")  # fmt: skip
    say(f"tune: trials.csv, best.json, trials.png in {out}/")


# ------------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    from rayft.data.read import DataError

    parser = argparse.ArgumentParser(prog="rayft tune", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config with a tune: section")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.tune is None:
            raise ConfigError(["tune: section is missing (search_space, num_samples, ...)"],
                              args.config)  # fmt: skip
        search(cfg, resume=args.resume or cfg.tune.resume)
    except (ConfigError, DataError) as exc:
        print(f"rayft tune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
