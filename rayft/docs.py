"""The configuration reference, generated from the schema (``python -m rayft.docs``)."""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from rayft.config import RayftConfig


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory else field.default
    if isinstance(value, BaseModel):
        return ""
    return f"`{json.dumps(value)}`"


def fields(
    model: type[BaseModel] = RayftConfig, prefix: str = ""
) -> list[tuple[str, str, str, str]]:
    """(key path, type, default, description) for every leaf field, in schema order."""
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(fields(annotation, f"{prefix}{name}."))
        else:
            rows.append(
                (
                    f"{prefix}{name}",
                    _type_name(annotation),
                    _default(field),
                    field.description or "",
                )
            )
    return rows


def config_reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `rayft/config.py` by `make docs` (`python -m rayft.docs`); a test "
        "fails when this file is out of date. Keys are YAML paths; override any of them on "
        "the command line as `key.sub=value` (the value is parsed as YAML). Unknown keys "
        "and wrong types are errors.",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    for key, kind, default, description in fields():
        kind = kind.replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | {default} | {description.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def help_epilog() -> str:
    """Plain-text key list for `rayft <verb> --help`."""
    return "config keys (override as key.sub=value):\n" + "\n".join(
        f"  {key:<34} {description}" for key, _, _, description in fields()
    )


if __name__ == "__main__":
    print(config_reference(), end="")
