"""The training loop that every Ray Train worker runs: one function, top to bottom.

For each phase of the method (one, or two for `two_stage`): build the model, set what
trains, wrap it in DeepSpeed, then epoch -> micro-batch -> accumulate -> step, evaluating,
reporting and checkpointing as configured. Finally gather the weights and export them.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rayft import checkpoint as ckpt
from rayft import forgetting as forgetting_mod
from rayft import inprocess, methods, resilience
from rayft.config import RayftConfig, baselines
from rayft.console import say
from rayft.data.features import PROVENANCE
from rayft.engine import initialize, zero3_init_context
from rayft.evaluate import add_within_forgetting, slice_metrics
from rayft.modeling import build_model, load_tokenizer
from rayft.tasks import Task, get_task
from rayft.tasks.common import pad_multiple
from rayft.timing import Timings

HISTORY_FILE = "history.jsonl"
PREDICTIONS_FILE = "eval_predictions.jsonl"
GENERATIONS_FILE = "generations.jsonl"


@dataclass
class Plan:
    """Numbers the driver derives once and every worker shares."""

    labels: list[str]
    train_rows: int  # after padding to a multiple of the worker count
    eval_rows: int
    micro_per_epoch: int  # micro-batches each worker runs per epoch
    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int  # over all phases, capped by train.max_steps
    pad_rows: dict[str, int] = field(default_factory=dict)

    @classmethod
    def derive(cls, cfg: RayftConfig, labels: list[str], rows: dict[str, int], world: int) -> Plan:
        pad = {split: (-n) % world for split, n in rows.items()}
        train_rows = rows["train"] + pad["train"]
        micro = math.ceil(train_rows // world / cfg.train.batch_size)
        steps = math.ceil(micro / cfg.train.grad_accum)
        total = sum(p.epochs for p in methods.phases(cfg)) * steps
        if cfg.train.max_steps:
            total = min(total, cfg.train.max_steps)
        return cls(labels, train_rows, rows["eval"] + pad["eval"], micro, steps, total, pad)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A task's collated batch without its "_" keys (kept for `predict`, not the model)."""
    return {k: v for k, v in inputs.items() if not k.startswith("_")}


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _rows(column: np.ndarray) -> np.ndarray:
    """One entry per row: Ray returns a 2-D array when a batch's sequences share a length."""
    if column.ndim == 1:
        return column
    rows = np.empty(len(column), dtype=object)
    rows[:] = list(column)
    return rows


Batch = dict[str, np.ndarray]  # a micro-batch as Ray Data hands it over: column -> rows


def epoch_batches(shard: Any, cfg: RayftConfig, seed: int) -> Iterator[Batch]:
    """One epoch of a rank's training shard in micro-batches, locally shuffled with
    ``seed`` when `data.shuffle_buffer_rows` asks for it."""
    return iter(
        shard.iter_batches(
            batch_size=cfg.train.batch_size,
            batch_format="numpy",
            prefetch_batches=2,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer_rows or None,
            local_shuffle_seed=seed if cfg.data.shuffle_buffer_rows else None,
        )
    )


def epoch_seed(seed: int, epoch: int, phase_index: int, rank: int) -> int:
    """The seed of a rank's epoch: its local shuffle and its length-grouped order."""
    return seed + 7919 * epoch + 104729 * phase_index + rank


def resume_position(state: dict[str, Any], plan: Plan) -> tuple[int, int]:
    """(epoch, micro-batches to skip in it) where a run continues within its phase: the
    next epoch when the saved one was complete."""
    if state["micro"] >= plan.micro_per_epoch:
        return state["epoch"] + 1, 0
    return state["epoch"], state["micro"]


