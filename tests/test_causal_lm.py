"""Instruction tuning (`task: causal_lm`): row formats, prompt masking, chat templates,
packing without cross-talk on Llama / GPT-2 / Qwen2 layouts, perplexity by hand, and a
toy LoRA run on ZeRO-3 that learns and writes generations."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rayft.config import ConfigError, validate_config
from rayft.tasks import causal_lm as lm
from rayft.tasks.common import pad_multiple
from tests.conftest import SHARED_DATA
from tests.fixtures.models import CHAT_TEMPLATE, tiny_decoder, word_tokenizer

COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow",
          "blood": "red", "sea": "teal", "rose": "pink", "plum": "purple", "sand": "beige"}  # fmt: skip
WORDS = [*COLORS, *COLORS.values(), "what", "color", "is", "the", "question", "answer", ":",
         "a", "b", "c", "d", "e", "x", "y", "z", "###", "Response", "Instruction", "Input"]  # fmt: skip
DATA = {"dedup": {"exact": False, "near": False, "remove_contaminated": False}}


def cfg_for(model: str = "m", **data) -> object:
    return validate_config(
        {"task": "causal_lm", "model": {"name_or_path": model},
         "data": {"train": "t.jsonl", "eval": "e.jsonl", **data}, "train": {"max_seq_len": 32}}
    )  # fmt: skip


def turns(record: dict, **data) -> list[dict]:
    fields, reason = lm.extract(record, cfg_for(**data).data)
    assert reason is None, reason
    return json.loads(fields["messages"])


# ----------------------------------------------------------------------------- records


def test_three_row_formats_become_conversations():
    assert turns({"prompt": "a b", "response": "c"}) == [
        {"role": "user", "content": "a b"},
        {"role": "assistant", "content": "c"},
    ]
    alpaca = turns({"instruction": "add", "input": "1 2", "output": "3"})
    assert alpaca[0]["content"].endswith(
        "### Instruction:\nadd\n\n### Input:\n1 2\n\n### Response:\n"
    )
    assert (
        turns({"instruction": "x", "output": "y"}, prompt_template="Q: {instruction}{input} A:")[0][
            "content"
        ]
        == "Q: x A:"
    )
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert turns({"messages": chat}) == chat
    data = cfg_for().data
    for record, why in [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
        (
            {"messages": [{"role": "bot", "content": "hi"}]},
            "message_role_not_system_user_assistant",
        ),
        ({"messages": "hi"}, "messages_not_a_list"),
        ({"prompt": "a", "response": ""}, "empty_response"),
        ({"text": "a"}, "no_prompt_instruction_or_messages"),
    ]:
        assert lm.extract(record, data) == (None, why)


@pytest.mark.skipif(
    not (SHARED_DATA / "instruct").is_dir(), reason="../shared/data/instruct is not present"
)
def test_the_shared_instruction_file_reads_without_losses():
    from rayft.data.read import iter_records

    path = SHARED_DATA / "instruct" / "dolly_hhrlhf_train_small.jsonl"
    with path.open("rb") as stream:
        records = [r.record for r in iter_records(stream, str(path))]
    data = cfg_for().data
    assert len(records) == 1000
    assert all(lm.extract(r, data)[1] is None for r in records)


# ------------------------------------------------------------------------------ masking


def test_only_response_tokens_are_targets_and_eos_closes_them():
    tokenizer = word_tokenizer(WORDS)
    cfg = cfg_for()
    ids, labels = lm.encode(
        turns({"prompt": "what color is the sky", "response": "blue"}), tokenizer, cfg
    )
    words = tokenizer.convert_ids_to_tokens(ids)
    assert words == ["what", "color", "is", "the", "sky", "blue", "</s>"]
    assert labels == [-100] * 5 + [ids[5], tokenizer.eos_token_id]
    # Too long: the prompt gives up its beginning, the response is kept.
    long = {"prompt": " ".join(["x"] * 60), "response": "blue"}
    ids, labels = lm.encode(turns(long), tokenizer, cfg)
    assert len(ids) == 32 and tokenizer.convert_ids_to_tokens(ids[-2:]) == ["blue", "</s>"]


def test_chat_template_trains_every_assistant_turn_and_nothing_else():
    tokenizer = word_tokenizer(WORDS, CHAT_TEMPLATE)
    chat = [
        {"role": "system", "content": "x"},
        {"role": "user", "content": "what color is the sky"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "the grass"},
        {"role": "assistant", "content": "green"},
    ]
    cfg = cfg_for()
    ids, labels = lm.encode(turns({"messages": chat}), tokenizer, cfg)
    trained = tokenizer.convert_ids_to_tokens(
        [i for i, x in zip(ids, labels, strict=True) if x != -100]
    )
    # The template closes each assistant turn with </s>: trained too (the model learns to stop).
    assert trained == ["blue", "</s>", "green", "</s>"]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert tokenizer.decode(ids).replace(" ", "") == rendered.replace(" ", "")
    prompt = lm.prompt_text(turns({"messages": chat}), tokenizer, cfg.data)
    assert prompt.endswith("<assistant> ") and "green" not in prompt
    with pytest.raises(ConfigError, match="causal_lm has none"):
        validate_config({"task": "causal_lm", "method": "frozen", "model": {"name_or_path": "m"},
                         "data": {"train": "t.jsonl", "eval": "e.jsonl"}})  # fmt: skip
    with pytest.raises(ValueError, match="data.chat_template=always"):
        lm.encode(turns({"messages": chat}), word_tokenizer(WORDS), cfg_for(chat_template="always"))


# ------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_packed_examples_score_as_if_alone(tmp_path, arch):
    """Per-example losses of a packed batch equal those of the same examples unpacked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_decoder(tmp_path / arch, WORDS, arch)
    tokenizer = AutoTokenizer.from_pretrained(Path(path, "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rows = [{"prompt": f"what color is the {k}", "response": v} for k, v in COLORS.items()]
    batch = {
        "messages": np.array(
            [lm.extract(r, cfg_for().data)[0]["messages"] for r in rows], dtype=object
        )
    }

    def losses(packing: bool) -> tuple[float, int, int]:
        cfg = cfg_for(path, packing=packing)
        features = lm.tokenize(batch, tokenizer, cfg, {})
        inputs = lm.collate(features, tokenizer.pad_token_id, pad_multiple("cpu"))
        with torch.no_grad():
            model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            logits = model(**model_inputs, use_cache=False).logits  # as rayft's config sets
        total, count = lm.token_losses(logits, inputs["labels"])
        return float(total.sum()), int(count.sum()), len(features["input_ids"])

    packed_loss, packed_tokens, packed_rows = losses(True)
    alone_loss, alone_tokens, alone_rows = losses(False)
    assert alone_rows == 10 and packed_rows < alone_rows  # 7 tokens each, 4 per 32
    assert packed_tokens == alone_tokens == 20  # the color and </s> of each row
    assert packed_loss == pytest.approx(alone_loss, rel=1e-4)


def test_packing_restarts_positions_and_never_targets_an_examples_first_token():
    tokenizer = word_tokenizer(WORDS)
    batch = {
        "messages": np.array(
            [lm.extract({"prompt": "", "response": "a b c"}, cfg_for().data)[0]["messages"]] * 3,
            dtype=object,
        )
    }
    out = lm.tokenize(batch, tokenizer, cfg_for(packing=True), {})
    assert len(out["input_ids"]) == 1 and list(out["_row"]) == [0]
    assert out["position_ids"][0].tolist() == [0, 1, 2, 3] * 3
    assert out["labels"][0].tolist()[::4] == [-100] * 3  # "a" of each: no context in its example


def test_packing_fills_sequences_best_fit_decreasing():
    # In order 6 | 5 4 | 5 takes three sequences of 10; 6 + 4 and 5 + 5 take two.
    assert lm.pack([6, 5, 4, 5], 10) == [[0, 2], [1, 3]]
    assert lm.pack([5, 4, 3, 6, 2], 8) == [[0, 2], [1], [3, 4]]  # 6 + 2, 5 + 3, 4
    assert lm.pack([], 8) == []
    rng = random.Random(0)
    for limit in (16, 64, 256):
        lengths = [rng.randint(1, limit) for _ in range(500)]
        sequences = lm.pack(lengths, limit)
        assert sorted(r for rows in sequences for r in rows) == list(range(500))  # each once
        assert all(sum(lengths[r] for r in rows) <= limit for rows in sequences)
        assert sequences == sorted(sequences) and all(rows == sorted(rows) for rows in sequences)
        in_order, used = 1, 0
        for n in lengths:
            in_order, used = (in_order + 1, n) if used + n > limit else (in_order, used + n)
        assert math.ceil(sum(lengths) / limit) <= len(sequences) < in_order
        assert lm.pack(lengths, limit) == sequences  # the same on every run


def test_perplexity_is_the_exponential_of_the_mean_token_loss():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # p(token 2) = 3 / 6 = 0.5 at position 0
    labels = torch.tensor([[-100, 2, 1]])  # targets: token 2 (p 0.5), token 1 (p 0.25)
    total, count = lm.token_losses(logits, labels)
    assert int(count) == 2 and float(total) == pytest.approx(math.log(2) + math.log(4))
    metrics = lm.compute_metrics([(float(total), 2)], [None], [])
    assert metrics["perplexity"] == pytest.approx(math.sqrt(8)) and metrics["eval_tokens"] == 2


# --------------------------------------------------------------------------- toy run


def color_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = rng.choice(list(COLORS))
        filler = " ".join(rng.choice("abcdexyz") for _ in range(rng.randint(0, 3)))
        rows.append(
            {
                "prompt": f"{filler} what color is the {thing}",
                "response": COLORS[thing],
            }
        )
    return rows


def test_toy_instruction_tuning_lora_zero3_packed(tmp_path, ray_session):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.trainer import fit

    model = tiny_decoder(tmp_path / "llama", WORDS, "llama")
    # Two train rows are longer than the window: truncated (prompt start first), counted.
    long = [{"prompt": " ".join(["x"] * 70) + f" what color is the {k}", "response": COLORS[k]}
            for k in ("sky", "sea")]  # fmt: skip
    for split, rows in (("train", color_rows(400, 0) + long), ("eval", color_rows(40, 1))):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = validate_config(
        {
            "task": "causal_lm",
            "method": "lora",
            "model": {"name_or_path": model},
            "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"),
                     "packing": True, **DATA},
            "output_dir": str(tmp_path / "out"),
            "scaling": {"num_workers": 2},
            "deepspeed": {"stage": 3},
            "train": {"epochs": 4, "batch_size": 2, "lr": 2e-2, "max_seq_len": 64, "log_every_steps": 20},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                     # The base is random: its output layer trains in full (peft's
                     # modules_to_save), the rest through adapters.
                     "modules_to_save": ["lm_head"]},
            "generate": {"samples": 3, "max_new_tokens": 4},
        }
    )  # fmt: skip
    metrics = fit(cfg)
    out = Path(cfg.output_dir)
    history = [json.loads(line) for line in (out / "history.jsonl").open()]
    assert history[-1]["perplexity"] < 0.7 * history[0]["perplexity"], history
    # The pretrained baseline (causal_lm's default) is the model before any update, and
    # forgetting is the fine-tuned model's own perplexity on the general text.
    pretrained = metrics["baselines"]["pretrained"]
    assert history[0]["step"] == 0 and history[0]["perplexity"] == pretrained["perplexity"]
    assert metrics["perplexity"] < 0.5 * pretrained["perplexity"]
    forgetting = metrics["forgetting"]
    assert (forgetting["measure"], forgetting["head"]) == ("perplexity", "model")
    assert forgetting["ratio"] == pytest.approx(forgetting["after"] / forgetting["before"])
    assert metrics["eval_tokens"] == 80, metrics  # the color and </s> of each of 40 rows
    # Packed: several rows per sequence, fewer sequences than rows.
    assert metrics["train_windows"] < metrics["train_rows"] == 402
    report = json.loads((out / "data_report.json").read_text())["splits"]["train"]
    assert report["filtered"] == {} and report["truncated"] == {"tokens": 2}
    generations = [json.loads(line) for line in (out / "generations.jsonl").open()]
    assert len(generations) == 3
    assert all(g["prompt"].split()[-1] in COLORS for g in generations)  # ends with the thing
    assert sum(g["generation"].split()[:1] == [g["reference"]] for g in generations) >= 2, (
        generations
    )
    # The adapter applies to the base model as peft loads it, and equals the merged model.
    base = AutoModelForCausalLM.from_pretrained(model)
    tuned = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():  # equal up to fp32 rounding: W + BA against W x + B(A x)
        torch.testing.assert_close(
            tuned(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.skipif(
    not (SHARED_DATA / "instruct").is_dir(), reason="../shared/data/instruct is not present"
)
def test_shipped_instruct_config_runs_on_dolly(tmp_path, ray_session):
    """configs/dolly_instruct.yaml as shipped (split, packing, prompts as written, LoRA on
    every projection of a Qwen2-layout decoder), with a tiny random Qwen2 in place of the
    hub model and a few steps: every row is accounted for and the run writes its outputs."""
    from tokenizers import pre_tokenizers

    from rayft.config import load_config
    from rayft.trainer import fit
    from tests.conftest import REPO

    path = SHARED_DATA / "instruct" / "dolly_hhrlhf_train_small.jsonl"
    split_words = pre_tokenizers.Whitespace().pre_tokenize_str
    words = {
        w for line in path.open() for r in json.loads(line).values() for w, _ in split_words(r)
    }
    model = tiny_decoder(tmp_path / "qwen2", sorted(words), "qwen2")
    cfg = load_config(
        REPO / "configs" / "dolly_instruct.yaml",
        [f"model.name_or_path={model}", f"model.tokenizer={model}/tokenizer",
         f"data.train={path}", f"output_dir={tmp_path / 'out'}", "scaling.num_workers=1",
         "train.max_seq_len=128", "train.max_steps=4", "train.batch_size=2",
         "eval.general_max_tokens=512", "generate.samples=2", "generate.max_new_tokens=4"],
    )  # fmt: skip
    assert (cfg.data.chat_template, cfg.data.packing, cfg.method) == ("never", True, "lora")
    metrics = fit(cfg)
    out = Path(cfg.output_dir)
    report = json.loads((out / "data_report.json").read_text())
    assert report["read"] == 1000
    splits = report["splits"]
    assert splits["train"]["read"] + splits["eval"]["read"] == 1000
    assert 50 <= splits["eval"]["read"] <= 150, splits["eval"]  # 10% by hash
    assert sum(s["kept"] for s in splits.values()) + sum(
        sum(s[k].values()) for s in splits.values() for k in ("filtered", "deduplicated", "quarantined")
    ) == 1000  # fmt: skip
    # Near-duplicate search is off for instruction data unless asked for: rows of one
    # template ("Identify which instrument is string or percussion: ...") stay.
    assert report["settings"]["dedup"]["near"] is False
    assert report["deduplicated"]["near"] == 0 and report["contamination"]["near"] == 0
    assert metrics["train_windows"] < metrics["train_rows"] == splits["train"]["kept"]
    assert metrics["step"] == 4 and math.isfinite(metrics["perplexity"])
    assert metrics["baselines"]["pretrained"]["perplexity"] > 0
    generations = [json.loads(line) for line in (out / "generations.jsonl").open()]
    assert len(generations) == 2
    assert generations[0]["prompt"].startswith("Below is an instruction")  # not re-templated
    assert (out / "adapter" / "adapter_config.json").exists()
