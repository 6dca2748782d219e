"""The generated configuration reference (docs/configuration.md) and .env.example stay in sync with Settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from config import reference
from config.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch):
    """No CONVO_* variable from the caller's environment leaks into Settings."""
    for name in list(os.environ):
        if name.startswith("CONVO_"):
            monkeypatch.delenv(name)


def test_committed_files_match_settings():
    stale = reference.stale(ROOT)
    assert not stale, f"{', '.join(map(str, stale))} out of date: run `python -m config.reference` and commit"


def test_every_setting_is_documented():
    missing = reference.undocumented(reference.sections())
    assert not missing, f"add a `# comment` or Field(description=...) in config/settings.py for: {missing}"


def test_every_field_appears_with_its_env_var():
    doc = (ROOT / reference.DOC_PATH).read_text(encoding="utf-8")
    env = (ROOT / reference.ENV_PATH).read_text(encoding="utf-8")
    for section, model in Settings.model_fields.items():
        assert f"## {section}" in doc
        for name in model.annotation.model_fields:
            var = f"CONVO_{section.upper()}__{name.upper()}"
            assert f"| `{name}` | `{var}` |" in doc
            assert re.search(rf"^# {var}=", env, re.M), var


def test_env_names_are_the_ones_settings_reads(clean_env, monkeypatch):
    """Setting each str field through its documented env var changes exactly that field."""
    probed = 0
    for sec in reference.sections():
        for f in sec.fields:
            if f.type not in ("str", "str | None"):
                continue
            monkeypatch.setenv(f.env, "probe-value")
            obj = Settings(_env_file=None)
            for part in f.path:
                obj = getattr(obj, part)
            assert obj == "probe-value", f.env
            monkeypatch.delenv(f.env)
            probed += 1
    assert probed >= 5


def test_env_example_values_load_as_the_defaults(tmp_path, clean_env):
    """Uncommenting every line of .env.example that has a value gives exactly the default settings."""
    text = (ROOT / reference.ENV_PATH).read_text(encoding="utf-8")
    lines = [m.group(1) for m in re.finditer(r"^# (CONVO_[A-Z0-9_]+=.+)$", text, re.M)]
    assert len(lines) > 30
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert Settings(_env_file=env_file).model_dump() == Settings(_env_file=None).model_dump()


def test_generator_follows_the_model_it_is_given(tmp_path):
    """A section and fields added to Settings (as other areas do) show up without touching the generator."""

    class PagerSettings(BaseModel):
        """`convo serve pager`: a made-up section."""

        token: SecretStr | None = None  # the pager's API token
        retries: int = Field(3, ge=0, description="attempts before giving up")
        channels: list[str] = Field(default_factory=lambda: ["ops"])
        undocumented_knob: bool = False

    class Extended(Settings):
        model_config = SettingsConfigDict(env_prefix="CONVO_", env_nested_delimiter="__")
        pager: PagerSettings = Field(default_factory=PagerSettings)

    secs = reference.sections(Extended)
    pager = next(s for s in secs if s.path == ("pager",))
    by_name = {f.path[-1]: f for f in pager.fields}
    assert by_name["retries"].env == "CONVO_PAGER__RETRIES"
    assert by_name["retries"].description == "attempts before giving up"
    assert by_name["retries"].constraints == ">= 0"
    assert by_name["token"].secret
    # The class is defined in this file, so its inline comments are read too.
    assert by_name["token"].description == "the pager's API token"
    assert reference.undocumented(secs) == ["pager.channels", "pager.undocumented_knob"]

    files = reference.generated(tmp_path, Extended)
    doc, env = files[reference.DOC_PATH], files[reference.ENV_PATH]
    assert "## pager" in doc and "| `retries` | `CONVO_PAGER__RETRIES` | `int (>= 0)` | `3` | attempts before giving up |" in doc
    assert "Secret: never logged." in doc
    assert "# CONVO_PAGER__CHANNELS='[\"ops\"]'" in env
    assert "# CONVO_PAGER__TOKEN=\n" in env
    # Stale against an empty checkout, fresh after writing, stale again after a hand edit.
    assert set(reference.stale(tmp_path, Extended)) == {reference.DOC_PATH, reference.ENV_PATH}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    assert reference.stale(tmp_path, Extended) == []
    (tmp_path / reference.ENV_PATH).write_text(env.replace("RETRIES=3", "RETRIES=4"), encoding="utf-8")
    assert reference.stale(tmp_path, Extended) == [reference.ENV_PATH]


