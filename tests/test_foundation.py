"""Config, CLI shell and import hygiene."""

import subprocess
import sys

import pytest

from config.settings import load_settings
from convo.cli import run
from errors import ConfigError


def test_env_overrides_toml_and_defaults(tmp_path, monkeypatch):
    toml = tmp_path / "c.toml"
    toml.write_text('[dataset]\nsession_gap_min = 30\ncontext_messages = 4\n[train]\nlora_r = 4\n')
    monkeypatch.setenv("CONVO_TRAIN__LORA_R", "8")
    s = load_settings(toml)
    assert s.dataset.session_gap_min == 30
    assert s.dataset.context_messages == 4
    assert s.train.lora_r == 8  # env beats file
    assert s.train.lora_alpha == 32  # default


def test_config_env_var_names_file(tmp_path, monkeypatch):
    toml = tmp_path / "c.toml"
    toml.write_text('[generate]\nn = 7\n')
    monkeypatch.setenv("CONVO_CONFIG", str(toml))
    assert load_settings().generate.n == 7


def test_bad_config_is_one_clear_error(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[train]\nlora_r = "many"\n')
    with pytest.raises(ConfigError, match="train.lora_r"):
        load_settings(toml)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml")


def test_cli_bad_config_exits_2(tmp_path, capsys):
    code = run(["--config", str(tmp_path / "nope.toml"), "stats", "x"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.toml" in err and "Traceback" not in err


def test_help_lists_commands(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("ingest", "stats", "dataset", "train", "simulate", "eval"):
        assert cmd in out


@pytest.mark.parametrize("module", ["bot", "config", "convo.cli", "inference.prompt_format", "inference"])
def test_light_modules_do_not_import_torch(module):
    code = f"import {module}, sys; bad = [m for m in ('torch','transformers','peft','trl') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_out_of_range_numbers_are_one_line_errors(tmp_path, capsys, monkeypatch):
    # CLI flags are range-checked by typer, settings by pydantic: both exit 2 without a traceback.
    assert run(["simulate", "--adapter", str(tmp_path), "--n", "0", "hi"]) == 2
    assert "--n" in capsys.readouterr().err
    assert run(["train", "--data", str(tmp_path), "--base", "x", "--out", str(tmp_path / "o"), "--lora-r", "0"]) == 2
    assert "--lora-r" in capsys.readouterr().err
    monkeypatch.setenv("CONVO_GENERATE__TOP_P", "1.5")
    with pytest.raises(ConfigError, match="generate.top_p"):
        load_settings()


def _project_imports(path):
    """The top-level project packages a source file imports (ast, so strings and comments do not count)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & {"bot", "inference", "training", "config", "convo", "errors"}


def test_error_family_is_the_ground_floor():
    """errors.py imports nothing of the project, and no layer below the CLI imports the CLI package."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert _project_imports(root / "errors.py") == set()
    upward = [
        str(p.relative_to(root))
        for layer in ("bot", "inference", "training", "config")
        for p in (root / layer).rglob("*.py")
        if "convo" in _project_imports(p)
    ]
    assert upward == [], f"these modules import the CLI package: {upward}"