class EarlyEpoch:
    """The first epoch's batches, asked for in a background thread while the worker
    imports its libraries and builds the model and engine. A streamed split (one larger
    than `data.materialize_max_mb`) delivers its first batch only once its coordinator and
    tasks have started and loaded the tokenizer: 7.9 s of a run's waiting on the 2-core
    test machine, all of it at the first step otherwise, against 0.4 s for the 624
    batches after it (benchmarks/RESULTS.md, Data: a streamed split). ``key`` is the
    (phase, epoch) it belongs to."""

    def __init__(self, start: Callable[[], Iterator[Batch]], key: tuple[int, int]) -> None:
        self.key = key
        self._iterator: Iterator[Batch] | None = None
        self._first: Batch | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._fetch, args=(start,), name="rayft-first-batch", daemon=True
        )
        self._thread.start()

    def _fetch(self, start: Callable[[], Iterator[Batch]]) -> None:
        try:
            self._iterator = start()
            self._first = next(self._iterator, None)
        except BaseException as exc:  # raised again where the batches are read
            self._error = exc

    def batches(self) -> Iterator[Batch]:
        self._thread.join()  # inside the epoch's loop: counted as waiting for data
        if self._error is not None:
            raise self._error
        if self._first is not None:
            yield self._first
            yield from self._iterator or ()


def length_grouped(
    batches: Iterator[dict[str, np.ndarray]], window: int, rng: np.random.Generator
) -> Iterator[dict[str, np.ndarray]]:
    """Regroup each window of ``window`` micro-batches so rows of similar length share a
    batch (less padding), then yield those batches in random order. The number of batches
    (and rows) is unchanged, so every rank still runs the same number of steps."""
    if window <= 1:
        yield from batches
        return
    while True:
        chunk = list(itertools.islice(batches, window))
        if not chunk:
            return
        size = len(chunk[0]["input_ids"])
        merged = {k: np.concatenate([_rows(b[k]) for b in chunk]) for k in chunk[0]}
        order = np.argsort([len(x) for x in merged["input_ids"]], kind="stable")
        groups = [order[i : i + size] for i in range(0, len(order), size)]
        for index in rng.permutation(len(groups)):
            yield {k: v[groups[index]] for k, v in merged.items()}


class _LossMeter:
    """Sums losses on the device (no host sync per step); read out only when reporting."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach().double()
        self.count += 1

    def local_mean(self) -> float:
        return float(self.total) / max(self.count, 1)

    def global_mean(self) -> float:
        """Mean over every rank's micro-batches (a collective: all ranks call it)."""
        t = torch.stack([self.total, self.total.new_tensor(float(self.count))])
        dist.all_reduce(t)
        return float(t[0]) / max(float(t[1]), 1.0)

    def reset(self) -> None:
        self.total.zero_()
        self.count = 0


def evaluate(
    engine: Any,
    shard: Any,
    task: Task,
    cfg: RayftConfig,
    plan: Plan,
    pad_id: int,
    rows_out: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Metrics over the whole eval split. Every rank runs the same number of forward passes
    (ZeRO-3 gathers weights collectively), padding rows are left out of every figure.
    With ``rows_out``, rank 0 also receives every row's prediction and reference."""
    engine.eval()
    multiple = pad_multiple(engine.device)
    preds: list[Any] = []
    refs: list[Any] = []
    where: list[tuple[str, int]] = []
    loss_sum, loss_rows = 0.0, 0
    batches = shard.iter_batches(
        batch_size=cfg.train.eval_batch_size, batch_format="numpy", prefetch_batches=2
    )
    # Rows of similar length share a batch here too (order does not matter to any metric;
    # the batch count, and so every rank's number of forward passes, is unchanged).
    batches = length_grouped(iter(batches), cfg.train.group_by_length, np.random.default_rng(0))
    with torch.no_grad():
        for batch in batches:
            real = ~batch.pop("_pad")
            if real.any() and not real.all():
                batch = {k: v[real] for k, v in batch.items()}
            sources, lines = batch.pop("_source"), batch.pop("_line")
            slices = batch.pop("_slice")  # eval.slice_column's value, or None
            inputs = _to_device(task.collate(batch, pad_id, multiple), engine.device)
            outputs = engine(**model_inputs(inputs))
            if not real.any():
                continue  # a forward only to keep ranks in step
            n = int(real.sum())
            loss_sum += float(outputs.loss) * n
            loss_rows += n
            preds.extend(task.predict(outputs, inputs, cfg))
            refs.extend(task.references(batch))
            where.extend(zip(sources.tolist(), lines.tolist(), slices.tolist(), strict=True))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (preds, refs, loss_sum, loss_rows, where))
    all_preds = [p for g in gathered for p in g[0]]
    all_refs = [r for g in gathered for r in g[1]]
    total_loss = sum(g[2] for g in gathered)
    total_rows = sum(g[3] for g in gathered)
    if rows_out is not None:
        all_where = [w for g in gathered for w in g[4]]
        for (source, line, slice_), pred, ref in zip(all_where, all_preds, all_refs, strict=True):
            rows_out.append(
                {"source": source, "line": line, "slice": slice_, "prediction": pred,
                 "reference": ref}
            )  # fmt: skip
    metrics = task.compute_metrics(all_preds, all_refs, plan.labels)
    metrics["eval_loss"] = total_loss / max(total_rows, 1)
    metrics["eval_rows"] = total_rows
    engine.train()
    return metrics


