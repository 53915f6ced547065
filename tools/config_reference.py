"""Generates the config reference page (docs/reference/config.md) from the one schema.

The schema is `tfcal/config.py`: its frozen dataclasses give every key, its type and allowed
values (`Literal`), its default, and its range check (the field's `check` metadata, the same one
`load_config` runs). The descriptions are the comments of `configs/example.yaml`, which
`tests/test_config.py` holds to list every key. Nothing on the page is written by hand.

    python tools/config_reference.py           # rewrite docs/reference/config.md
    python tools/config_reference.py --check   # exit 1 if the page differs from the code

`tests/docs/test_config_reference.py` runs the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the package of this checkout
    sys.path.insert(0, str(REPO))

from tfcal import config as schema  # noqa: E402  (after the path set-up above)

PAGE = REPO / "docs" / "reference" / "config.md"
EXAMPLE = REPO / "configs" / "example.yaml"
_UNION = type(int | None)
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<rest>.*)$")


def example_comments(text: str) -> dict[str, str]:
    """The comment of each key of a commented YAML config, by dotted key path.

    A key's comment is the comment block right above it, its trailing comment, and the
    comment-only lines that continue it (indented deeper than the key, or starting with `#   `,
    as examples do). Comments under a section's own line (`model:`) belong to its first key.
    """
    comments: dict[str, list[str]] = {}
    stack: list[tuple[int, str]] = []
    leading: list[str] = []
    last: str | None = None
    last_is_section = False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            leading, last = [], None
            continue
        if stripped.startswith("#"):
            column = len(line) - len(line.lstrip())
            body = stripped[1:]
            key_indent = stack[-1][0] if stack else 0
            if last is not None and (column > key_indent or body.startswith("   ")) \
                    and not last_is_section:
                comments[last].append(body.strip())
            else:
                leading.append(body.strip())
                last = None
            continue
        match = _KEY.match(line)
        if match is None:  # a continued value (a flow list over lines): not a key
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [match["key"]])
        stack.append((indent, match["key"]))
        rest = match["rest"]
        trailing = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        comments[path] = [*leading, *([trailing] if trailing else [])]
        leading, last = [], path
        last_is_section = not rest.split(" #", 1)[0].strip()
    return {path: " ".join(lines).strip() for path, lines in comments.items()}


def _keys(cls) -> list[dataclasses.Field]:
    """The fields a config file may set: `load_config` skips `compare=False` bookkeeping
    (`Config.source`, `Config.sha256`)."""
    return [f for f in dataclasses.fields(cls) if f.compare]


def _type_text(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, _UNION):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_type_text(a) for a in inner)
        return f"{text} or `null`" if type(None) in args else text
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return f"list of {_plural(args[0])}"
    if origin is dict:
        value = ("an entry (below)" if dataclasses.is_dataclass(args[1])
                 else _type_text(args[1]))
        return f"mapping of category id or name to {value}"
    if dataclasses.is_dataclass(hint):
        return "section"
    return {bool: "`true` or `false`", int: "integer", float: "number", str: "string",
            Path: "path"}.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "values among " + ", ".join(f"`{a}`" for a in typing.get_args(hint))
    return {int: "integers", float: "numbers", str: "strings"}.get(hint, _type_text(hint))


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        if dataclasses.is_dataclass(field.default):
            return "(section)"
        return f"`{_value_text(field.default)}`"
    if field.default_factory is not dataclasses.MISSING:
        return f"`{_value_text(field.default_factory())}`"
    return "required"


def _check_text(field: dataclasses.Field) -> str:
    check = field.metadata.get("check")
    if check is None:  # checked with other fields, or by tfcal.validation: the rule in words
        return field.metadata.get("rule", "")
    message = check[1]() if callable(check[1]) else check[1]
    return message


def _cell(text: str) -> str:
    """Text for a table cell: `|` escaped, and `<` `>` outside code spans as entities (so that
    `<dir>` is not read as an HTML tag)."""
    parts = text.replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _table(cls, prefix: str, comments: dict[str, str], describe) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for field in _keys(cls):
        hint = hints[field.name]
        type_text = _type_text(hint)
        check = _check_text(field)
        if check:
            type_text += f"; {check}"
        description = describe(f"{prefix}.{field.name}", field, comments)
        rows.append(f"| `{field.name}` | {_cell(type_text)} | {_cell(_default_text(field))} | "
                    f"{_cell(description)} |")
    return rows


def _from_example(path: str, field, comments: dict[str, str]) -> str:
    return comments.get(path, "")


def _class_override(path: str, field, comments: dict[str, str]) -> str:
    return f"overrides `tuning.{field.name}` for this class (`null`: as in `tuning`)"


def _doc_summary(cls) -> str:
    doc = (cls.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def render() -> str:
    """The page, from `tfcal.config` and the comments of `configs/example.yaml`."""
    comments = example_comments(EXAMPLE.read_text())
    hints = typing.get_type_hints(schema.Config)
    out = [
        "# Config reference",
        "",
        "<!-- Generated by tools/config_reference.py from tfcal/config.py and the comments of",
        "     configs/example.yaml. Do not edit: run `python tools/config_reference.py`. -->",
        "",
        "Every key of a tuning config, with its type, its allowed values and range, its default",
        "and its description. Keys not listed are refused, as are wrong types and out-of-range",
        "values: one line names the file and the key (see [Configuration](../configuration.md)).",
        "Relative paths resolve against the directory of the config file; `configs/example.yaml`",
        "is the same list as a commented file.",
        "",
    ]
    for section in _keys(schema.Config):
        cls = hints[section.name]
        out += [f"## {section.name}", "", _doc_summary(cls), ""]
        out += _table(cls, section.name, comments, _from_example)
        out.append("")
        sub_hints = typing.get_type_hints(cls)
        for field in _keys(cls):
            sub = sub_hints[field.name]
            if dataclasses.is_dataclass(sub):
                path = f"{section.name}.{field.name}"
                out += [f"### {path}", "", _doc_summary(sub)]
                if comments.get(path):
                    out += ["", comments[path]]
                out += [""] + _table(sub, path, comments, _from_example) + [""]
            elif typing.get_origin(sub) is dict and dataclasses.is_dataclass(
                    typing.get_args(sub)[1]):
                entry = typing.get_args(sub)[1]
                path = f"{section.name}.{field.name}"
                out += [f"### {path}.&lt;class&gt;", "", _doc_summary(entry)]
                if comments.get(path):
                    out += ["", comments[path]]
                out += [""] + _table(entry, path, comments, _class_override) + [""]
    return "\n".join(out).rstrip() + "\n"


def _shown(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if docs/reference/config.md differs from the code")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{_shown(PAGE)} is stale: run python tools/config_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {_shown(PAGE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
