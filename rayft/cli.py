"""`rayft <verb>`: parse, validate, build, run. `python -m rayft.train` is `rayft train`."""

from __future__ import annotations

import argparse
import json
import sys

from rayft.config import (
    ConfigError,
    load_config,
    resolve_paths,
    single_worker_zero_note,
    zero_stage,
)
from rayft.data.read import DataError

FORGETTING_EXCEEDED = 3  # exit status of a run over eval.max_forgetting


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="override config keys"
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _inference_args(parser: argparse.ArgumentParser) -> None:
    """What `predict` and `eval` share: the model, its replicas, and config overrides."""
    parser.add_argument(
        "--model", required=True, help="model directory exported by rayft (<output_dir>/model)"
    )
    parser.add_argument(
        "--concurrency", type=_positive, default=1, help="model replicas (Ray Data actors)"
    )
    parser.add_argument("--gpu", action="store_true", help="one GPU per replica")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="override config keys"
    )


def build_parser() -> argparse.ArgumentParser:
    from rayft.docs import help_epilog
    from rayft.plan import DEFAULT_GPU_MEMORY, gpu_memory_arg

    parser = argparse.ArgumentParser(prog="rayft", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    formatter = argparse.RawDescriptionHelpFormatter
    train = verbs.add_parser(
        "train", help="fine-tune a model", epilog=help_epilog(), formatter_class=formatter
    )
    _config_args(train)
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run this output_dir last started (or `run_name`) from its newest "
        "complete checkpoint; an error if there is none",
    )
    validate = verbs.add_parser(
        "validate",
        help="check a config and its data files without running anything",
        epilog=help_epilog(),
        formatter_class=formatter,
    )
    _config_args(validate)
    plan = verbs.add_parser(
        "plan",
        help="estimate per-GPU memory (parameters, gradients, optimizer states, "
        "activations) and recommend the cheapest setting that fits; runs nothing",
        epilog=help_epilog(),
        formatter_class=formatter,
    )
    _config_args(plan)
    plan.add_argument(
        "--gpu-memory",
        type=gpu_memory_arg,
        default=DEFAULT_GPU_MEMORY,
        help="memory of one GPU, with a unit: 80GiB (default), 40GB, 24576MiB",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    verbs.add_parser(
        "tune",
        help="hyperparameter search; every trial a multi-worker DeepSpeed run "
        "(same as python -m rayft.tune; see `rayft tune -h`)",
        add_help=False,
    )
    data = verbs.add_parser("data", help="the data stage on its own").add_subparsers(
        dest="data_verb", required=True
    )
    prepare = data.add_parser(
        "prepare",
        help="read, clean, deduplicate and split the data; write the Parquet shards "
        "that `train` reuses, data_report.json/.png and quarantine/",
        epilog=help_epilog(),
        formatter_class=formatter,
    )
    _config_args(prepare)
    predict = verbs.add_parser(
        "predict",
        help="predictions of an exported model for a file of rows: its columns plus the "
        "task's (prediction/score, entities/predicted_tags, answer/score, generation); "
        "unusable rows go to <output stem>.quarantine.jsonl",
    )
    _inference_args(predict)
    predict.add_argument("--input", required=True, help="rows to predict (any data format)")
    predict.add_argument(
        "--output", required=True, help="predictions file: .jsonl, .csv or .parquet"
    )
    predict.add_argument("--batch-size", type=_positive, default=32, help="rows per forward")
    predict.add_argument(
        "--config",
        help="the training config, for its data settings (columns, data.format, templates, "
        "QA windows, generate.*); default: the task's defaults",
    )
    evaluate = verbs.add_parser(
        "eval",
        help="score an exported model on labelled data with training's metrics "
        "(metrics.json, eval_predictions.jsonl, report)",
    )
    _inference_args(evaluate)
    evaluate.add_argument("--data", required=True, help="labelled rows (any data format)")
    evaluate.add_argument(
        "--config", required=True, help="the training config (data settings, eval.*)"
    )
    evaluate.add_argument(
        "--out", help="output directory (default: <model dir>/../eval-<data file stem>)"
    )
    export = verbs.add_parser(
        "export",
        help="a Hugging Face model directory (safetensors, tokenizer) from a training "
        "checkpoint: ZeRO shards consolidated, LoRA merged on request",
    )
    export.add_argument("--checkpoint", required=True, help="a Ray Train checkpoint directory")
    export.add_argument("--out", required=True, help="the model directory to write")
    export.add_argument(
        "--merge-lora",
        action="store_true",
        help="LoRA runs: merge the adapters into the model (default: write the peft adapter)",
    )
    export.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    verbs.add_parser(
        "build-ops",
        help="compile the DeepSpeed ops rayft's runs load on this machine (shared-memory "
        "collectives on CPU, CPUAdam for offload) into torch's extension cache, so the first "
        "run does not compile them; `make venv` runs it",
    )
    synth = data.add_parser("synth", help="write a synthetic labeled corpus (jsonl shards)")
    synth.add_argument("--rows", type=int, required=True, help="rows to write")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--files", type=int, default=4, help="number of jsonl files")
    synth.add_argument("--duplicate-rate", type=float, default=0.05)
    synth.add_argument("--near-duplicate-rate", type=float, default=0.02)
    synth.add_argument("--bad-rate", type=float, default=0.01, help="share of unusable rows")
    synth.add_argument("--seed", type=int, default=0)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from rayft.trainer import fit

    metrics = fit(load_config(args.config, args.overrides), resume=args.resume)
    forgetting = metrics.get("forgetting", {})
    if forgetting.get("exceeded"):
        print(
            f"rayft train: the model forgot too much: forgetting ratio {forgetting['ratio']:.3f} "
            f"exceeds eval.max_forgetting {forgetting['max_forgetting']:g} (see report.md)",
            file=sys.stderr,
        )
        return FORGETTING_EXCEEDED
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from rayft.data.prepare import check_sources

    cfg = resolve_paths(load_config(args.config, args.overrides))
    files = check_sources(cfg)
    counts = ", ".join(f"{split}: {len(paths)} file(s)" for split, paths in files.items())
    workers = cfg.scaling.num_workers
    print(
        f"{args.config}: OK (task {cfg.task}, method {cfg.method}; {workers} worker(s), "
        f"ZeRO stage {zero_stage(cfg)}; {counts})"
    )
    if note := single_worker_zero_note(cfg):
        print(f"NOTE: {note}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rayft.plan import build_plan, render

    plan = build_plan(load_config(args.config, args.overrides), gpu_memory=args.gpu_memory)
    print(json.dumps(plan.to_json(), indent=2) if args.json else render(plan))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_verb == "synth":
        from rayft.data.synth import synthesize

        manifest = synthesize(
            args.out,
            args.rows,
            files=args.files,
            duplicate_rate=args.duplicate_rate,
            near_duplicate_rate=args.near_duplicate_rate,
            bad_rate=args.bad_rate,
            seed=args.seed,
        )
        print(f"wrote {args.rows:,} rows to {args.out}/ ({json.dumps(manifest)})")
        return 0
    from rayft.data.prepare import check_sources, prepare
    from rayft.trainer import init_ray

    cfg = resolve_paths(load_config(args.config, args.overrides))
    files = check_sources(cfg)
    init_ray(cfg)
    prepared = prepare(cfg, files)
    rows = ", ".join(f"{split} {n:,}" for split, n in prepared.rows.items())
    print(f"prepared {rows} rows in {prepared.root}; report: {cfg.output_dir}/data_report.json")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from rayft.inference import predict_file

    predict_file(
        args.model,
        args.input,
        args.output,
        config_path=args.config,
        overrides=args.overrides,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        gpu=args.gpu,
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rayft.inference import evaluate_file

    evaluate_file(
        args.model,
        args.data,
        args.config,
        args.overrides,
        args.out,
        concurrency=args.concurrency,
        gpu=args.gpu,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rayft.export import main_args

    return main_args(args)


def cmd_build_ops(args: argparse.Namespace) -> int:
    from rayft.ops import OpBuildError, build_ops, render

    try:
        built = build_ops(say=lambda line: print(f"rayft build-ops: {line}"))
    except OpBuildError as exc:
        print(f"rayft build-ops: error: {exc}", file=sys.stderr)
        return 1
    print(render(built))
    return 0


COMMANDS = {
    "build-ops": cmd_build_ops,
    "export": cmd_export,
    "train": cmd_train,
    "validate": cmd_validate,
    "plan": cmd_plan,
    "data": cmd_data,
    "predict": cmd_predict,
    "eval": cmd_eval,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tune"]:
        from rayft.tune import main as tune_main

        return tune_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except (ConfigError, DataError) as exc:
        print(f"rayft {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
