"""What lets a restarted run continue exactly where it stopped, and the means to prove it.

- `rng_state` / `set_rng_state`: each rank's random states (dropout draws on them), saved
  in its checkpoint shard, so the steps after a resume draw what they would have drawn.
- `Ledger`: with `checkpoint.ledger`, every rank records which rows it trained on, at
  which step and in which attempt, under ``<storage_path>/<run>/ledger``; `audit_ledger`
  replays it: after dropping what an attempt did past the checkpoint the next attempt
  resumed from, every epoch must hold each training row exactly once.
- `Fault`: ``RAYFT_FAULT=kill:rank=1:step=5[:times=1]`` in the driver's environment makes
  that worker SIGKILL itself right after that optimizer step (before the step's report or
  checkpoint), at most ``times`` times per run; ``rank=driver`` kills the driver there
  instead. How the recovery paths are tested.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rayft.data import fs

FAULT_ENV = "RAYFT_FAULT"
LEDGER_DIR = "ledger"
FAULTS_DIR = "faults"


def rng_state() -> dict[str, Any]:
    """This process's random states, as tensors and plain values (loadable with
    ``torch.load(weights_only=True)``)."""
    key, pos = np.random.get_state()[1:3]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos)},
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"]))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Ledger:
    """One rank's record of the rows it trained on, flushed as a new part file at every
    report (appends are not possible on object stores)."""

    def __init__(self, run_dir: str, rank: int, resumed_from: int):
        # Attempts of a run are ordered by their start; every rank of one attempt
        # resumes from the same step.
        self.prefix = fs.join(
            run_dir, LEDGER_DIR, f"rank{rank}-attempt{time.time_ns()}-from{resumed_from}"
        )
        self.rows: list[str] = []
        self.parts = 0

    def add(self, step: int, phase: int, epoch: int, batch: dict[str, np.ndarray]) -> None:
        for source, line, pad in zip(
            batch["_source"].tolist(), batch["_line"].tolist(), batch["_pad"].tolist(),
            strict=True,
        ):  # fmt: skip
            row = {"step": step, "phase": phase, "epoch": epoch, "source": source,
                   "line": line, "pad": pad}  # fmt: skip
            self.rows.append(json.dumps(row))

    def flush(self) -> None:
        if not self.rows:
            return
        fs.write_text(f"{self.prefix}-part{self.parts:05d}.jsonl", "\n".join(self.rows) + "\n")
        self.parts += 1
        self.rows = []


def audit_ledger(run_dir: str) -> dict[str, Any]:
    """Replay a run's ledger. Each rank's attempts are taken in order; of an attempt
    followed by another, only the steps up to the one the next attempt resumed from count
    (the rest were lost with the failure and redone). Returns the attempts, and for every
    (phase, epoch) the rows seen ``seen`` times, to compare with the training set:
    ``{"attempts": n, "resumed_from": [...], "epochs": {(phase, epoch): Counter}}``."""
    names = fs.list_names(fs.join(run_dir, LEDGER_DIR))
    attempts: dict[int, dict[str, list[str]]] = collections.defaultdict(dict)
    for name in names:
        rank, attempt, _ = name.split("-", 2)
        attempts[int(rank[4:])].setdefault(attempt, []).append(name)
    epochs: dict[tuple[int, int], collections.Counter] = collections.defaultdict(
        collections.Counter
    )
    resumed: list[int] = []
    for rank, by_attempt in sorted(attempts.items()):
        ordered = sorted(by_attempt, key=lambda a: int(a[len("attempt") :]))
        starts = [int(by_attempt[a][0].split("-from")[1].split("-")[0]) for a in ordered]
        if rank == 0:
            resumed = starts
        for index, attempt in enumerate(ordered):
            limit = starts[index + 1] if index + 1 < len(ordered) else None
            for name in sorted(by_attempt[attempt]):
                text = fs.read_text(fs.join(run_dir, LEDGER_DIR, name))
                for line in text.splitlines():
                    row = json.loads(line)
                    if row["pad"] or (limit is not None and row["step"] > limit):
                        continue
                    epochs[(row["phase"], row["epoch"])][(row["source"], row["line"])] += 1
    return {"attempts": len(resumed), "resumed_from": resumed, "epochs": dict(epochs)}


@dataclass(frozen=True)
class Fault:
    """A kill to inject (see the module docstring). ``rank=driver``: rank 0 kills the
    driver process (it must run on rank 0's node, as in a local test), then itself, so
    the run stops right there as if its head node had gone."""

    rank: int | None  # None: the driver
    step: int
    times: int = 1

    @classmethod
    def parse(cls, text: str) -> Fault:
        kind, *fields = text.split(":")
        try:
            values = dict(field.split("=", 1) for field in fields)
            rank = values.pop("rank")
            fault = cls(
                rank=None if rank == "driver" else int(rank),
                **{k: int(v) for k, v in values.items()},
            )
        except (ValueError, TypeError, KeyError):
            fault = None
        if kind != "kill" or fault is None:
            raise ValueError(
                f"{FAULT_ENV}={text!r}: write kill:rank=<r|driver>:step=<s>[:times=<n>], "
                "e.g. kill:rank=1:step=5"
            )
        return fault

    def fire(self, run_dir: str, rank: int, step: int, driver_pid: int, before: Any = None) -> None:
        """Kill if this is the rank (rank 0 for the driver) and step, and the run has
        fired fewer than ``times`` kills (counted by marker files in the run's storage);
        ``before()`` runs first."""
        if rank != (self.rank or 0) or step != self.step:
            return
        where = fs.join(run_dir, FAULTS_DIR)
        fired = len(fs.list_names(where))
        if fired >= self.times:
            return
        if before is not None:
            before()
        victim = "driver" if self.rank is None else f"rank{rank}"
        fs.write_text(fs.join(where, f"kill-{fired + 1}-{victim}-step{step}"), "")
        if self.rank is None:
            os.kill(driver_pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def fault_from_env() -> str | None:
    """The driver's `RAYFT_FAULT`, checked here so a typo fails before any worker starts."""
    text = os.environ.get(FAULT_ENV)
    if text:
        Fault.parse(text)
    return text or None


def faults_fired(run_dir: str) -> list[str]:
    return fs.list_names(fs.join(run_dir, FAULTS_DIR))
