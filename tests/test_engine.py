"""Pure pieces of the training path: schedules, DeepSpeed config, baselines, batching."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from rayft.config import validate_config
from rayft.engine import deepspeed_config, lr_lambda
from rayft.evaluate import majority_baseline
from rayft.loop import EarlyEpoch, Plan, length_grouped

BASE = {"model": {"name_or_path": "m"}, "data": {"train": "a.jsonl", "eval": "b.jsonl"}}


def cfg(**sections):
    return validate_config({**BASE, **sections})


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedule_warms_up_then_decays(schedule):
    factor = lr_lambda(cfg(train={"warmup_ratio": 0.1, "lr_schedule": schedule}), 100)
    values = [factor(s) for s in range(100)]
    assert values[0] == pytest.approx(1 / 11)  # (step + 1) / (warmup + 1), warmup = 10
    assert values[9] == pytest.approx(10 / 11) and values[10] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:10], values[1:11], strict=True))
    if schedule == "constant":
        assert values[-1] == 1.0
    else:
        assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
        mid = values[55]
        expected = 0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5))
        assert mid == pytest.approx(expected, abs=1e-9)
        assert values[-1] < 0.02


def test_deepspeed_config_follows_ours():
    ds = deepspeed_config(
        cfg(
            deepspeed={"stage": 3, "offload_optimizer": True, "offload_param": True},
            train={"batch_size": 4, "grad_accum": 3, "max_grad_norm": 0.5},
        ),
        world_size=2,
    )
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == 0.5
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert ds["optimizer"]["type"] == "AdamW"  # ZeRO-Offload steps with DeepSpeed's CPUAdam
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # CPU: fp32
    plain = deepspeed_config(cfg(deepspeed={"stage": 0}), world_size=1)
    assert "optimizer" not in plain and "offload_optimizer" not in plain["zero_optimization"]
    merged = deepspeed_config(
        cfg(deepspeed={"overrides": {"zero_optimization": {"reduce_bucket_size": 1000}}}), 2
    )
    assert merged["zero_optimization"] == {
        "stage": 2,
        "contiguous_gradients": True,
        "reduce_bucket_size": 1000,
    }
    # `deepspeed.stage: auto` (the default) on one worker: stage 0, nothing to partition.
    assert deepspeed_config(cfg(), world_size=1)["zero_optimization"]["stage"] == 0


def test_build_ops_leaves_in_the_cache_what_deepspeed_then_loads(capsys, tmp_path):
    """`rayft build-ops` compiles (or finds cached) the very libraries a CPU run's
    DeepSpeed loads: the shared-memory collectives and CPUAdam. Without a compiler it
    exits 1 naming what to install."""
    from deepspeed.comm.torch import build_shm_op
    from deepspeed.ops.op_builder import CPUAdamBuilder

    from rayft.cli import main

    assert main(["build-ops"]) == 0
    out = capsys.readouterr().out
    paths = dict(re.findall(r"^(\S+): ready in [\d.]+ s, (\S+) \(", out, re.MULTILINE))
    assert set(paths) == {"deepspeed_shm_comm", "cpu_adam"}, out
    assert build_shm_op().__file__ == paths["deepspeed_shm_comm"]
    assert CPUAdamBuilder().load(verbose=False).__file__ == paths["cpu_adam"]

    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    failed = subprocess.run(
        [sys.executable, "-m", "rayft", "build-ops"], env=env, capture_output=True, text=True
    )
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "deepspeed_shm_comm op failed to compile" in failed.stderr
    assert "C++ compiler (g++, or the one CXX names)" in failed.stderr


def test_majority_baseline_matches_sklearn():
    labels = ["a", "b", "c"]
    train = {"a": 5, "b": 9, "c": 1}
    eval_counts = {"a": 4, "b": 3, "c": 2}
    refs = [0] * 4 + [1] * 3 + [2] * 2
    preds = [1] * len(refs)
    p, r, f, _ = precision_recall_fscore_support(
        refs, preds, labels=[0, 1, 2], average="macro", zero_division=0
    )
    got = majority_baseline(train, eval_counts, labels)
    assert got["label"] == "b"
    assert got["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f))


def test_plan_pads_to_the_worker_count_and_counts_steps():
    plan = Plan.derive(
        cfg(train={"batch_size": 8, "grad_accum": 2, "epochs": 3}),
        ["a", "b"],
        {"train": 257, "eval": 31},
        world=2,
    )
    assert plan.pad_rows == {"train": 1, "eval": 1}
    assert plan.train_rows == 258 and plan.eval_rows == 32
    assert plan.micro_per_epoch == 17  # ceil(129 / 8)
    assert plan.steps_per_epoch == 9  # ceil(17 / 2): the epoch's last group is shorter
    assert plan.total_steps == 27
    two_stage = Plan.derive(
        cfg(method="two_stage", two_stage={"head_epochs": 2}, train={"max_steps": 5}),
        ["a", "b"],
        {"train": 100, "eval": 10},
        world=1,
    )
    assert two_stage.total_steps == 5


def _batch(lengths, start):
    ids = np.empty(len(lengths), dtype=object)
    ids[:] = [np.arange(n) for n in lengths]
    return {"input_ids": ids, "labels": np.arange(start, start + len(lengths))}


def test_length_grouping_keeps_every_row_and_the_batch_count():
    rng = np.random.default_rng(0)
    batches = [_batch(rng.integers(1, 60, 8), 8 * i) for i in range(10)] + [_batch([3, 4], 80)]
    out = list(length_grouped(iter(batches), 4, np.random.default_rng(1)))
    assert len(out) == len(batches)
    assert sorted(np.concatenate([b["labels"] for b in out]).tolist()) == list(range(82))
    for b in out:  # rows keep their own label
        for ids, label in zip(b["input_ids"], b["labels"], strict=True):
            src = batches[label // 8]["input_ids"][label % 8] if label < 80 else None
            if src is not None:
                assert len(ids) == len(src)
    # Within a window, batches hold rows of similar length: far less padding.
    padded = sum(len(b["input_ids"]) * max(map(len, b["input_ids"])) for b in out[:8])
    original = sum(len(b["input_ids"]) * max(map(len, b["input_ids"])) for b in batches[:8])
    assert padded < 0.8 * original
    # Equal-length rows arrive from Ray as one 2-D array; they regroup too.
    square = {"input_ids": np.ones((8, 5), dtype=np.int32), "labels": np.arange(8)}
    assert len(list(length_grouped(iter([square, batches[0]]), 2, rng))) == 2


def test_the_first_epoch_is_fetched_before_it_is_read_and_keeps_its_order():
    import threading

    asked, fetched = threading.Event(), threading.Event()

    def start():
        def epoch():
            asked.set()  # runs at the first next(): in the background thread
            yield {"step": 0}
            fetched.set()  # the first batch has been handed over; the rest waits for next()
            yield from ({"step": i} for i in range(1, 5))

        return epoch()

    early = EarlyEpoch(start, key=(0, 0))
    assert asked.wait(timeout=30)  # asked for in the background, before anyone reads it
    time.sleep(0.2)
    assert not fetched.is_set()  # one batch ahead of the loop, no more
    assert early.key == (0, 0)
    assert [b["step"] for b in early.batches()] == [0, 1, 2, 3, 4]
    assert list(EarlyEpoch(lambda: iter([]), key=(0, 1)).batches()) == []

    def broken():
        raise ValueError("shard 3: no such file")

    with pytest.raises(ValueError, match="no such file"):  # raised where the batches are read
        list(EarlyEpoch(broken, key=(1, 0)).batches())


@pytest.mark.parametrize("device, width", [("cpu", 5), ("cuda", 8)])
def test_every_task_pads_to_the_longest_row_on_cpu_and_to_multiples_of_8_on_gpu(device, width):
    """On a CPU a batch is as wide as its longest row (rounding up only adds work there);
    on a GPU it rounds up to 8. Every padded tensor of a batch shares that width."""
    from rayft.tasks import causal_lm, classification, question_answering, token_classification
    from rayft.tasks.common import pad_multiple

    def ragged(*rows: list[int]) -> np.ndarray:
        out = np.empty(len(rows), dtype=object)
        out[:] = [np.array(r, dtype=np.int64) for r in rows]
        return out

    ids = ragged([101, 7, 8, 9, 102], [101, 7, 102])
    features = {
        classification: {"input_ids": ids, "token_type_ids": ragged([0] * 5, [0] * 3),
                         "labels": np.array([0, 1])},
        question_answering: {"input_ids": ids, "token_type_ids": ragged([0] * 5, [0] * 3),
                             "offset_start": ragged([0] * 5, [0] * 3),
                             "offset_end": ragged([1] * 5, [1] * 3),
                             "start_positions": np.array([1, 1]),
                             "end_positions": np.array([2, 1])},
        token_classification: {"input_ids": ids, "word_pos": ragged([0, 1, 2, 3, 0], [0, 1, 0]),
                               "labels": ragged([-100, 1, 2, 0, -100], [-100, 1, -100])},
        causal_lm: {"input_ids": ids, "labels": ragged([-100, 7, 8, 9, 102], [-100, 7, 102]),
                    "position_ids": ragged(list(range(5)), list(range(3)))},
    }  # fmt: skip
    multiple = pad_multiple(torch.device(device))
    for task, batch in features.items():
        out = task.collate(batch, 0, multiple)
        padded = {k: v.shape for k, v in out.items() if v.ndim == 2}
        assert padded and {shape[1] for shape in padded.values()} == {width}, (task, padded)
        assert int(out["attention_mask"].sum()) == 8, task  # 5 + 3 real tokens
