"""Generate the configuration reference (docs/configuration.md) and .env.example from the Settings model.

    python -m config.reference           # rewrite both files
    python -m config.reference --check   # exit 1, naming the stale file, when either is out of date

Both files are derived, never edited by hand: every section of `Settings` (any nested pydantic model), every
field with its type, default, constraints and env var name (`CONVO_` prefix, sections joined by `__`). A field's
description is its `Field(description=...)` when set, else the `# comment` on its line (or the comment lines right
above it) in config/settings.py, so fields written in either style are documented. The `${VAR}` variables that
docker-compose.yml interpolates are listed in .env.example too, so one file holds every knob of a deployment.
Import-light: pydantic only (config/ never imports torch).
"""

from __future__ import annotations

import argparse
import enum
import inspect
import io
import json
import os
import re
import sys
import tempfile
import textwrap
import tokenize
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

from config.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = Path("docs/configuration.md")
ENV_PATH = Path(".env.example")
COMPOSE_PATH = Path("docker-compose.yml")
GENERATOR = "python -m config.reference"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error} (Compose interpolation).
_COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class FieldDoc:
    """One setting as the reference shows it."""

    path: tuple[str, ...]  # ("train", "lora_r")
    env: str  # CONVO_TRAIN__LORA_R
    type: str
    default: Any  # the default value (None when there is none)
    required: bool
    secret: bool
    constraints: str  # ">= 1, <= 1" or ""
    description: str


@dataclass(frozen=True, slots=True)
class SectionDoc:
    """One settings section (a nested model of Settings) and its fields."""

    path: tuple[str, ...]  # ("train",); () for top-level fields of Settings itself
    summary: str  # the model's docstring
    fields: tuple[FieldDoc, ...]


@dataclass(frozen=True, slots=True)
class ComposeVar:
    """A variable docker-compose.yml interpolates."""

    name: str
    default: str | None  # after ":-" / "-"
    required: bool  # ":?" / "?"
    description: str  # from the `#   NAME  description` lines of the file's header


# ---------------------------------------------------------------- reading the model


def field_comments(model: type) -> dict[str, str]:
    """Map field name -> its `# comment` in the class source (same line, else the comment lines just above)."""
    try:
        source = textwrap.dedent(inspect.getsource(model))
    except (OSError, TypeError):  # built dynamically (tests) or no source file
        return {}
    comments: dict[str, str] = {}
    above: list[str] = []
    body_indent: int | None = None
    current: str | None = None  # field whose statement is open (multi-line Field(...))
    depth = 0
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    for tok in tokens:
        if tok.type == tokenize.INDENT and body_indent is None:
            body_indent = len(tok.string)
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if current is not None and depth >= 0:
                comments[current] = f"{comments[current]} {text}".strip() if current in comments else text
            elif tok.start[1] == body_indent:
                above.append(text)
            continue
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        if tok.type == tokenize.NEWLINE:
            current = None
            continue
        if tok.type == tokenize.NL:
            if current is None:
                above = [] if not tok.line.strip() else above
            continue
        if (current is None and tok.type == tokenize.NAME and tok.start[1] == body_indent and depth == 0):
            name = tok.string
            if name in model.model_fields:
                current = name
                if above:
                    comments[name] = " ".join(above)
            above = []
        elif current is None and tok.type not in (tokenize.INDENT, tokenize.DEDENT):
            above = []
    return comments


def _type_name(tp: Any) -> str:
    """A readable type: `int`, `str | None`, `"friend" | "self"`, `dict[str, str]`."""
    if tp is type(None):
        return "None"
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _constraints(info: Any) -> str:
    """The numeric/length bounds of a field (`>= 1, <= 1`)."""
    parts = []
    for meta in info.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "min length"),
                          ("max_length", "max length"), ("pattern", "pattern")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_secret(tp: Any) -> bool:
    return tp is SecretStr or any(_is_secret(a) for a in get_args(tp))


