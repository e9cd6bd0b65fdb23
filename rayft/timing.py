"""Where a run's wall time goes: named sections of it, summed, for metrics.json.

The driver times Ray's start, the data stage, the training run as a whole (`run`) and
the outputs; each worker times its own setup, evaluations, checkpoints and the final export.
What the run spent outside the workers' own time (Ray Train starting and stopping the
worker group, the final checkpoint travelling to storage) is the difference, `launch`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

# In the order a run goes through them (the report's table keeps it), with what each holds.
SECTIONS = {
    "ray_start": "joining or starting Ray (driver)",
    "data": "reading, cleaning, dedup, splitting; the tokenizing datasets (driver)",
    "launch": "Ray Train starting and stopping the workers, persisting the final checkpoint "
    "(next to nothing with scaling.in_process)",
    "setup": "imports, tokenizer, model, DeepSpeed engine (workers)",
    "train": "optimizer steps, waiting for batches included (workers)",
    "eval": "evaluations, the baseline and final ones included (workers)",
    "checkpoint": "writing training states (workers)",
    "report": "handing metrics and checkpoints to Ray Train: the copy to storage_path, the "
    "wait for its controller to collect the previous report; with checkpoint.upload async "
    "only the hand-off, and what is still queued at the end falls in launch (workers)",
    "export": "gathering and writing the trained model and predictions (workers)",
    "outputs": "model copy and metrics.json (driver)",
}


class Timings:
    """Seconds per named section; a section entered twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def with_workers(self, worker: dict[str, float] | None) -> Timings:
        """The driver's sections and rank 0's (as its final metrics carry them) in one;
        `launch` is the driver's `run` less the worker's own wall time."""
        merged = Timings()
        worker = dict(worker or {})
        worker_wall = worker.pop("worker", None)
        for name, seconds in [*self.seconds.items(), *worker.items()]:
            if name != "run":
                merged.add(name, seconds)
        if "run" in self.seconds and worker_wall is not None:
            merged.add("launch", max(self.seconds["run"] - worker_wall, 0.0))
        return merged

    def as_dict(self) -> dict[str, float]:
        ordered = [k for k in SECTIONS if k in self.seconds]
        ordered += sorted(k for k in self.seconds if k not in SECTIONS)
        return {k: round(self.seconds[k], 3) for k in ordered}
