"""docker-compose.yml and docker/: valid Compose, real `convo` commands, real settings, images split by need."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import typer
import typer.main
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = Path(__file__).parent / "fixtures" / "compose" / "compose_spec.json"

# Commands other branches add; until their module is merged here, a missing command is an expected failure.
# Once the module exists the check is strict (and these lines can go).
PENDING = {
    ("serve", "worker"): "convo/commands/worker.py",
    ("serve", "telegram"): "convo/commands/bots.py",
    ("serve", "discord"): "convo/commands/bots.py",
    ("serve", "feedback"): "convo/commands/feedback.py",
    ("serve", "scheduler"): "convo/commands/feedback.py",
}
SLIM = ("telegram", "discord", "feedback", "api")  # must start without torch
ML = ("worker", "scheduler")
HEAVY = ("torch", "transformers", "peft", "trl")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _validator():
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft201909Validator.check_schema(schema)  # the draft its $schema names
    return jsonschema.Draft201909Validator(schema)


def _command_problem(root, argv: list[str]) -> str | None:
    """Why `argv` (a compose `command`) is not a real command of the click tree `root`; None when it is."""
    if not argv or argv[0] != "convo":
        return f"does not start with convo: {argv}"
    cmd, path, rest = root, [], list(argv[1:])
    while rest and hasattr(cmd, "commands") and not rest[0].startswith("-"):
        name = rest.pop(0)
        if name not in cmd.commands:
            return f"no command `convo {' '.join([*path, name])}`"
        cmd, path = cmd.commands[name], [*path, name]
    if hasattr(cmd, "commands"):
        return f"`convo {' '.join(path)}` is a group, not a command"
    options = {o: p for p in cmd.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)}
    arguments = [p for p in cmd.params if p.param_type_name == "argument"]
    positional = 0
    while rest:
        token = rest.pop(0)
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            if name not in options:
                return f"`convo {' '.join(path)}` has no option {name}"
            if "=" not in token and not options[name].is_flag and not options[name].count:
                if not rest:
                    return f"option {name} needs a value"
                rest.pop(0)
        else:
            positional += 1
    if positional > len(arguments):
        return f"`convo {' '.join(path)}` takes {len(arguments)} argument(s), got {positional}"
    return None


def _convo_services(compose: dict) -> dict[str, list[str]]:
    return {name: svc["command"] for name, svc in compose["services"].items()
            if isinstance(svc.get("command"), list) and svc["command"][:1] == ["convo"]}


# ---------------------------------------------------------------- the Compose specification


def test_compose_file_follows_the_compose_spec(compose):
    errors = sorted(_validator().iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("breakage", [
    lambda c: c["services"]["worker"].update(gpus_typo=1),
    lambda c: c["services"]["redis"]["healthcheck"].update(test=42),
    lambda c: c["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0].update(driver=["x"]),
    lambda c: c.update(volumez={}),
])
def test_the_schema_check_rejects_broken_files(compose, breakage):
    broken = copy.deepcopy(compose)
    breakage(broken)
    assert list(_validator().iter_errors(broken))


def test_docker_compose_config_accepts_it(tmp_path):
    """Debian's docker-compose parses and validates the file (interpolation, env_file, build contexts)."""
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CONVO_REQUIRE_COMPOSE") == "1":
            pytest.fail("CONVO_REQUIRE_COMPOSE=1 but docker-compose is not installed (apt-get install docker-compose)")
        pytest.skip("docker-compose not installed (make test installs it as root)")
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    shutil.copytree(ROOT / "docker", tmp_path / "docker")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")  # what a user starts from: cp .env.example .env
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVO_", "COMPOSE_", "WORKER_", "REDIS_"))}
    for args in (["config", "-q"], ["--profile", "postgres", "config", "-q"]):
        proc = subprocess.run([exe, *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
    services = subprocess.run([exe, "--profile", "postgres", "config", "--services"], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=60).stdout.split()
    assert set(services) == {"redis", "worker", "telegram", "discord", "feedback", "api", "scheduler", "postgres"}


# ---------------------------------------------------------------- commands and settings are real


def test_the_command_walker_checks_a_real_typer_tree():
    """Against a Typer app shaped like ours: real paths and options pass, typos of each kind are caught."""
    app, serve = typer.Typer(), typer.Typer()

    @serve.command("worker")
    def worker(quantize: str = typer.Option("none", "--quantize"), debug: bool = typer.Option(False, "--debug")):
        """Stand-in."""

    @app.command("ask")
    def ask(persona: str, text: str = typer.Option("", "--text")):
        """Stand-in."""

    app.add_typer(serve, name="serve")
    root = typer.main.get_command(app)
    assert _command_problem(root, ["convo", "serve", "worker", "--quantize", "4bit", "--debug"]) is None
    assert _command_problem(root, ["convo", "serve", "worker", "--quantize=4bit"]) is None
    assert _command_problem(root, ["convo", "ask", "alice", "--text", "hi"]) is None
    assert "no command `convo serve wroker`" in _command_problem(root, ["convo", "serve", "wroker"])
    assert "no option --quantise" in _command_problem(root, ["convo", "serve", "worker", "--quantise", "4bit"])
    assert "is a group" in _command_problem(root, ["convo", "serve"])
    assert "takes 1 argument" in _command_problem(root, ["convo", "ask", "alice", "bob"])
    assert "needs a value" in _command_problem(root, ["convo", "serve", "worker", "--quantize"])


def test_every_service_runs_a_compose_command(compose):
    assert set(_convo_services(compose)) == {"worker", "telegram", "discord", "feedback", "api", "scheduler"}


@pytest.mark.parametrize("service", ["worker", "telegram", "discord", "feedback", "api", "scheduler"])
def test_service_command_exists_in_the_cli(compose, service):
    from convo.cli import app

    argv = [re.sub(r"\$\{[A-Za-z0-9_]+:-([^}]*)\}", r"\1", a) for a in _convo_services(compose)[service]]
    problem = _command_problem(typer.main.get_command(app), argv)
    path = tuple(a for a in argv[1:3])
    if problem and path in PENDING and not (ROOT / PENDING[path]).exists():
        pytest.xfail(f"{' '.join(argv)}: {problem}; comes with {PENDING[path]}, not merged on this branch")
    assert problem is None, f"service {service}: {problem}"


def test_compose_sets_only_real_settings(compose):
    """Every CONVO_* variable the file sets is a setting's env var (a typo would be silently ignored)."""
    from config.reference import sections
    from config.settings import Settings

    known = {f.env for s in sections() for f in s.fields}
    empty = {f"CONVO_{name.upper()}__" for name, info in Settings.model_fields.items()
             if not info.annotation.model_fields}
    checked, pending = 0, []
    for name, svc in compose["services"].items():
        for var in (svc.get("environment") or {}):
            if not var.startswith("CONVO_"):
                continue
            if var not in known and any(var.startswith(p) for p in empty):
                pending.append(var)  # its section has no fields on this branch yet
                continue
            assert var in known, f"service {name}: {var} is not a setting (see docs/configuration.md)"
            checked += 1
    assert checked >= 5
    if pending:
        pytest.xfail(f"settings not merged on this branch yet: {sorted(set(pending))}")


# ---------------------------------------------------------------- what each service needs


def test_services_get_what_they_need(compose):
    s = compose["services"]
    redis = s["redis"]
    assert redis["image"].startswith("redis:") and "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"]) and "redis-cli" in redis["healthcheck"]["test"]

    worker = s["worker"]
    assert worker["build"]["dockerfile"] == "docker/ml.Dockerfile"
    assert worker["command"][worker["command"].index("--quantize") + 1] == "${WORKER_QUANTIZE:-4bit}"
    assert "CONVO_WORKER__BASE" in worker["environment"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    mounts = {v.split(":")[1] for v in worker["volumes"]}
    assert {"/data/adapters", "/cache/huggingface"} <= mounts
    assert any(p.endswith(":9464") for p in worker["ports"]) and worker["environment"]["CONVO_WORKER__METRICS_PORT"] == "9464"

    for name in SLIM:
        assert s[name]["build"]["dockerfile"] == "docker/slim.Dockerfile", name
        assert s[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ML:
        assert s[name]["build"]["dockerfile"] == "docker/ml.Dockerfile", name
    assert s["scheduler"]["deploy"]["resources"]["reservations"]["devices"]
    assert s["postgres"]["profiles"] == ["postgres"] and "profiles" not in s["feedback"]
    api = s["api"]  # the OpenAI-compatible API: loopback on the host by default, personas read-only, healthcheck
    assert api["ports"][0].startswith("${API_PUBLISH:-127.0.0.1:") and "/healthz" in " ".join(api["healthcheck"]["test"])
    assert "adapters:/data/adapters:ro" in api["volumes"] and api["command"][:3] == ["convo", "serve", "api"]


def test_no_secret_is_written_in_the_compose_file(compose):
    """Tokens and passwords come from .env / the environment: only ${...} references may stand for them."""
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        for var, value in env.items():
            if re.search(r"TOKEN|PASSWORD|SECRET|KEY", var):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?-)?\}", str(value)), f"{name}: {var} has a literal value"
        assert svc.get("env_file", ".env") == ".env" or "image" in svc