def sections(settings_cls: type[BaseModel] = Settings) -> list[SectionDoc]:
    """Every section of `settings_cls`, in declaration order, with its fields (nested models recurse)."""
    prefix = str(settings_cls.model_config.get("env_prefix", "")).upper()
    delim = str(settings_cls.model_config.get("env_nested_delimiter") or "__")
    out: list[SectionDoc] = []

    def walk(model: type[BaseModel], path: tuple[str, ...]) -> None:
        comments = field_comments(model)
        fields: list[FieldDoc] = []
        nested: list[tuple[type[BaseModel], tuple[str, ...]]] = []
        for name, info in model.model_fields.items():
            if _is_model(info.annotation):
                nested.append((info.annotation, (*path, name)))
                continue
            default = None if info.default is PydanticUndefined and info.default_factory is None \
                else info.get_default(call_default_factory=True)
            env = prefix + delim.join(p.upper() for p in (*path, name))
            fields.append(FieldDoc(
                path=(*path, name), env=env, type=_type_name(info.annotation), default=default,
                required=info.is_required(), secret=_is_secret(info.annotation), constraints=_constraints(info),
                description=(info.description or comments.get(name) or "").strip(),
            ))
        if fields or path:
            out.append(SectionDoc(path=path, summary=inspect.cleandoc(model.__doc__ or "").split("\n")[0],
                                  fields=tuple(fields)))
        for sub, sub_path in nested:
            walk(sub, sub_path)

    walk(settings_cls, ())
    return out


def undocumented(secs: list[SectionDoc]) -> list[str]:
    """Settings without a description (`train.lora_r`), for the test and the generator's warning."""
    return [".".join(f.path) for s in secs for f in s.fields if not f.description]


def compose_variables(compose_file: Path) -> list[ComposeVar]:
    """The `${VAR}` variables docker-compose.yml interpolates, in order of first use ($$ escapes skipped)."""
    if not compose_file.is_file():
        return []
    text = compose_file.read_text(encoding="utf-8")
    described = dict(re.findall(r"^#\s+([A-Za-z_][A-Za-z0-9_]*)\s{2,}(\S.*)$", text, re.M))
    seen: dict[str, ComposeVar] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        for m in _COMPOSE_VAR.finditer(line.replace("$$", "")):
            name, op, arg = m.group(1), m.group(2) or "", m.group(3)
            if name not in seen:
                seen[name] = ComposeVar(name, arg if op.endswith("-") else None, op.endswith("?"),
                                        described.get(name, "").strip())
    return list(seen.values())


# ---------------------------------------------------------------- rendering


def _env_value(value: Any) -> str:
    """A default as it is written in a .env file (lists and maps as JSON)."""
    if value is None or isinstance(value, SecretStr):
        return ""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict, set)):
        return "'" + json.dumps(list(value) if isinstance(value, (set, tuple)) else value) + "'"
    if isinstance(value, BaseModel):
        return "'" + value.model_dump_json() + "'"
    text = str(value)
    return json.dumps(text) if re.search(r"[\s#'\"]", text) or text == "" else text


def _md_value(f: FieldDoc) -> str:
    if f.required:
        return "required"
    if f.secret or f.default is None:
        return "unset"
    if isinstance(f.default, BaseModel):
        return f"`{f.default.model_dump_json()}`"
    if isinstance(f.default, enum.Enum):
        return f"`{json.dumps(f.default.value)}`"
    return f"`{json.dumps(f.default) if isinstance(f.default, (str, list, dict, bool)) else f.default}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _anchor(sec: SectionDoc) -> str:
    return ".".join(sec.path) or "general"


_DOC_INTRO = """\
Every setting of `convo`, generated from `config/settings.py` by `{generator}`; do not edit by hand
(`{generator} --check` fails when this page is stale, and a test runs it).

**Where values come from**, highest priority first:

1. options on the command line (`convo train --lora-r 8`);
2. environment variables: `CONVO_` + section + `__` + field, upper-case (`CONVO_TRAIN__LORA_R=8`); lists and maps
   are written as JSON (`CONVO_SECTION__FIELD='["a", "b"]'`);
3. a `.env` file in the working directory, same names ([`.env.example`](../.env.example) lists them all, with
   their defaults; `docker compose` passes it to every service);
4. a TOML file given by `convo --config FILE` or `CONVO_CONFIG` (sections as tables: `[train]` then
   `lora_r = 8`; [`config/convo.example.toml`](../config/convo.example.toml) is an example);
5. the defaults below.

A value that breaks a constraint stops any command with one line naming the setting and exit code 2
(`error: setting train.lora_r: Input should be greater than or equal to 1 (check CONVO_* variables)`).
Secrets (type `SecretStr`) are read like any other setting but never printed or logged; put them in the
environment or `.env`, not in a TOML file you might commit.
"""


