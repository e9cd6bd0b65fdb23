"""The GPU benchmark's own arithmetic, checked on CPU: the FLOPs-per-token conventions its
MFU figures rest on (against torch's FLOP counter on a real model), the steady-state rate
and the tables it prints."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks/gpu/bench_gpu.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)

SHAPE = dict(
    hidden_size=64, intermediate_size=176, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
)  # fmt: skip
SEQ, BATCH = 128, 2


def counted_flops_per_token(model: torch.nn.Module) -> float:
    """Forward and backward FLOPs of one batch as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(
        0, SHAPE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0)
    )
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops() / (BATCH * SEQ)


def llama() -> torch.nn.Module:
    """Eager attention: its two matmuls are what the counter can see (its CPU SDPA kernel
    is not counted); the GPU runs use SDPA, which does the same products."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(config)


def test_full_fine_tuning_flops_match_torch_counter() -> None:
    model = llama()
    params = sum(p.numel() for p in model.parameters())
    formula = bench.flops_per_token(SHAPE, SEQ, params, 0)["full"]
    counted = counted_flops_per_token(model)
    # 6N + 12·L·d·s is what the matmuls and attention do; the rest (norms, softmax,
    # activations) is not counted by either.
    assert formula == pytest.approx(counted, rel=0.02)


def test_lora_flops_convention_matches_torch_counter() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        llama(), LoraConfig(r=8, target_modules=bench.LORA_TARGETS, task_type="CAUSAL_LM")
    )
    params = sum(p.numel() for p in model.parameters())
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    formula = bench.flops_per_token(SHAPE, SEQ, params, adapter)
    counted = counted_flops_per_token(model)
    # 4N_frozen + 6N_adapter + 12·L·d·s: frozen weights get no weight gradient. The first
    # layer's input needs no gradient either (frozen embeddings), so the counter sees a
    # little less than the formula; the 6N convention would be far off.
    assert formula["lora_executed"] == pytest.approx(counted, rel=0.03)
    assert counted <= formula["lora_executed"]
    assert formula["full"] > 1.3 * counted


def test_steady_rate_skips_the_warm_up_interval() -> None:
    history = [
        {"step": 0, "eval_loss": 2.0},  # the pretrained baseline row: no totals
        {"step": 8, "train_tokens": 8_000, "train_seconds": 20.0},  # includes warm-up
        {"step": 16, "train_tokens": 16_000, "train_seconds": 24.0},
        {"step": 24, "train_tokens": 24_000, "train_seconds": 28.0},
    ]
    assert bench.steady_rate(history, "train_tokens") == pytest.approx(2_000.0)
    assert bench.steady_rate(history[:2], "train_tokens") is None


def test_tables_render_every_part_and_failed_points(tmp_path: Path) -> None:
    results = {
        "env": {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "cpus": 16, "python": "3.12",
                "torch": "2.9", "cuda": "12.8", "transformers": "5.0", "peft": "0.17",
                "deepspeed": "0.19.8", "ray": "2.60.0"},
        "peak": {"measured_tflops": 800.0, "datasheet_tflops": 989.4},
        "sweep": {"points": [
            {"method": "full", "zero_stage": 2, "activation_checkpointing": False,
             "micro_batch": 4, "tokens_per_second": 50_000.0, "model_tflops": 400.0,
             "peak_memory_gib": 60.0, "loss_first": 10.4, "loss_last": 3.2},
            {"method": "lora", "zero_stage": 3, "activation_checkpointing": True,
             "error": "OutOfMemoryError: CUDA out of memory"},
        ]},
        "peer": {"models": {"bert-base": [
            {"runner": "hf_trainer", "wall_seconds": 60.0, "train_seconds": 40.0,
             "samples_per_second": 1700.0, "accuracy": 0.8},
            {"runner": "hf_trainer_grouped", "wall_seconds": 50.0, "train_seconds": 30.0,
             "samples_per_second": 2000.0, "accuracy": 0.79},
            {"runner": "rayft (ZeRO-0)", "wall_seconds": 70.0, "train_seconds": 35.0,
             "samples_per_second": 1900.0, "accuracy": 0.81},
        ]}},
    }  # fmt: skip
    bench.add_peer_ratios(results["peer"]["models"]["bert-base"])
    for name, value in results.items():
        (tmp_path / f"gpu_{name}.json").write_text(json.dumps(value))
    text = bench.tables(str(tmp_path))
    assert "NVIDIA H200" in text and "800 TFLOP/s" in text
    # MFU of the full point: 400 / 989.4 and 400 / 800.
    assert "| full | ZeRO-2 | off | 4 | 50000 | 400 | 40.4% | 50.0% | 60 | 10.40 -> 3.20 |" in text
    assert "OutOfMemoryError" in text
    # rayft against each Trainer: 1900 / 1700 samples/s, 70 / 60 s; 1900 / 2000, 70 / 50.
    assert (
        "| bert-base | rayft (ZeRO-0) | 70 | 35 | 1900 | 0.81 | 1.12 | 1.17 | 0.95 | 1.4 |" in text
    )
    figures = bench.summary(str(tmp_path))
    assert figures["bert-base_zero0_vs_hf_trainer_grouped_throughput_ratio"] == 0.95
    assert figures["bert-base_zero0_vs_hf_trainer_time_ratio"] == pytest.approx(70 / 60)
    assert figures["bert-base_zero0_accuracy_minus_hf_trainer_grouped"] == pytest.approx(0.02)