def _stages(dockerfile: Path) -> list[str]:
    return re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", dockerfile.read_text(), re.M | re.I)


@pytest.mark.parametrize("name", ["slim", "ml"])
def test_dockerfiles_are_multi_stage_and_run_as_non_root(name):
    path = ROOT / "docker" / f"{name}.Dockerfile"
    text = path.read_text()
    assert len(_stages(path)) >= 2
    assert "COPY --from=build" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    runtime = text[text.rindex("FROM "):]
    assert "useradd" in runtime and "USER " in runtime


def test_slim_image_installs_no_ml_stack_and_the_ml_image_has_cuda_torch():
    slim = (ROOT / "docker" / "slim.Dockerfile").read_text()
    installs = re.findall(r'^RUN pip install "?([^"\s\\]+)', slim, re.M)
    assert installs == [".[bots]"]
    ml = (ROOT / "docker" / "ml.Dockerfile").read_text()
    assert re.search(r"ARG TORCH_IMAGE=pytorch/pytorch:\S+-cuda\S+", ml)
    assert '".[ml]"' in ml and "--system-site-packages" in ml


# Blocks every ML import the way the slim image lacks them, then runs the command's --help.
_NO_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {heavy!r}:
            raise ImportError(f'{{name}} is not installed in the slim image')
