"""Reference pages for the experiment and rig files, generated from the validating schema.

Runs on demand (``python -m loop.schema_docs``) and in the test that keeps
``docs/experiment_format.md`` equal to what this module writes, so the page cannot drift from the
schema.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from loop.config import Experiment, Rig

DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "experiment_format.md"

INTRODUCTION = """\
# Experiment and rig files

An experiment file says what a session does (model, pool, trials, timing); a rig file says where it
runs (streams, display, or the simulated subject). Both are TOML. Every key is checked before a
session starts: an unknown key, a wrong type or an out-of-range value stops the command with one
line per problem, naming the file and the key. Durations are in seconds (`_s`), lengths in cm
(`_cm`), sizes in pixels (`_pix`). Relative paths are taken relative to the file that names them.

This page is generated from the schema in `loop/config.py` by `python -m loop.schema_docs`.
"""


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " or ".join(f"`{value!r}`".replace("'", '"') for value in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        names = [_type_name(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        return " or ".join(names) + " (optional)"
    if origin in (list, tuple):
        args = [arg for arg in typing.get_args(annotation) if arg is not Ellipsis]
        inner = ", ".join(_type_name(arg) for arg in args)
        return f"list of {inner}" if origin is list else f"[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory else field.default
    if isinstance(value, BaseModel) or value is None:
        return "" if value is None else "(table)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(str(item) for item in value) + "]`"
    return f"`{value}`"


def _tables(model: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    plain = []
    nested = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        candidates = [annotation, *typing.get_args(annotation)]
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)),
                   None)
        if sub is not None:
            nested.append((name, field, sub))
        else:
            plain.append((name, field))
    if plain:
        lines += [f"## `[{prefix}]`" if prefix else "## Top level", "",
                  "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, field in plain:
            lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | "
                         f"{(field.description or '').replace('|', '/')} |")
        lines.append("")
    for name, field, sub in nested:
        table = f"{prefix}.{name}" if prefix else name
        if field.is_required():
            note = "required"
        elif field.default is None:
            note = "optional"
        else:
            note = "optional; every key has a default"
        lines += [f"## `[{table}]` ({note})", ""]
        body = _tables(sub, table)
        lines += body[2:] if body and body[0].startswith(f"## `[{table}]`") else body
    return lines


def render() -> str:
    """Return the whole reference page as Markdown."""
    lines = [INTRODUCTION, "# Experiment file", ""]
    lines += _tables(Experiment)
    lines += ["# Rig file", ""]
    lines += _tables(Rig)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    DOCS_PAGE.parent.mkdir(parents=True, exist_ok=True)
    DOCS_PAGE.write_text(render(), encoding="utf-8")
    print(f"Wrote {DOCS_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