def _restore_point(run_dir: str, resume_from: str | None, rank: int) -> Any:
    """The checkpoint to continue from, or None for a fresh start. The run's newest
    complete checkpoint in storage comes first: after a worker failure that may be newer
    than the one Ray Train registered (every rank had written it, the controller had not
    yet heard), and a run the driver reran under the same name continues too. A newer
    incomplete one (cut short while being written) is passed over with a warning; if
    none is complete the run fails rather than start again at step 0. With none at all,
    the one the driver chose (`--resume`, PBT, a resumed search), if any."""
    import ray.train

    found = ckpt.resume_candidate(run_dir)
    if found is None:
        return ray.train.Checkpoint(resume_from) if resume_from else None
    path, _, skipped = found
    if rank == 0:
        for problem in skipped:
            say(f"WARNING: skipping an incomplete checkpoint: {problem}; using {path}")
    return ray.train.Checkpoint(path)


class _Progress:
    """Rank 0's console line: step, loss, lr, samples/s, ETA from the pace of training so
    far (model loading and evaluation excluded)."""

    def __init__(self, total_steps: int, start_step: int):
        self.total = total_steps
        self.start_step = start_step
        self.started = time.time()

    def line(
        self,
        phase: str,
        epoch: float,
        step: int,
        loss: float,
        lr: float,
        samples: int,
        train_seconds: float,
    ) -> str:
        per_step = train_seconds / max(step - self.start_step, 1)
        eta = per_step * max(self.total - step, 0)
        pct = 100.0 * step / max(self.total, 1)
        return (
            f"{phase} epoch {epoch:.2f} step {step}/{self.total} ({pct:.0f}%) "
            f"loss {loss:.4f} lr {lr:.2e} | {samples / max(train_seconds, 1e-9):.1f} samples/s "
            f"| elapsed {_hms(time.time() - self.started)} ETA {_hms(eta)}"
        )


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# Ray Train's controller polls each worker this often (seconds; Ray's default when unset)
# and collects at most one report per poll: a report waits until the previous one is taken.
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def report_wait_advice(report_seconds: float, train_seconds: float, cfg: RayftConfig) -> str:
    """What to change when handing reports to Ray Train took a large share of the run (over
    5 s and 10% of the training time), or '' when it did not."""
    if report_seconds <= max(5.0, 0.1 * train_seconds):
        return ""
    interval = os.environ.get(POLL_ENV, "2")
    shorter = "" if float(interval) <= 0.5 else f", or export {POLL_ENV}=0.5 before Ray starts"
    return (
        f"handing evaluations and checkpoints to Ray Train took {report_seconds:.1f} s against "
        f"{train_seconds:.1f} s of training: each report copies its checkpoint to storage_path "
        f"and waits for Ray Train's controller to collect the previous one, once per poll "
        f"(every {interval} s, {POLL_ENV}). Report less often (train.eval_every_steps "
        f"{cfg.train.eval_every_steps}, checkpoint.every_steps {cfg.checkpoint.every_steps})"
        f"{shorter}"
    )