sys.meta_path.insert(0, Block())
from convo.cli import run
sys.exit(run({argv!r}))
"""


@pytest.mark.parametrize("argv", [["--help"]] + [["serve", s, "--help"] for s in SLIM])
def test_slim_services_start_without_torch(argv):
    """The CLI and the slim services' commands load with torch & co. unimportable, as in docker/slim.Dockerfile."""
    code = _NO_TORCH.format(heavy=set(HEAVY), argv=argv)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    path = tuple(argv[:2])
    if proc.returncode != 0 and path in PENDING and not (ROOT / PENDING[path]).exists():
        pytest.xfail(f"convo {' '.join(argv)}: comes with {PENDING[path]}, not merged on this branch")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Usage" in proc.stdout


# ---------------------------------------------------------------- docs

# Pages other branches write; a link to one of them is fine while it is missing here.
PENDING_DOCS = {"docs/ingest.md", "docs/serving.md", "docs/bots.md", "docs/learning-loop.md", "docs/base-models.md"}


def test_readme_and_docs_link_to_files_that_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path = (page.parent / target).resolve()
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            if not path.exists() and rel not in PENDING_DOCS:
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")} | PENDING_DOCS
    missing = [p for p in sorted(pages) if f"]({p})" not in readme]
    assert not missing, f"README.md does not link {missing}"


def test_readme_stays_a_short_guide():
    """The reference lives in docs/; the README is read in five minutes."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.split()) < 2000
    for heading in ("## Two commands", "## Quick start with your own chats", "```mermaid", "## Measured", "## Deploy"):
        assert heading in readme