def render_markdown(secs: list[SectionDoc]) -> str:
    """docs/configuration.md."""
    lines = ["# Configuration reference", "", _DOC_INTRO.format(generator=GENERATOR).rstrip(), "", "## Sections", ""]
    for sec in secs:
        count = f"{len(sec.fields)} setting{'s' if len(sec.fields) != 1 else ''}" if sec.fields else "no settings yet"
        lines.append(f"- [`{_anchor(sec)}`](#{_anchor(sec).replace('.', '')}): {sec.summary} ({count})")
    for sec in secs:
        lines += ["", f"## {_anchor(sec)}", "", sec.summary, ""]
        if not sec.fields:
            lines.append("No settings yet.")
            continue
        lines += ["| setting | env var | type | default | description |", "|---|---|---|---|---|"]
        for f in sec.fields:
            typ = f.type + (f" ({f.constraints})" if f.constraints else "")
            desc = f.description + (" Secret: never logged." if f.secret else "")
            lines.append(f"| `{f.path[-1]}` | `{f.env}` | `{_cell(typ)}` | {_cell(_md_value(f))} | {_cell(desc)} |")
    return "\n".join(lines) + "\n"


def render_env(secs: list[SectionDoc], compose_vars: list[ComposeVar]) -> str:
    """.env.example: every setting commented out at its default, then the docker-compose variables."""
    lines = [
        f"# Every convo setting, generated from config/settings.py by `{GENERATOR}`; do not edit by hand.",
        "# Copy it (cp .env.example .env) and uncomment what you change. convo reads .env from the working",
        "# directory; docker compose passes it to every service and fills ${...} in docker-compose.yml from it.",
        "# Lists and maps are JSON. Secrets go here or in the environment, never in a committed file.",
        "# Reference: docs/configuration.md",
    ]
    for sec in secs:
        if not sec.fields:
            continue
        lines += ["", f"# ---- [{_anchor(sec)}] {sec.summary}"]
        for f in sec.fields:
            note = f.type + (f", {f.constraints}" if f.constraints else "")
            if f.secret:
                note += ", secret"
            lines.append(f"# {f.description} ({note})" if f.description else f"# ({note})")
            lines.append(f"# {f.env}={_env_value(f.default)}")
    settings_env = {f.env for sec in secs for f in sec.fields}
    compose_only = [v for v in compose_vars if v.name not in settings_env]  # a setting is listed once, above
    if compose_only:
        lines += ["", "# ---- docker compose only: variables docker-compose.yml interpolates (not convo settings)"]
        for v in compose_only:
            if v.description:
                lines.append(f"# {v.description}")
            if v.required:
                lines.append(f"# (required by docker-compose.yml)\n{v.name}=")
            else:
                lines.append(f"# {v.name}={v.default or ''}")
    return "\n".join(lines) + "\n"


def generated(root: Path = ROOT, settings_cls: type[BaseModel] = Settings) -> dict[Path, str]:
    """Relative path -> the content it must have."""
    secs = sections(settings_cls)
    return {
        DOC_PATH: render_markdown(secs),
        ENV_PATH: render_env(secs, compose_variables(root / COMPOSE_PATH)),
    }


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stale(root: Path = ROOT, settings_cls: type[BaseModel] = Settings) -> list[Path]:
    """The generated files under `root` that differ from what the Settings model gives now."""
    out = []
    for rel, text in generated(root, settings_cls).items():
        path = root / rel
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(rel)
    return out


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, verify) docs/configuration.md and .env.example; return the exit code."""
    parser = argparse.ArgumentParser(prog=GENERATOR, description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale; write nothing")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    missing = undocumented(sections())
    if missing:
        print(f"warning: settings without a description (add a # comment or Field(description=...)): "
              f"{', '.join(missing)}", file=sys.stderr)
    if args.check:
        bad = stale(args.root)
        for rel in bad:
            print(f"{rel}: stale; regenerate it with `{GENERATOR}`", file=sys.stderr)
        return 1 if bad else 0
    for rel, text in generated(args.root).items():
        _write_atomic(args.root / rel, text)
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