def train_fn_per_worker(config: dict[str, Any]) -> None:
    fn_started = time.perf_counter()
    timings = Timings()
    import ray.train
    import ray.train.torch

    # Only small, serialisable config crosses into workers; re-validate it here.
    cfg = RayftConfig.model_validate(config["cfg"])
    plan = Plan(**config["plan"])
    task = get_task(cfg.task)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = cfg.train
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    test_shard = ray.train.get_dataset_shard("test") if "test" in plan.pad_rows else None
    phases = methods.phases(cfg)

    # Where to start: a fresh run, or the latest complete checkpoint after a restart.
    state: dict[str, Any] = {"phase": 0, "epoch": 0, "micro": 0, "step": 0, "history": []}
    resume_dir = None
    run_dir = config["run_dir"]
    restored = _restore_point(run_dir, config.get("resume_from"), rank)
    if restored is not None:
        resume_dir = restored.to_directory()
        state = ckpt.read_state(resume_dir)
        if problem := ckpt.resume_problem(restored.path, state, cfg, world):
            raise RuntimeError(problem)
        if rank == 0:
            say(
                f"resuming from checkpoint at step {state['step']} "
                f"(phase {phases[state['phase']].name}, epoch {state['epoch']}): {restored.path}"
            )
    # The first epoch this run trains starts streaming now, behind the set-up below.
    early = None
    first_epoch = resume_position(state, plan)[0] if resume_dir is not None else 0
    if first_epoch < phases[state["phase"]].epochs and not (
        t.max_steps and state["step"] >= t.max_steps
    ):
        seed = epoch_seed(t.seed, first_epoch, state["phase"], rank)
        early = EarlyEpoch(
            functools.partial(epoch_batches, train_shard, cfg, seed), (state["phase"], first_epoch)
        )

    import deepspeed
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Ray Train has set up torch.distributed; DeepSpeed's comm layer adopts that group
    # (ZeRO-3's partitioned model construction needs it before any engine exists).
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    tokenizer = load_tokenizer(cfg)
    pad_id = tokenizer.pad_token_id
    fault = resilience.Fault.parse(config["fault"]) if config.get("fault") else None
    ledger = resilience.Ledger(run_dir, rank, state["step"]) if cfg.checkpoint.ledger else None
    history: list[dict[str, Any]] = state["history"]
    device = ray.train.torch.get_device()
    # Forgetting: general text scored before training and at every evaluation.
    forgetting = forgetting_mod.build(cfg, tokenizer, config.get("general_text"))
    forgetting_note = None
    if isinstance(forgetting, str):
        forgetting_note, forgetting = forgetting, None
    probe_file = os.path.join(resume_dir or "", forgetting_mod.PROBE_FILE)
    if (
        forgetting is not None
        and resume_dir is not None
        and (
            state.get("forgetting_before") is None
            or (forgetting.head_source == "probe" and not os.path.isfile(probe_file))
        )
    ):
        forgetting_note = "resumed from a checkpoint that holds no forgetting baseline"
        forgetting = None
    if forgetting_note and rank == 0:
        say(f"forgetting is not measured: {forgetting_note}")
    if forgetting is not None and forgetting.head is not None:
        forgetting.head.to(device)
        if resume_dir is not None and forgetting.head_source == "probe":
            forgetting.load_probe(torch.load(probe_file, weights_only=True), device)

    def forgetting_metrics(module: torch.nn.Module) -> dict[str, float]:
        if forgetting is None:
            return {}
        loss = forgetting.loss(module, device)
        return {
            "general_loss": loss,
            "forgetting_ratio": forgetting.ratio(state["forgetting_before"], loss),
        }

    step = state["step"]
    progress = _Progress(plan.total_steps, step)
    samples = 0
    train_seconds = 0.0
    data_seconds = 0.0  # of train_seconds, spent waiting for the next batch
    tokens = 0  # non-pad input tokens trained on, all ranks (counted on the host: no sync)
    loss_run = _LossMeter(device)  # since the last report
    loss_all = _LossMeter(device)  # over the whole run
    last_eval: dict[str, float] = {}
    advised = False  # whether rank 0 has said that reports wait for Ray Train (once)
    carry: dict[str, torch.Tensor] | None = None
    engine = None
    heads: list[str] = []
    phase = phases[state["phase"]]
    stop = False
    micro_done = 0
    overall_epoch = 0.0

    def save_state(epoch: int, micro: int, metrics: dict[str, Any]) -> str:
        """Every rank's ZeRO shard, RNG states and running totals and, from rank 0, what
        a resume or `rayft export` needs besides: position, history, the config, labels
        and new-head names."""
        snapshot = {
            "phase": phases.index(phase),
            "epoch": epoch,
            "micro": micro,
            "step": step,
            "world_size": world,
            "zero_stage": engine.zero_optimization_stage(),
            "history": history,
            "metrics": metrics,
            "forgetting_before": state.get("forgetting_before"),
            "pretrained_eval": state.get("pretrained_eval"),
            "config": cfg.model_dump(mode="json"),
            "labels": plan.labels,
            "heads": heads,
        }
        worker = {
            "node_id": ray.get_runtime_context().get_node_id(),  # where this shard came from
            "rng": resilience.rng_state(),
            "loss_total": float(loss_all.total),
            "loss_count": loss_all.count,
            "samples": samples,
            "train_seconds": train_seconds,
            "data_seconds": data_seconds,
            "tokens": tokens,
        }
        directory = ckpt.save_training_state(engine, snapshot, rank, worker)
        if rank == 0 and forgetting is not None and forgetting.head_source == "probe":
            torch.save(forgetting.probe_state(), os.path.join(directory, forgetting_mod.PROBE_FILE))
        return directory

    # `checkpoint.upload: async`: every report but the final one goes to Ray's upload
    # thread (in order), so no step waits for a copy or for the controller's poll; what
    # the controller has not collected by the end, the final report waits for.
    # In-process (`scaling.in_process`) there is no controller: rayft stores the
    # checkpoints itself (a rename into storage_path), and nothing waits for a poll.
    keeper = config.get(inprocess.CONFIG_KEY)
    handoff: dict[str, Any] = {}
    if cfg.checkpoint.upload == "async" and keeper is None:
        handoff = {
            "checkpoint_upload_mode": ray.train.CheckpointUploadMode.ASYNC,
            "delete_local_checkpoint_after_upload": True,
        }

    def report(epoch_progress: float, do_eval: bool, do_ckpt: bool) -> None:
        nonlocal last_eval, advised
        if do_eval:
            with timings.section("eval"):
                last_eval = evaluate(engine, eval_shard, task, cfg, plan, pad_id)
                last_eval.update(forgetting_metrics(engine.module))
        epochs_before = sum(p.epochs for p in phases[: phases.index(phase)])
        metrics = {
            "step": step,
            "epoch": round(epochs_before + epoch_progress, 4),
            "phase": phase.name,
            "train_loss": loss_run.global_mean(),
            "lr": engine.get_lr()[0],
            "samples_per_second": samples / max(train_seconds, 1e-9),
            "tokens_per_second": tokens / max(train_seconds, 1e-9),
            "train_samples": samples,
            "train_tokens": tokens,
            "train_seconds": train_seconds,
            **last_eval,
        }
        add_within_forgetting(metrics, cfg)
        loss_run.reset()
        history.append(metrics)
        if ledger is not None:
            ledger.flush()
        checkpoint = None
        directory = None
        if rank == 0 and do_eval:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if isinstance(v, float))
            say(f"eval at step {step}: {shown}")
        if do_ckpt:
            with timings.section("checkpoint"):
                directory = save_state(math.floor(epoch_progress + 1e-9), micro_done, metrics)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
        # Ray copies the checkpoint to storage_path and then waits until its controller
        # has collected the previous report (one per poll): here, or in Ray's upload
        # thread with `checkpoint.upload: async`, which also removes the local copy.
        with timings.section("report"):
            if keeper is not None:
                checkpoint, directory = keeper.report(metrics, directory), None
            ray.train.report(metrics, checkpoint=checkpoint, **handoff)
        if rank == 0 and not advised:  # said once, as soon as the waits add up
            advice = report_wait_advice(timings.seconds["report"], train_seconds, cfg)
            if advice:
                say(advice)
                advised = True
        if directory and not handoff:
            shutil.rmtree(directory, ignore_errors=True)

    def before_training(engine: Any, phase: methods.Phase) -> None:
        """The untrained model's figures: the forgetting baseline (training the probe
        first when there is one) and, as a baseline, its eval metrics (step 0)."""
        if forgetting is not None:
            if forgetting.head_source == "probe":
                before = forgetting.train_probe(engine.module, device, cfg.eval.probe_steps)
            else:
                before = forgetting.loss(engine.module, device)
            state["forgetting_before"] = before
            if rank == 0:
                say(
                    f"forgetting: general-text {forgetting.measure} before training "
                    f"{forgetting.value(before):.4f} ({forgetting.tokens:,} tokens, "
                    f"{forgetting.head_source} head)"
                )
        if "pretrained" in baselines(cfg):
            scores = evaluate(engine, eval_shard, task, cfg, plan, pad_id)
            state["pretrained_eval"] = scores
            entry = {"step": 0, "epoch": 0.0, "phase": phase.name, **scores}
            if forgetting is not None:
                entry.update(general_loss=state["forgetting_before"], forgetting_ratio=1.0)
            history.append(entry)
            if rank == 0:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float))
                say(f"before training (pretrained baseline): {shown}")

    timings.add("setup", time.perf_counter() - fn_started)
    for phase_index, phase in enumerate(phases):  # noqa: B007 (report() reads `phase`)
        if phase_index < state["phase"] or stop:
            continue
        setup_started = time.perf_counter()
        # Identical initial weights on every rank (new heads are random), then per-rank
        # randomness for dropout.
        seed_everything(t.seed)
        zero3 = zero3_init_context(cfg, world)
        model, heads = build_model(task, cfg, plan.labels)
        if carry is not None:
            ckpt.load_params(model, carry)
        model = methods.apply(model, heads, cfg, phase, task.peft_task_type)
        trainable, total = methods.trainable_summary(model)
        phase_steps = phase.epochs * plan.steps_per_epoch
        if t.max_steps:  # the schedule spans the capped run, as in HF's Trainer
            before = sum(p.epochs for p in phases[:phase_index]) * plan.steps_per_epoch
            phase_steps = max(1, min(phase_steps, t.max_steps - before))
        engine = initialize(model, cfg, phase.lr, phase_steps, world)
        if task.check_model is not None:
            task.check_model(engine, cfg)
        start_epoch, skip_micro = 0, 0
        if resume_dir is not None and phase_index == state["phase"]:
            ckpt.restore_training_state(engine, resume_dir)
            if ckpt.set_base_lr(engine, phase.lr) and rank == 0:
                say(f"learning rate set to {phase.lr:g} for the rest of the run")
            start_epoch, skip_micro = resume_position(state, plan)
        timings.add("setup", time.perf_counter() - setup_started)
        if resume_dir is None and phase_index == 0:
            with timings.section("eval"):
                before_training(engine, phase)
        if rank == 0:
            say(
                f"phase '{phase.name}': {trainable:,} of {total:,} parameters train "
                f"({100.0 * trainable / max(total, 1):.2f}%), lr {phase.lr:g}, "
                f"{phase.epochs} epoch(s) x {plan.steps_per_epoch} steps, ZeRO stage "
                f"{engine.zero_optimization_stage()}, {world} worker(s)"
            )
        seed_everything(t.seed + 1000 * (rank + 1) + phase_index)
        if resume_dir is not None and phase_index == state["phase"]:
            # Continue this rank's random draws (dropout) and totals where they stopped.
            worker_file = os.path.join(resume_dir, ckpt.DS_DIR, ckpt.WORKER_FILE.format(rank=rank))
            saved = torch.load(worker_file, weights_only=True)
            resilience.set_rng_state(saved["rng"])
            loss_all.total.fill_(saved["loss_total"])
            loss_all.count = saved["loss_count"]
            samples, train_seconds = saved["samples"], saved["train_seconds"]
            data_seconds = saved["data_seconds"]
            tokens = saved.get("tokens", 0)
        engine.train()
        multiple = pad_multiple(engine.device)
        for epoch in range(start_epoch, phase.epochs):
            micro_done = 0
            seed = epoch_seed(t.seed, epoch, phase_index, rank)
            if early is not None and early.key == (phase_index, epoch):
                batches, early = early.batches(), None
            else:
                batches = epoch_batches(train_shard, cfg, seed)
            batches = length_grouped(batches, t.group_by_length, np.random.default_rng(seed))
            tick = time.perf_counter()
            waited = time.perf_counter()
            for batch in batches:
                if micro_done >= plan.micro_per_epoch:
                    break  # never more than the agreed count: ranks stay in step
                if micro_done < skip_micro:  # resuming: neither training nor waiting
                    micro_done += 1
                    tick = waited = time.perf_counter()
                    continue
                data_seconds += time.perf_counter() - waited
                if ledger is not None:  # the step this micro-batch's gradient goes into
                    ledger.add(step + 1, phase_index, epoch, batch)
                for name in PROVENANCE:
                    batch.pop(name)
                rows = len(batch["input_ids"])
                # Close the accumulation at the epoch's last micro-batch too, so epochs
                # end on an optimizer step (that step's gradient is scaled by 1/grad_accum).
                boundary = (micro_done + 1) % t.grad_accum == 0 or (
                    micro_done + 1 == plan.micro_per_epoch
                )
                engine.set_gradient_accumulation_boundary(boundary)
                inputs = _to_device(task.collate(batch, pad_id, multiple), engine.device)
                outputs = engine(**model_inputs(inputs))
                engine.backward(outputs.loss)
                engine.step()
                loss_run.add(outputs.loss)
                loss_all.add(outputs.loss)
                micro_done += 1
                samples += rows * world
                tokens += sum(len(x) for x in batch["input_ids"]) * world
                waited = time.perf_counter()
                if not boundary:
                    continue
                step += 1
                if fault is not None:  # RAYFT_FAULT: tests of the recovery paths
                    fault.fire(
                        run_dir, rank, step, config["driver_pid"], before=ledger and ledger.flush
                    )
                now = time.perf_counter()
                train_seconds += now - tick
                tick = now
                epoch_progress = epoch + micro_done / plan.micro_per_epoch
                overall_epoch = epoch_progress + sum(p.epochs for p in phases[:phase_index])
                if rank == 0 and step % t.log_every_steps == 0:
                    say(
                        progress.line(
                            phase.name,
                            overall_epoch,
                            step,
                            loss_run.local_mean(),
                            engine.get_lr()[0],
                            samples,
                            train_seconds,
                        )
                    )
                stop = bool(t.max_steps and step >= t.max_steps)
                end_of_epoch = micro_done == plan.micro_per_epoch
                do_eval = bool(t.eval_every_steps and step % t.eval_every_steps == 0)
                do_ckpt = bool(
                    cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
                )
                do_eval = do_eval or do_ckpt  # every checkpoint carries the metrics ranking it
                if (do_eval or do_ckpt) and not (end_of_epoch or stop):
                    report(epoch_progress, do_eval, do_ckpt)
                    tick = waited = time.perf_counter()
                if stop:
                    break
            if micro_done < plan.micro_per_epoch and not stop:
                raise RuntimeError(
                    f"worker {rank} ran out of training data after {micro_done} of "
                    f"{plan.micro_per_epoch} micro-batches in epoch {epoch}: the shards are "
                    "uneven, which would desynchronize DeepSpeed's collectives"
                )
            skip_micro = 0
            last_phase_epoch = epoch == phase.epochs - 1 and phase_index == len(phases) - 1
            if not (last_phase_epoch or stop):  # the final report below covers the last one
                report(epoch + 1.0, do_eval=True, do_ckpt=True)
            if stop:
                break
        if phase_index < len(phases) - 1 and not stop:
            with timings.section("setup"):  # the next phase's starting weights
                carry = ckpt.gather_params(engine.module)
                engine.destroy()
        del zero3

    # Final evaluation and export of the trained weights (gathered across ZeRO shards).
    unset_hf_deepspeed_config()
    predictions: list[dict[str, Any]] = []
    generations = []
    with timings.section("eval"):
        last_eval = evaluate(engine, eval_shard, task, cfg, plan, pad_id, predictions)
        last_eval.update(forgetting_metrics(engine.module))
        if test_shard is not None:  # data.test: scored once, by the final model
            scores = evaluate(engine, test_shard, task, cfg, plan, pad_id)
            last_eval.update(
                {"test_loss" if k == "eval_loss" else "test_rows" if k == "eval_rows" else
                 f"test_{k}": v for k, v in scores.items()}
            )  # fmt: skip
        if task.generate is not None and config.get("prompts"):
            generations = task.generate(engine, config["prompts"], load_tokenizer(cfg), cfg)
    with timings.section("export"):
        full_state = ckpt.full_state_dict(engine, rank)
    metrics = {
        "step": step,
        "epoch": round(overall_epoch, 4),
        "phase": phase.name,
        "train_loss": loss_all.global_mean(),
        "train_samples_per_second": samples / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "train_samples": samples,
        "train_tokens": tokens,
        "train_tokens_per_second": tokens / max(train_seconds, 1e-9),
        "data_wait_fraction": data_seconds / max(train_seconds, 1e-9),
        "lr": engine.get_lr()[0],
        "done": True,
        **last_eval,
    }
    add_within_forgetting(metrics, cfg)
    # for metrics.json, not the history; the stage is what ran (`deepspeed.stage: auto`)
    final_extra: dict[str, Any] = {"zero_stage": engine.zero_optimization_stage()}
    if forgetting is not None:
        final_extra["forgetting"] = {
            "measure": forgetting.measure,
            "head": forgetting.head_source,
            "before": forgetting.value(state["forgetting_before"]),
            "after": forgetting.value(metrics["general_loss"]),
            "ratio": metrics["forgetting_ratio"],
            "tokens": forgetting.tokens,
            "text": forgetting.text,
            **({"head_note": forgetting.note} if forgetting.note else {}),
        }
    elif forgetting_note:
        final_extra["forgetting"] = {"not_measured": forgetting_note}
    if state.get("pretrained_eval") is not None:
        final_extra["pretrained_eval"] = state["pretrained_eval"]
    if cfg.eval.slice_column and rank == 0:
        final_extra["slices"] = slice_metrics(
            [r["prediction"] for r in predictions],
            [r["reference"] for r in predictions],
            [r["slice"] for r in predictions],
            task,
            plan.labels,
            cfg,
            [(r["source"], r["line"]) for r in predictions],
        )
    history.append({k: v for k, v in metrics.items() if k != "done"})
    if ledger is not None:
        ledger.flush()
    # The final checkpoint is a training state too (resumable, `rayft export`), with the
    # exported model beside it; a resume from it finds every epoch done.
    with timings.section("checkpoint"):
        export_dir = save_state(phase.epochs, 0, {k: v for k, v in metrics.items() if k != "done"})
    if rank == 0:
        with timings.section("export"):
            ckpt.export_model(full_state, cfg, plan.labels, heads, export_dir)
            with open(os.path.join(export_dir, HISTORY_FILE), "w") as handle:
                for entry in history:
                    handle.write(json.dumps(entry) + "\n")
            with open(os.path.join(export_dir, PREDICTIONS_FILE), "w") as handle:
                if task.per_example is not None:  # windows of one question -> its answer
                    predictions = task.per_example(predictions)
                for row in sorted(predictions, key=lambda r: (r["source"], r["line"])):
                    handle.write(json.dumps(task.describe(row, plan.labels)) + "\n")
            if generations:
                with open(os.path.join(export_dir, GENERATIONS_FILE), "w") as handle:
                    for entry in generations:
                        handle.write(json.dumps(entry) + "\n")
            with open(os.path.join(export_dir, "plan.json"), "w") as handle:
                json.dump(asdict(plan), handle, indent=2)
    del full_state
    dist.barrier()
    timings.add("train", train_seconds)
    # The worker's own wall time, so the driver can tell what Ray Train's start, stop and
    # checkpoint persistence cost (`launch`).
    timings.add("worker", time.perf_counter() - fn_started)
    final_extra["timings"] = timings.as_dict()
    metrics.update(final_extra)
    # Ray copies the final state to storage_path, after every report still in its
    # upload thread (`checkpoint.upload: async`) has been sent.
    persist_started = time.perf_counter()
    if keeper is not None:
        final = keeper.report(metrics, export_dir)
    else:
        final = ray.train.Checkpoint.from_directory(export_dir)
    ray.train.report(metrics, checkpoint=final)
    persisted = time.perf_counter()
    shutil.rmtree(export_dir, ignore_errors=True)
    engine.destroy()
    if rank == 0:
        say(
            f"final checkpoint copied to storage in {persisted - persist_started:.1f} s, "
            f"worker clean-up {time.perf_counter() - persisted:.1f} s"
        )
        if handoff and not advised:  # async: the waits add up here, behind the final report
            advice = report_wait_advice(persisted - persist_started, train_seconds, cfg)
            if advice:
                say(advice)
