"""Checkpoints without Ray: a DeepSpeed round trip in this process (world size 1, gloo),
completeness checks on damaged checkpoints, and safe loading of untrusted weights."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rayft import checkpoint as ckpt
from rayft import methods, resilience
from rayft.config import validate_config
from rayft.engine import initialize, zero3_init_context
from rayft.modeling import build_model
from rayft.tasks import get_task


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, as DeepSpeed needs one even for a single rank."""
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1")
    os.environ.update(LOCAL_RANK="0", LOCAL_SIZE="1")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    yield
    if created:
        dist.destroy_process_group()


def build_engine(model_dir: str, stage: int):
    cfg = validate_config(
        {
            "model": {"name_or_path": model_dir},
            "data": {"train": "unused.jsonl", "eval": "unused.jsonl"},
            "deepspeed": {"stage": stage},
            "scaling": {"num_workers": 1},
            "train": {"batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.2},
        }
    )
    task = get_task(cfg.task)
    torch.manual_seed(0)
    zero3 = zero3_init_context(cfg, 1)
    model, heads = build_model(task, cfg, ["neg", "pos"])
    phase = methods.phases(cfg)[0]
    model = methods.apply(model, heads, cfg, phase, task.peft_task_type)
    engine = initialize(model, cfg, phase.lr, total_steps=10, world_size=1)
    return engine, zero3


def batch(seed: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(5, vocab, (4, 12), generator=g),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
        "labels": torch.randint(0, 2, (4,), generator=g),
    }


def train_step(engine, seed: int) -> float:
    outputs = engine(**batch(seed, engine.module.config.vocab_size))
    engine.backward(outputs.loss)
    engine.step()
    return float(outputs.loss.detach())


def tensors_of(value, prefix="") -> dict[str, torch.Tensor | object]:
    """Every leaf of a nested state dict, by path (tensors and plain values)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(tensors_of(item, f"{prefix}/{key}"))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for index, item in enumerate(value):
            out.update(tensors_of(item, f"{prefix}/{index}"))
        return out
    return {prefix: value}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif hasattr(a[key], "__dict__"):  # e.g. DeepSpeed's loss scaler
            assert vars(a[key]) == vars(b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_round_trip_restores_parameters_optimizer_scheduler_and_counters(
    tmp_path, process_group, tiny_model, stage
):
    """After a reload, parameters, optimizer state, scheduler state, step counters and the
    random state are equal, and the next step is the same step."""
    engine, zero3 = build_engine(tiny_model, stage)
    for seed in range(3):
        train_step(engine, seed)
    torch.manual_seed(123)  # the state the workers' RNG file must carry
    worker = {"rng": resilience.rng_state()}
    saved = ckpt.save_training_state(engine, {"step": 3, "world_size": 1}, 0, worker)
    expected_draw = torch.rand(3)

    fresh, zero3b = build_engine(tiny_model, stage)
    assert fresh.global_steps == 0
    ckpt.restore_training_state(fresh, saved)
    resilience.set_rng_state(torch.load(Path(saved, ckpt.DS_DIR, "worker.rank0.pt"),
                                        weights_only=True)["rng"])  # fmt: skip
    assert torch.equal(torch.rand(3), expected_draw)

    params = ckpt.gather_params(engine.module, only_trainable=False)
    assert_same(params, ckpt.gather_params(fresh.module, only_trainable=False))
    assert_same(tensors_of(engine.optimizer.state_dict()), tensors_of(fresh.optimizer.state_dict()))
    assert engine.lr_scheduler.state_dict().keys() == fresh.lr_scheduler.state_dict().keys()
    for key in ("last_epoch", "_step_count", "base_lrs", "_last_lr"):
        assert engine.lr_scheduler.state_dict()[key] == fresh.lr_scheduler.state_dict()[key]
    assert (engine.global_steps, engine.global_samples) == (fresh.global_steps,
                                                            fresh.global_samples) == (3, 12)  # fmt: skip
    assert engine.get_lr() == fresh.get_lr()
    # The proof: both take the same next step.
    assert train_step(engine, 7) == train_step(fresh, 7)
    assert_same(
        ckpt.gather_params(engine.module, only_trainable=False),
        ckpt.gather_params(fresh.module, only_trainable=False),
    )
    check_is_complete_until_damaged(saved, tmp_path)
    del zero3, zero3b


def check_is_complete_until_damaged(saved: str, tmp_path: Path) -> None:
    """The completeness check passes on the saved checkpoint and names what is wrong with
    each damaged copy; the newest complete one is chosen over damaged newer ones."""
    assert ckpt.check_complete(saved)["step"] == 3
    shard = max(Path(saved, ckpt.DS_DIR, ckpt.TAG).iterdir(), key=lambda p: p.stat().st_size)
    damage = {
        "truncated": lambda d: os.truncate(d / shard.relative_to(saved), 10),
        "no_marker": lambda d: (d / ckpt.DS_DIR / "complete.rank0").unlink(),
        "no_state": lambda d: (d / ckpt.STATE_FILE).unlink(),
        "missing_rank": lambda d: (d / ckpt.STATE_FILE).write_text(
            json.dumps({"step": 3, "world_size": 2})
        ),
    }
    messages = {
        "truncated": f"{shard.name} of rank 0 is 10 bytes, expected",
        "no_marker": "rank 0 of 1 never finished writing its shard",
        "no_state": "no rayft_state.json",
        "missing_rank": "rank 1 of 2 never finished writing its shard",
    }
    copies = []
    for index, (name, hurt) in enumerate(damage.items()):
        copy = tmp_path / f"checkpoint_{index + 1}_{name}"
        shutil.copytree(saved, copy)
        hurt(copy)
        with pytest.raises(ckpt.IncompleteCheckpoint, match=messages[name]):
            ckpt.check_complete(str(copy))
        copies.append(str(copy))
    good = tmp_path / "checkpoint_0_good"
    shutil.copytree(saved, good)
    assert ckpt.checkpoints_of_run(str(tmp_path)) == [str(good), *copies]
    path, state, skipped = ckpt.newest_complete(ckpt.checkpoints_of_run(str(tmp_path)))
    assert path == str(good) and len(skipped) == 4
    with pytest.raises(ckpt.IncompleteCheckpoint, match="refusing to start again at step 0"):
        ckpt.newest_complete(copies)


def test_a_checkpoint_resumes_only_at_its_world_size_and_zero_stage():
    minimal = {"model": {"name_or_path": "m"}, "data": {"train": "a.jsonl", "eval": "b.jsonl"}}
    one = validate_config({**minimal, "scaling": {"num_workers": 1}})  # auto: stage 0
    assert ckpt.resume_problem("ck", {"world_size": 1, "zero_stage": 0}, one, 1) is None
    problem = ckpt.resume_problem("ck", {"world_size": 2, "zero_stage": 2}, one, 1)
    assert "written by 2 workers and this run has 1" in problem
    assert "scaling.num_workers=2" in problem and "rayft export --checkpoint ck" in problem
    # Written before `auto` existed: a one-worker run at the old default, stage 2.
    older = {"world_size": 1, "config": {"deepspeed": {"stage": 2}}}
    problem = ckpt.resume_problem("ck", older, one, 1)
    assert "written at ZeRO stage 2 and this run's deepspeed.stage (auto) is stage 0" in problem
    assert "Set deepspeed.stage=2" in problem
    two = validate_config({**minimal, "scaling": {"num_workers": 1}, "deepspeed": {"stage": 2}})
    assert ckpt.resume_problem("ck", older, two, 1) is None
    assert ckpt.resume_problem("ck", {"world_size": 1}, one, 1) is None  # stage unknown


def test_fault_spec_is_checked():
    assert resilience.Fault.parse("kill:rank=1:step=5") == resilience.Fault(1, 5, 1)
    assert resilience.Fault.parse("kill:rank=driver:step=2:times=3").rank is None
    for bad in ("kill:rank=1", "stop:rank=1:step=2", "kill:rank=x:step=2", "kill:step=2"):
        with pytest.raises(ValueError, match="kill:rank=<r|driver>:step=<s>"):
            resilience.Fault.parse(bad)


class _Payload:
    """A pickle that runs code when loaded (writes a file), as a hostile .bin would."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def test_pickled_weights_are_not_executed(tmp_path, tiny_model):
    """A model directory whose pytorch_model.bin carries a pickle payload: loading it
    through rayft refuses (weights_only), and the payload never runs."""
    hostile = tmp_path / "hostile"
    shutil.copytree(tiny_model, hostile)
    (hostile / "model.safetensors").unlink()
    target = tmp_path / "pwned.txt"
    with open(hostile / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weight": _Payload(str(target))}, handle)
    cfg = validate_config(
        {"model": {"name_or_path": str(hostile)}, "data": {"train": "a.jsonl", "eval": "b.jsonl"}}
    )
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|safe"):
        build_model(get_task(cfg.task), cfg, ["neg", "pos"])
    assert not target.exists()


def test_cpu_adamw_is_the_fused_one_and_steps_like_the_loop(process_group, tiny_model):
    """On CPU rayft asks torch for its fused AdamW, which torch picks by itself nowhere;
    three steps match its per-tensor loop's (its CPU default) to float rounding: within
    1e-5, a thousandth of one step's update at this lr (1e-2); the two order the
    arithmetic differently."""
    weights, initial = [], None
    for fused in (True, False):
        engine, _ = build_engine(tiny_model, stage=0)
        assert all(group["fused"] is True for group in engine.optimizer.param_groups)
        for group in engine.optimizer.param_groups:
            group["fused"], group["foreach"] = fused, False
        if initial is None:
            initial = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        for seed in range(3):
            train_step(engine, seed)
        weights.append({k: v.detach().clone() for k, v in engine.module.state_dict().items()})
        engine.destroy()
    assert weights[0].keys() == weights[1].keys()
    assert any(not torch.equal(weights[0][k], initial[k]) for k in initial)  # it trained
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], rtol=1e-5, atol=1e-5)


