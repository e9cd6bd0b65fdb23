"""Tune schedulers that survive `tune.resume`.

`Tuner.restore` brings back the trials but not the scheduler's bookkeeping: a resumed ASHA
search would judge the remaining trials against nothing and stop none. `ResumableASHA`
saves its rungs after every decision and reads them back when the restored search
unpickles it."""

from __future__ import annotations

import os
import pickle
from typing import Any

from ray.tune.schedulers import ASHAScheduler


class ResumableASHA(ASHAScheduler):
    state_path: str | None = None  # a local file; None: not saved
    # The bookkeeping; metric and mode are Tune's to set again on the restored search.
    _KEPT = ("_trial_info", "_brackets", "_counter", "_num_stopped")

    def _persist(self) -> None:
        if self.state_path:
            partial = f"{self.state_path}.partial"
            with open(partial, "wb") as handle:
                pickle.dump({k: self.__dict__[k] for k in self._KEPT}, handle)
            os.replace(partial, self.state_path)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        self._persist()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._persist()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.state_path and os.path.exists(self.state_path):
            with open(self.state_path, "rb") as handle:
                self.__dict__.update(pickle.load(handle))
