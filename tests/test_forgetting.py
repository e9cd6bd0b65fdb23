"""The forgetting measure on its own (no Ray): the general text, the masks, the heads."""

from __future__ import annotations

import math

import pytest
import torch

from rayft import forgetting
from rayft.config import resolve_paths, validate_config
from rayft.modeling import load_tokenizer
from rayft.tasks.common import IGNORE_INDEX
from tests.fixtures.models import GENERAL_TEXT

CPU = torch.device("cpu")


def config(model: str, **eval_section):
    raw = {
        "model": {"name_or_path": model},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl"},
        "train": {"max_seq_len": 64},
        "eval": {"general_max_tokens": 2048, "probe_steps": 50, **eval_section},
    }
    return resolve_paths(validate_config(raw))


def built(model: str, **eval_section):
    cfg = config(model, **eval_section)
    tokenizer = load_tokenizer(cfg)
    return cfg, tokenizer, forgetting.build(cfg, tokenizer, forgetting.read_general_text(cfg))


def test_masks_are_fixed_bert_style_and_never_on_special_tokens(mlm_model):
    cfg, tokenizer, first = built(mlm_model)
    _, _, second = built(mlm_model)
    assert first.head_source == "pretrained" and first.measure == "mlm_loss"
    for a, b in zip(first.batches, second.batches, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    ids = torch.cat([b["input_ids"].flatten() for b in first.batches])
    labels = torch.cat([b["labels"].flatten() for b in first.batches])
    target = labels != IGNORE_INDEX
    special = torch.tensor(sorted(set(tokenizer.all_special_ids) - {tokenizer.mask_token_id}))
    assert not torch.isin(labels[target], special).any()  # [CLS], [SEP], [PAD] never targets
    real = torch.cat([b["attention_mask"].flatten() for b in first.batches]).sum()
    assert 0.12 < int(target.sum()) / int(real) < 0.16  # 15% of the non-special tokens
    masked = (ids[target] == tokenizer.mask_token_id).float().mean()
    assert 0.7 < float(masked) < 0.9  # 80% [MASK], the rest random or kept
    assert first.tokens == int(target.sum())


def test_the_pretrained_head_scores_a_trained_backbone_better_than_a_random_one(mlm_model):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _, _, measure = built(mlm_model)
    trained = AutoModelForSequenceClassification.from_pretrained(mlm_model, num_labels=2)
    random = AutoModelForSequenceClassification.from_config(
        AutoConfig.from_pretrained(mlm_model, num_labels=2)
    )
    before = measure.loss(trained, CPU)
    assert measure.loss(trained, CPU) == before  # deterministic
    assert measure.loss(random, CPU) > before + 0.5
    assert measure.ratio(before, measure.loss(random, CPU)) > 1.05


def test_without_a_head_a_probe_is_trained_on_half_and_scores_the_other(bare_backbone):
    from transformers import AutoModelForSequenceClassification

    _, _, measure = built(bare_backbone)
    assert measure.head_source == "probe" and "no weights" in measure.note
    assert measure.probe_batches and measure.batches
    scored = {tuple(s.tolist()) for b in measure.batches for s in b["input_ids"]}
    fitted = {tuple(s.tolist()) for b in measure.probe_batches for s in b["input_ids"]}
    assert not scored & fitted
    model = AutoModelForSequenceClassification.from_pretrained(bare_backbone, num_labels=2)
    untrained = measure.loss(model, CPU)
    before = measure.train_probe(model, CPU, steps=50)
    assert before < untrained - 0.5  # the probe learned to read the backbone
    assert measure.loss(model, CPU) == pytest.approx(before)  # frozen afterwards
    assert all(not p.requires_grad for p in measure.head.parameters())


def test_decoder_ratio_is_of_perplexities_and_nan_is_never_within_a_limit():
    clm = forgetting.Forgetting("clm", "model", None, [], 0, "text")
    assert clm.measure == "perplexity"
    assert clm.value(2.0) == pytest.approx(math.exp(2.0))
    assert clm.ratio(2.0, 2.5) == pytest.approx(math.exp(0.5))
    assert math.isnan(clm.ratio(2.0, float("nan")))
    assert clm.value(10_000.0) == math.exp(700.0)  # capped, no OverflowError
    mlm = forgetting.Forgetting("mlm", "probe", None, [], 0, "text")
    assert mlm.ratio(2.0, 3.0) == 1.5
    limit = 1.2
    assert not (float("nan") <= limit)  # what write_outputs tests: NaN is over the limit


def test_general_text_errors_name_the_file(tmp_path, mlm_model):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt holds no text"):
        forgetting.read_general_text(config(mlm_model, general_text=str(empty)))
    with pytest.raises(ValueError, match="cannot read .*missing.txt"):
        forgetting.read_general_text(config(mlm_model, general_text=str(tmp_path / "missing.txt")))
    assert forgetting.read_general_text(config(mlm_model, general_text=None)) is None
    assert len(forgetting.read_general_text(config(mlm_model))) == 300
    assert GENERAL_TEXT.endswith("general_text.txt")