def test_single_rank_stage0_skips_the_all_reduce_and_trains_the_same(process_group, tiny_model):
    """World size 1, ZeRO stage 0: rayft turns DeepSpeed's gradient all-reduce off (the
    gradients are already global). Three steps with it off and forced back on must give
    identical weights."""
    weights = []
    for allreduce in (False, True):
        engine, _ = build_engine(tiny_model, stage=0)
        assert engine.enable_backward_allreduce is False
        engine.enable_backward_allreduce = allreduce
        for seed in range(3):
            train_step(engine, seed)
        weights.append({k: v.detach().clone() for k, v in engine.module.state_dict().items()})
        engine.destroy()
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    engine, _ = build_engine(tiny_model, stage=2)  # ZeRO reduces through its optimizer
    assert engine.enable_backward_allreduce is True
    engine.destroy()


@pytest.mark.parametrize("prefix", ["", "file://"])
def test_in_process_keeper_stores_ranks_and_prunes_as_ray_train_does(tmp_path, prefix):
    """`scaling.in_process` checkpoints: each moved (not copied) into the run's directory
    under a name that sorts by time, the best `keep` by the metric kept and the newest
    always, a report without a checkpoint or a score passed to the callbacks all the same."""
    from rayft.inprocess import Keeper

    NAME = r"checkpoint_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d{6}"

    seen = []

    class Callback:
        def after_report(self, run_context, metrics, checkpoint):
            seen.append((metrics[0]["step"], checkpoint is not None))

    run_dir = tmp_path / "storage" / "run"
    keeper = Keeper(f"{prefix}{run_dir}", keep=2, metric="eval_loss", mode="min",
                    callbacks=[Callback()])  # fmt: skip
    losses = {1: 0.5, 2: 0.3, 3: float("nan"), 4: 0.4, 5: 0.9}
    for step, loss in losses.items():
        local = tmp_path / f"local-{step}"
        local.mkdir()
        (local / "state.json").write_text(str(step))
        keeper.report({"step": step, "eval_loss": loss}, str(local))
        assert not local.exists()  # moved
        keeper.report({"step": step}, None)  # metrics only
    stored = sorted(p.name for p in run_dir.iterdir())
    # Ray Train's names (the save time), so that name order is save order (read below).
    assert len(stored) == 3 and all(re.fullmatch(NAME, n) for n in stored), stored
    # Best two by eval loss (steps 2 and 4; NaN ranks last) and the newest (5).
    assert [(run_dir / name / "state.json").read_text() for name in stored] == ["2", "4", "5"]
    assert [m["step"] for _, m in keeper.kept] == [2, 4, 5]
    assert seen == [(s, c) for s in losses for c in (True, False)]
    result = keeper.result(type("Local", (), {"metrics": {}, "checkpoint": None,
                                              "return_value": None})())  # fmt: skip
    assert result.checkpoint.path.endswith(stored[-1]) and len(result.best_checkpoints) == 3