def test_env_example_round_trips_every_kind_of_default(tmp_path, clean_env):
    """Paths, maps, lists, enums, literals, floats and secrets: uncommented example lines load as the defaults."""
    import enum
    from pathlib import Path as P
    from typing import Literal

    class Colour(enum.Enum):
        RED = "red"

    class Kinds(BaseModel):
        """Every kind of default another section may add."""

        where: P = P("adapters")  # a path
        names: dict[str, str] = Field(default_factory=lambda: {"123": "alice bob"})  # a map
        ids: list[int] = Field(default_factory=lambda: [1, 2])  # a list
        colour: Colour = Colour.RED  # an enum
        mode: Literal["a", "b c"] = "b c"  # a literal with a space
        ratio: float = 1e-4  # a float
        text: str = "has # hash and 'quotes'"  # awkward text
        token: SecretStr | None = None  # a secret

    class WithKinds(Settings):
        kinds: Kinds = Field(default_factory=Kinds)

    env = reference.render_env(reference.sections(WithKinds), [])
    lines = [m.group(1) for m in re.finditer(r"^# (CONVO_KINDS__[A-Z0-9_]+=.+)$", env, re.M)]
    assert len(lines) == 7, lines  # all but the unset secret
    (tmp_path / ".env").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert WithKinds(_env_file=tmp_path / ".env").kinds == Kinds()


def test_comments_above_and_inside_multiline_fields():
    class Commented(BaseModel):
        """Comment styles."""

        # the line above
        above: int = 1
        same: int = 2  # on the line

        multi: int = Field(
            3,  # inside the call
            ge=0,
        )
        plain: int = 4

    comments = reference.field_comments(Commented)
    assert comments == {"above": "the line above", "same": "on the line", "multi": "inside the call"}


def test_compose_variables_are_listed(tmp_path):
    (tmp_path / "docker-compose.yml").write_text(
        "services:\n  w:\n    image: x:${TAG:-latest}\n    command: [a, '${Q-4bit}', '$${NOT_A_VAR}']\n"
        "    environment:\n      B: ${NEED:?set NEED}\n      # C: ${COMMENTED}\n", encoding="utf-8")
    got = reference.compose_variables(tmp_path / "docker-compose.yml")
    assert [(v.name, v.default, v.required) for v in got] == [("TAG", "latest", False), ("Q", "4bit", False),
                                                              ("NEED", None, True)]
    assert got[0].description == ""
    env = reference.render_env([], got)
    assert "# TAG=latest" in env and "\nNEED=\n" in env


def test_check_command_exits_1_on_stale_and_names_the_file(tmp_path):
    cmd = [sys.executable, "-m", "config.reference", "--check", "--root", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    assert "docs/configuration.md: stale; regenerate it with `python -m config.reference`" in proc.stderr
    write = subprocess.run(cmd[:3] + ["--root", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert write.returncode == 0 and (tmp_path / ".env.example").is_file()
    assert not list(tmp_path.rglob("*.tmp"))
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 0, again.stderr


def test_compose_variables_of_the_real_file_are_described():
    got = reference.compose_variables(ROOT / "docker-compose.yml")
    assert {"WORKER_QUANTIZE", "REDIS_URL", "WORKER_GPU"} <= {v.name for v in got}
    assert not [v.name for v in got if not v.description], "describe them in docker-compose.yml's header"
    env = (ROOT / reference.ENV_PATH).read_text(encoding="utf-8")
    for v in got:
        assert re.search(rf"^#? ?{v.name}=", env, re.M), v.name
