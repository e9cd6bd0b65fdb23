"""DeepSpeed's engine alone on one rank, per ZeRO stage: what each stage's machinery (flat
buffers, the fp32 master copy, gradient hooks, parameter gathering) costs a step when
there is nothing to partition. No Ray: rayft's engine (`rayft.engine.initialize`: its
config, AdamW, clipping, schedule) over a gloo group of one in this process.

Models are BERT layouts with random weights built from a config (``--layouts``,
``hidden:layers:batch:tokens``), trained on fixed random batches of that size; the
stages alternate order each repeat; a step's time is the mean over ``--steps`` steps
after ``--warmup``. The default layouts: BERT-base (12 x 768) at 32 x 24 tokens, where
the arithmetic dominates, and 12 x 64 at 4 x 16 tokens, where a step is mostly Python
(the regime of a small model on a GPU).

    python benchmarks/bench_engine_stages.py --repeats 4
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench_overhead import alternating, deepspeed_alone, environment, median, write_result

STAGES = (0, 1, 2, 3)


def engine_step_seconds(layout: dict[str, int], stage: int, steps: int, warmup: int) -> float:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from rayft.config import validate_config

    cfg = validate_config({
        "model": {"name_or_path": "unused"},
        "data": {"train": "unused.csv", "eval": "unused.csv"},
        "scaling": {"num_workers": 1},
        "deepspeed": {"stage": stage, "precision": "fp32"},
        "train": {"batch_size": layout["batch"], "lr": 1e-4},
    })  # fmt: skip
    torch.manual_seed(0)
    hidden = layout["hidden"]
    config = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layout["layers"],
                        num_attention_heads=max(2, hidden // 64), intermediate_size=4 * hidden,
                        num_labels=2)  # fmt: skip
    # The first call creates the 1-rank group; it stays for every engine after (DeepSpeed
    # keeps a handle to it), and goes when the process ends.
    engine, _ = deepspeed_alone(BertForSequenceClassification(config), cfg, 10_000)
    g = torch.Generator().manual_seed(0)
    shape = (layout["batch"], layout["tokens"])
    batches = [{"input_ids": torch.randint(5, 1000, shape, generator=g),
                "attention_mask": torch.ones(shape, dtype=torch.long),
                "labels": torch.randint(0, 2, (layout["batch"],), generator=g)}
               for _ in range(warmup + steps)]  # fmt: skip
    for i, batch in enumerate(batches):
        if i == warmup:
            started = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    seconds = (time.perf_counter() - started) / steps
    engine.destroy()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["768:12:32:24", "64:12:4:16"],
                        help="hidden:layers:batch:tokens")  # fmt: skip
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--name", default="engine_stages", help="results/NAME.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    for spec in args.layouts:
        hidden, layers, batch, tokens = map(int, spec.split(":"))
        layout = {"hidden": hidden, "layers": layers, "batch": batch, "tokens": tokens}
        runs: dict[int, list[float]] = {s: [] for s in STAGES}
        for repeat, stage in alternating(list(STAGES), args.repeats):
            runs[stage].append(engine_step_seconds(layout, stage, args.steps, args.warmup))
            print(f"{spec} repeat {repeat} stage {stage}: {runs[stage][-1] * 1000:.1f} ms/step",
                  flush=True)  # fmt: skip
        base = median(runs[0])
        results[spec] = {
            "layout": layout,
            **{f"stage{s}": {
                "step_seconds": median(runs[s]),
                "step_time_vs_stage0_ratio": median(runs[s]) / base,
                "per_repeat_vs_stage0": [x / y for x, y in zip(runs[s], runs[0], strict=True)],
                "runs": runs[s]} for s in STAGES},
        }  # fmt: skip
    path = write_result(args.name, {
        **environment(),
        "setup": {"world_size": 1, "precision": "fp32", "torch_threads": args.threads,
                  "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats},
        "summary": results,
    })  # fmt: skip
    print("\n| layout (hidden:layers:batch:tokens) | stage 0 ms/step | stage 1 | stage 2 | stage 3 |"
          "\n|---|---|---|---|---|")  # fmt: skip
    for spec, found in results.items():
        cells = [f"{found['stage0']['step_seconds'] * 1000:.1f}"] + [
            f"{found[f'stage{s}']['step_time_vs_stage0_ratio']:.2f}x" for s in STAGES[1:]
        ]
        print(f"| {spec} | " + " | ".join(cells) + " |")
    print(f"\n{path}")


if __name__ == "__main__":
    main()
