"""Packing causal-LM examples into sequences: rows in order against best fit decreasing.

Two measurements on the shared Dolly / HH-RLHF sample, tokenized by the task's own code
(`causal_lm.encode`: template, prompt masked, EOS, truncation) with the MiniLM package's
WordPiece tokenizer, packed within batches of ``--batch-rows`` rows as the data stage's
`map_batches` hands them over:

1. `fill`: for each ``--max-seq-lens``, the sequences an epoch needs and how full they
   are, packed the way rayft did until 2026-12-06 (rows in order, a sequence closed at
   the first row that does not fit) and the way it does now (`causal_lm.pack`, best fit
   decreasing), and the seconds packing takes;
2. `train` (``--train-seq-len``): one epoch of each packing trained side by side in this
   process (a random 2-layer x 128 Llama layout as in bench_instruct, torch's AdamW,
   ``--threads`` threads, batches of ``--batch-size`` sequences collated by
   `causal_lm.collate`), a fresh model per side, the order alternating over
   ``--repeats``: seconds per epoch and the epoch's mean loss per trained token.

    python benchmarks/bench_packing.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench_instruct import DOLLY, build_model
from bench_overhead import environment, write_result


def in_order(lengths: list[int], limit: int) -> list[list[int]]:
    """rayft's packing before 2026-12-06: rows in their order, a new sequence whenever the
    next row does not fit the current one."""
    sequences: list[list[int]] = []
    used = limit
    for r, n in enumerate(lengths):
        if used + n > limit:
            sequences.append([])
            used = 0
        sequences[-1].append(r)
        used += n
    return sequences


def encoded_batches(
    tokenizer_dir: str, limits: list[int], batch_rows: int
) -> dict[int, list[list[Any]]]:
    """For each max_seq_len in ``limits``: the sample's rows as the task encodes them, in
    batches of ``batch_rows``."""
    from rayft.modeling import load_tokenizer
    from rayft.tasks import causal_lm as lm

    with open(DOLLY) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    tokenizer = load_tokenizer(config(tokenizer_dir, limits[0]))
    found = {}
    for limit in limits:
        cfg = config(tokenizer_dir, limit)
        encoded = []
        for record in records:
            fields, _ = lm.extract(record, cfg.data)
            if fields is not None:
                encoded.append(lm.encode(json.loads(fields["messages"]), tokenizer, cfg))
        found[limit] = [encoded[i : i + batch_rows] for i in range(0, len(encoded), batch_rows)]
    return found


def config(tokenizer_dir: str, max_seq_len: int) -> Any:
    from rayft.config import validate_config

    return validate_config({
        "task": "causal_lm", "method": "full", "output_dir": tempfile.gettempdir(),
        "model": {"name_or_path": tokenizer_dir, "tokenizer": tokenizer_dir},
        "data": {"train": DOLLY, "split": {"train": 0.9, "eval": 0.1}, "packing": True},
        "train": {"max_seq_len": max_seq_len},
    })  # fmt: skip


Packer = Callable[[list[int], int], list[list[int]]]


def packed(batches: list[list[Any]], packer: Packer, limit: int) -> tuple[list[Any], float]:
    """Every batch's rows packed by ``packer``: (sequences as the task joins them: ids,
    labels, positions; seconds spent choosing the packing)."""
    from rayft.tasks.causal_lm import join

    sequences, seconds = [], 0.0
    for batch in batches:
        started = time.perf_counter()
        groups = packer([len(ids) for ids, _ in batch], limit)
        seconds += time.perf_counter() - started
        sequences += [join([batch[r] for r in rows]) for rows in groups]
    return sequences, seconds


def fill(encoded: dict[int, list[list[Any]]], lens: list[int]) -> list[dict[str, Any]]:
    from rayft.tasks.causal_lm import pack

    rows = []
    for limit in lens:
        batches = encoded[limit]
        tokens = sum(len(ids) for batch in batches for ids, _ in batch)
        found: dict[str, Any] = {"max_seq_len": limit, "rows": sum(map(len, batches)),
                                 "tokens": tokens}  # fmt: skip
        for name, packer in (("in_order", in_order), ("best_fit_decreasing", pack)):
            sequences, seconds = packed(batches, packer, limit)
            assert sum(len(ids) for ids, _, _ in sequences) == tokens  # nothing lost
            found[name] = {"sequences": len(sequences), "fill": tokens / (len(sequences) * limit),
                           "pack_seconds": seconds}  # fmt: skip
        found["sequences_ratio"] = (
            found["best_fit_decreasing"]["sequences"] / found["in_order"]["sequences"]
        )
        print(f"max_seq_len {limit}: {found['rows']} rows, {tokens} tokens; in order "
              f"{found['in_order']['sequences']} sequences ({found['in_order']['fill']:.1%} "
              f"full), best fit decreasing {found['best_fit_decreasing']['sequences']} "
              f"({found['best_fit_decreasing']['fill']:.1%}): x{found['sequences_ratio']:.3f}",
              flush=True)  # fmt: skip
        rows.append(found)
    return rows


def column(arrays: list[Any]) -> Any:
    """Sequences as Ray Data hands a column to `collate`: a 1-D object array of arrays."""
    import numpy as np

    out = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):  # one by one: equal lengths would make it 2-D
        out[i] = array
    return out


def train_epoch(model_dir: str, sequences: list[Any], batch_size: int, pad_id: int) -> dict:
    """One epoch over ``sequences`` (in their order), a fresh model: seconds and loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from rayft.tasks import causal_lm as lm
    from rayft.tasks.common import pad_multiple

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    total, count = 0.0, 0
    started = time.perf_counter()
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        batch = {key: column([s[k] for s in chunk])
                 for k, key in enumerate(("input_ids", "labels", "position_ids"))}  # fmt: skip
        inputs = lm.collate(batch, pad_id, pad_multiple("cpu"))
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        loss_sum, tokens = lm.token_losses(logits, labels)
        loss = loss_sum.sum() / tokens.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total, count = total + float(loss_sum.sum()), count + int(tokens.sum())
    return {"seconds": time.perf_counter() - started, "steps": -(-len(sequences) // batch_size),
            "loss_per_token": total / count}  # fmt: skip


def train(
    model_dir: str, batches: list[list[Any]], pad_id: int, args: argparse.Namespace
) -> dict[str, Any]:
    import torch

    from rayft.tasks.causal_lm import pack

    torch.set_num_threads(args.threads)
    sides = {name: packed(batches, packer, args.train_seq_len)[0]
             for name, packer in (("in_order", in_order), ("best_fit_decreasing", pack))}  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name in sides if repeat % 2 == 0 else reversed(list(sides)):
            runs[name].append(train_epoch(model_dir, sides[name], args.batch_size, pad_id))
            print(f"repeat {repeat} {name}: {runs[name][-1]}", flush=True)
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    return {
        "max_seq_len": args.train_seq_len, "batch_size": args.batch_size,
        "threads": args.threads, "runs": runs, "median_epoch_seconds": median,
        "epoch_time_ratio": median["best_fit_decreasing"] / median["in_order"],
        "epoch_time_ratio_per_repeat": [b["seconds"] / a["seconds"] for a, b in
                                        zip(runs["in_order"], runs["best_fit_decreasing"], strict=True)],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=1024,
        help="rows per packing batch (Ray Data's default map_batches size)",
    )
    parser.add_argument("--train-seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--name", default="packing")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="rayft-bench-packing-")
    model_dir, tokenizer_dir = build_model(work, 128, 2)  # bench_instruct's model
    limits = sorted({*args.max_seq_lens, args.train_seq_len})
    encoded = encoded_batches(tokenizer_dir, limits, args.batch_rows)
    result: dict[str, Any] = {**environment(), "data": os.path.relpath(DOLLY),
                              "fill": fill(encoded, args.max_seq_lens)}  # fmt: skip
    if not args.skip_train:
        from rayft.modeling import load_tokenizer

        pad_id = load_tokenizer(config(tokenizer_dir, args.train_seq_len)).pad_token_id
        result["train"] = train(model_dir, encoded[args.train_seq_len], pad_id, args)
    print("wrote", write_result(args.name, result))


if __name__ == "__main__":
    main()
