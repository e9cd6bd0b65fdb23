"""Does `torch.compile` pay for fine-tuning steps on a CPU? The same training steps eager
and compiled, side by side.

all-MiniLM-L6-v2, full fine-tuning, fp32, 2 torch threads, multi-tensor AdamW (rayft's CPU
optimizer), the first ``--rows`` sentence-length rows of SST-2 train.tsv tokenized and
padded per batch to the longest row (as a CPU worker pads), in file order. The compiled
side wraps the model in `torch.compile(dynamic=True)` (batch widths vary). Each repeat
trains a fresh model on each side, the order alternating; the first compiled run pays the
compilation (reported as its first step), later ones find inductor's cache warm, as a
second run on the same machine would. The steady step time is the mean after the warm-up
steps.

    python benchmarks/bench_compile.py --repeats 2
"""

from __future__ import annotations

import sys
import time
from typing import Any

from bench_overhead import (
    MINILM,
    ab_parser,
    ab_setup,
    alternating,
    environment,
    median,
    sst2_sentences,
    write_result,
)


def sst2_batches(rows: int, batch_size: int, max_seq_len: int) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoTokenizer

    from rayft.config import resolve_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_path(MINILM))
    _, lines = sst2_sentences(rows)
    texts = [line.split("\t")[0] for line in lines]
    labels = [int(line.split("\t")[1]) for line in lines]
    batches = []
    for lo in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[lo : lo + batch_size],
            truncation=True,
            max_length=max_seq_len,
            padding="longest",
            return_tensors="pt",
        )
        batches.append({**encoded, "labels": torch.tensor(labels[lo : lo + batch_size])})
    return batches


def train_steps(batches: list[dict[str, Any]], compiled: bool) -> list[float]:
    import torch
    from transformers import AutoModelForSequenceClassification

    from rayft.config import resolve_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_path(MINILM), num_labels=2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, foreach=True)
    forward = torch.compile(model, dynamic=True) if compiled else model
    seconds = []
    for batch in batches:
        tick = time.perf_counter()
        forward(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - tick)
    return seconds


def main() -> None:
    args = ab_parser(__doc__, "compile", repeats=2).parse_args()

    import torch

    torch.set_num_threads(2)
    batches = sst2_batches(args.rows, args.batch_size, args.max_seq_len)
    print(f"{len(batches)} batches", flush=True)
    sides = {"eager": False, "compiled": True}
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for repeat, side in alternating(list(sides), args.repeats):
        seconds = train_steps(batches, sides[side])
        steady = seconds[args.warmup_steps :]
        runs[side].append(
            {
                "first_step_seconds": seconds[0],
                "total_seconds": sum(seconds),
                "steady_step_seconds": sum(steady) / len(steady),
            }
        )
        print(f"repeat {repeat + 1} {side}: {runs[side][-1]}", flush=True)
    ratios = [
        compiled["steady_step_seconds"] / eager["steady_step_seconds"]
        for compiled, eager in zip(runs["compiled"], runs["eager"], strict=True)
    ]
    summary = {
        "steady_step_seconds_eager": median([r["steady_step_seconds"] for r in runs["eager"]]),
        "steady_step_seconds_compiled": median(
            [r["steady_step_seconds"] for r in runs["compiled"]]
        ),
        "compiled_vs_eager_step_ratio": median(ratios),
        "compiled_vs_eager_step_ratios": ratios,
        "first_compile_seconds": runs["compiled"][0]["first_step_seconds"],
    }
    path = write_result(
        args.name,
        {
            **environment(),
            "setup": ab_setup(
                args,
                len(batches),
                compile="torch.compile(model, dynamic=True), default backend (inductor)",
            ),
            "runs": runs,
            "summary": summary,
        },
    )
    print(
        f"\ncompiled / eager steady step: {summary['compiled_vs_eager_step_ratio']:.3f} "
        f"(per repeat {', '.join(f'{r:.3f}' for r in ratios)}); eager "
        f"{summary['steady_step_seconds_eager']:.3f} s, compiled "
        f"{summary['steady_step_seconds_compiled']:.3f} s; first compilation "
        f"{summary['first_compile_seconds']:.1f} s; {path}"
    )


if __name__ == "__main__":
    sys.exit(main())
