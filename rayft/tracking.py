"""Experiment tracking through the libraries' own APIs: TensorBoard (default), MLflow,
Weights & Biases.

The driver opens the MLflow run (so the config's parameters are logged before anything
trains); a Ray Train callback, running in the Train controller, logs every report of the
workers as it arrives (TensorBoard events, MLflow metrics, W&B history); the driver then
logs the final figures and the report's files. Credentials are never part of this: MLflow
and W&B read theirs from the environment.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from rayft.config import ConfigError, RayftConfig

TENSORBOARD_DIR = "tensorboard"
ARTIFACTS = (
    "report.md", "report.html", "metrics.json", "config.yaml", "data_report.json",
    "learning_curves.png", "confusion_matrix.png", "entity_f1.png", "slices.png",
)  # fmt: skip


@dataclass(frozen=True)
class TrackingRun:
    """Where a run logs: plain values, so it travels to the Train controller."""

    output_dir: str
    run_name: str
    tensorboard: bool
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    wandb: dict[str, Any] | None = None  # wandb.init keyword arguments


def flat_params(cfg: RayftConfig) -> dict[str, str]:
    """The config as `section.key -> value` strings (MLflow params, W&B config)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix.rstrip(".")] = str(node)[:500]  # MLflow's limit on a param value

    walk(cfg.model_dump(mode="json", exclude={"tune"}), "")
    return out


def mlflow_tracking_uri(cfg: RayftConfig) -> str:
    """`tracking.mlflow_tracking_uri`, else `MLFLOW_TRACKING_URI`, else a local SQLite
    store in output_dir (MLflow 3 refuses new file stores)."""
    return (
        cfg.tracking.mlflow_tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or "sqlite:///" + os.path.join(cfg.output_dir, "mlflow.db")
    )


def mlflow_experiment(cfg: RayftConfig, client: Any) -> str:
    """The experiment's id, created when new with its artifacts beside the local store
    (MLflow would put them under the current directory)."""
    name = cfg.tracking.mlflow_experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    local = mlflow_tracking_uri(cfg).startswith("sqlite:///")
    location = "file:" + os.path.join(cfg.output_dir, "mlartifacts") if local else None
    return client.create_experiment(name, artifact_location=location)


def start(cfg: RayftConfig, run_name: str) -> TrackingRun:
    """Open the run in each enabled tracker; fail before training when one is not usable."""
    t = cfg.tracking
    mlflow_uri = run_id = None
    if t.mlflow:
        try:
            import mlflow
        except ImportError:
            raise ConfigError(["tracking.mlflow needs `pip install mlflow`"]) from None
        mlflow_uri = mlflow_tracking_uri(cfg)
        client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
        run = client.create_run(
            mlflow_experiment(cfg, client), run_name=run_name, tags={"rayft.task": cfg.task}
        )
        run_id = run.info.run_id
        params = flat_params(cfg)
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            client.log_batch(run_id, params=items[i : i + 100])
    wandb = None
    if t.wandb:
        try:
            import wandb as _wandb  # noqa: F401
        except ImportError:
            raise ConfigError(["tracking.wandb needs `pip install wandb`"]) from None
        wandb = {
            "project": t.wandb_project,
            "entity": t.wandb_entity,
            "name": run_name,
            "id": uuid.uuid4().hex[:16],
            "config": flat_params(cfg),
            "dir": cfg.output_dir,
        }
    return TrackingRun(cfg.output_dir, run_name, t.tensorboard, mlflow_uri, run_id, wandb)


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "done")
    }


def callback(run: TrackingRun) -> Any:
    """A Ray Train callback that logs each report of rank 0 as it arrives."""
    from ray.train.v2.api.callback import UserCallback

    class Track(UserCallback):
        def __init__(self) -> None:
            self.writer = None
            self.wandb = None

        def after_report(self, run_context, metrics, checkpoint):
            report = metrics[0]
            step = int(report.get("step", 0))
            values = scalars(report)
            if run.tensorboard:
                if self.writer is None:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(os.path.join(run.output_dir, TENSORBOARD_DIR))
                for key, value in values.items():
                    self.writer.add_scalar(key, value, step)
                self.writer.flush()
            if run.mlflow_run_id:
                _mlflow_metrics(run, values, step)
            if run.wandb:
                if self.wandb is None:
                    import wandb

                    self.wandb = wandb.init(**run.wandb, resume="allow", reinit=True)
                self.wandb.log(values, step=step)
            if report.get("done"):
                self.close()

        def after_exception(self, run_context, worker_exceptions):
            self.close()

        def close(self) -> None:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            if self.wandb is not None:
                self.wandb.finish()
                self.wandb = None

    return Track()


def _mlflow_metrics(run: TrackingRun, values: dict[str, float], step: int, prefix: str = "") -> Any:
    """Log `values` at `step` to the run's MLflow run (in MLflow's batches of 1000);
    returns the client."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(tracking_uri=run.mlflow_uri)
    stamp = int(1000 * time.time())
    items = [Metric(f"{prefix}{k}", v, stamp, step) for k, v in values.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run.mlflow_run_id, metrics=items[i : i + 1000])
    return client


def finish(run: TrackingRun, metrics: dict[str, Any], failed: bool = False) -> None:
    """Final figures (baselines and forgetting included, flattened) and the report files."""
    summary = scalars(_flatten(metrics))
    if run.mlflow_run_id:
        client = _mlflow_metrics(run, summary, int(metrics.get("step", 0)), prefix="final.")
        for name in ARTIFACTS:
            path = os.path.join(run.output_dir, name)
            if os.path.isfile(path):
                client.log_artifact(run.mlflow_run_id, path)
        client.set_terminated(run.mlflow_run_id, status="FAILED" if failed else "FINISHED")
    if run.wandb:
        import wandb

        session = wandb.init(**run.wandb, resume="allow", reinit=True)
        session.summary.update(summary)
        for name in ARTIFACTS:
            path = os.path.join(run.output_dir, name)
            if os.path.isfile(path):
                session.save(path, base_path=run.output_dir, policy="now")
        session.finish(exit_code=1 if failed else 0)


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def tune_callbacks(cfg: RayftConfig) -> list[Any]:
    """Ray's own logger callbacks for a search: one MLflow run / W&B run per trial."""
    t = cfg.tracking
    callbacks: list[Any] = []
    if t.mlflow:
        import mlflow
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        mlflow_experiment(cfg, mlflow.MlflowClient(tracking_uri=mlflow_tracking_uri(cfg)))

        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=mlflow_tracking_uri(cfg), experiment_name=t.mlflow_experiment
            )
        )
    if t.wandb:
        try:
            from ray.air.integrations.wandb import WandbLoggerCallback
        except ImportError:
            raise ConfigError(["tracking.wandb needs `pip install wandb`"]) from None
        callbacks.append(WandbLoggerCallback(project=t.wandb_project, entity=t.wandb_entity))
    return callbacks
