"""`rayft <verb>`: parse, validate, build, run. `python -m rayft.train` is `rayft train`."""

from __future__ import annotations

import argparse
import sys

from rayft.config import ConfigError, load_config, resolve_paths
from rayft.data.read import DataError


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="override config keys"
    )


def build_parser() -> argparse.ArgumentParser:
    from rayft.docs import help_epilog

    parser = argparse.ArgumentParser(prog="rayft", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    formatter = argparse.RawDescriptionHelpFormatter
    train = verbs.add_parser(
        "train", help="fine-tune a model", epilog=help_epilog(), formatter_class=formatter
    )
    _config_args(train)
    validate = verbs.add_parser(
        "validate",
        help="check a config and its data files without running anything",
        epilog=help_epilog(),
        formatter_class=formatter,
    )
    _config_args(validate)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from rayft.trainer import fit

    fit(load_config(args.config, args.overrides))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from rayft.data.prepare import check_sources

    cfg = resolve_paths(load_config(args.config, args.overrides))
    files = check_sources(cfg)
    counts = ", ".join(f"{split}: {len(paths)} file(s)" for split, paths in files.items())
    print(f"{args.config}: OK (task {cfg.task}, method {cfg.method}; {counts})")
    return 0


COMMANDS = {"train": cmd_train, "validate": cmd_validate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except (ConfigError, DataError) as exc:
        print(f"rayft {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
