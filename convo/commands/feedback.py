"""The learning loop's commands: `serve feedback`, `serve scheduler`, `feedback stats|export`, `adapters
list|promote|rollback`, `retrain` and `forget`. Thin shells over training/feedback, training/versions,
training/retrain and training/scheduler; heavy imports happen inside the commands."""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from convo.commands.serve import serve_app
from errors import ConfigError

console = Console(highlight=False)
feedback_app = typer.Typer(help="The feedback store: what the owner sent, edited, liked or disliked.",
                           no_args_is_help=True)
adapters_app = typer.Typer(help="Versioned adapters: adapters/NAME/v1, v2, ... and the `current` pointer.",
                           no_args_is_help=True)


def _settings(ctx: typer.Context, **feedback_overrides):
    """Settings with the given non-None `feedback.*` overrides."""
    from convo.cli import state

    settings = state(ctx).settings
    changes = {k: v for k, v in feedback_overrides.items() if v is not None}
    if changes:
        settings = settings.model_copy(update={"feedback": settings.feedback.model_copy(update=changes)})
    return settings


def _store(settings):
    from training.feedback.store import FeedbackStore

    return FeedbackStore.from_settings(settings.feedback)


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _stop_on_signals() -> threading.Event:
    """An Event set by SIGINT/SIGTERM: the loop finishes the batch in hand, then stops."""
    stop = threading.Event()

    def handler(signum, frame):
        logging.getLogger("convo").info("signal %s: stopping after the current batch", signum)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _metrics_server(port: int | None) -> None:
    if port:
        from prometheus_client import start_http_server

        start_http_server(port)
        logging.getLogger("convo").info("metrics on :%d/metrics", port)


# ---------------------------------------------------------------- convo serve feedback / scheduler


def serve_feedback_cmd(
    ctx: typer.Context,
    db_url: Annotated[str | None, typer.Option("--db-url", help="SQLAlchemy URL of the store. \\[default: feedback.db_url = sqlite:///data/feedback.db]")] = None,
    consumer: Annotated[str | None, typer.Option("--consumer", help="Consumer name in the stream's group (keep it stable across restarts). \\[default: host name]")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", help="Serve Prometheus metrics on this port.")] = None,
) -> None:
    """Move feedback events from the Redis stream into the database (write, then ack; idempotent by event id)."""
    from inference.client import connect
    from inference.protocol import Keys
    from training.feedback.consumer import FeedbackConsumer

    settings = _settings(ctx, db_url=db_url, consumer=consumer, metrics_port=metrics_port)
    fs = settings.feedback
    _logging()
    store = _store(settings)
    client = connect(settings.redis, sync=True, block_s=fs.block_ms / 1000)
    c = FeedbackConsumer(client, store, Keys(settings.redis.prefix), consumer=fs.consumer, batch_size=fs.batch_size,
                         block_ms=fs.block_ms, claim_idle_s=fs.claim_idle_s, backoff_max_s=fs.backoff_max_s)
    _metrics_server(fs.metrics_port)
    console.print(f"feedback store: {escape(store.safe_url)} <- {escape(c.keys.feedback)} as {escape(c.consumer)} "
                  "(Ctrl-C stops)")
    try:
        c.run(_stop_on_signals())
    finally:
        client.close()
        store.close()


def serve_scheduler_cmd(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="Check every persona once, retrain the due ones, and exit.")] = False,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", help="Serve Prometheus metrics on this port.")] = None,
) -> None:
    """Retrain a persona when its new labelled feedback reaches feedback.retrain_min_events (at most every
    feedback.retrain_interval_h hours, one retrain at a time)."""
    from training.scheduler import Scheduler

    settings = _settings(ctx, metrics_port=metrics_port)
    _logging()
    store = _store(settings)
    scheduler = Scheduler(settings, store)
    try:
        if once:
            for persona, outcome in scheduler.run_once().items():
                console.print(f"{escape(persona)}: {escape(outcome)}")
            return
        _metrics_server(settings.feedback.metrics_port)
        scheduler.run(_stop_on_signals())
    finally:
        store.close()


# ---------------------------------------------------------------- convo feedback stats / export


@feedback_app.command("stats")
def stats_cmd(
    ctx: typer.Context,
    persona: Annotated[str | None, typer.Option("--persona", help="Only this persona.")] = None,
    small_edit_ratio: Annotated[float | None, typer.Option("--small-edit-ratio", min=0.0, max=1.0, help="An edit at least this similar to the draft (difflib ratio, 1 = unchanged) still counts as accepted. \\[default: feedback.small_edit_ratio = 0.8]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of the acceptance rate per week and per adapter version.")] = None,
) -> None:
    """Counts by kind and persona, and the acceptance rate (drafts sent as drafted or lightly edited) and mean edit
    similarity per week and per adapter version (versions on disk with no drafts yet included)."""
    from training.feedback.stats import feedback_stats, plot_acceptance, version_label

    settings = _settings(ctx, small_edit_ratio=small_edit_ratio)
    store = _store(settings)
    try:
        stats = feedback_stats(store, persona, settings.feedback.small_edit_ratio,
                               known_versions=_versions_on_disk(settings))
    finally:
        store.close()
    if plot is not None:
        stats["plot"] = str(plot_acceptance(stats, plot))
    if as_json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
        return
    kinds = ("shown", "sent", "edited", "liked", "disliked", "regenerated")
    table = Table(title="feedback events")
    table.add_column("persona")
    for k in kinds:
        table.add_column(k, justify="right")
    for p, c in sorted(stats["counts"].items()):
        table.add_row(escape(p), *(str(c.get(k, 0)) for k in kinds))
    console.print(table)
    acc = stats["acceptance"]
    if acc["shown"]:
        sim = acc["mean_similarity"]
        console.print(f"acceptance: [bold]{100 * acc['rate']:.1f}%[/] of {acc['shown']} drafts shown "
                      f"(sent, or edited with similarity >= {stats['small_edit_ratio']:g}); mean edit similarity "
                      + ("-" if sim is None else f"{sim:.2f}") + f" over {acc['replied']} answered")
        weekly = Table("week", "shown", "accepted", "rate", title="per week")
        for w in acc["weekly"]:
            weekly.add_row(w["week"], str(w["shown"]), str(w["accepted"]), f"{100 * w['rate']:.1f}%")
        console.print(weekly)
    else:
        console.print("no drafts shown yet")
    if acc["per_version"]:
        many = len({r["persona"] for r in acc["per_version"]}) > 1
        versions = Table("version", title="per adapter version (the one that drafted)")
        for col in ("shown", "accepted", "rate", "answered", "mean edit similarity"):
            versions.add_column(col, justify="right")
        for r in acc["per_version"]:
            versions.add_row(escape(version_label(r, many)), str(r["shown"]), str(r["accepted"]),
                             "-" if r["rate"] is None else f"{100 * r['rate']:.1f}%", str(r["replied"]),
                             "-" if r["mean_similarity"] is None else f"{r['mean_similarity']:.2f}")
        console.print(versions)
    if plot is not None:
        console.print(f"plot: {escape(stats['plot'])}")


def _versions_on_disk(settings) -> dict[str, list[str]]:
    """persona -> its adapter versions under feedback.adapters_dir (empty when the dir is missing)."""
    from inference.versions import discover
    from training.versions import version_infos

    root = settings.feedback.adapters_dir
    if not root or not Path(root).is_dir():
        return {}
    return {p: [v.version for v in version_infos(d)] for p, d in discover(root).items()}


def speaker_map(settings, persona: str):
    """Tags for context speakers, from the persona's current adapter (empty without one)."""
    from inference.adapter_meta import read_adapter_meta
    from inference.versions import resolve
    from training.feedback.export import SpeakerMap

    pdir = Path(settings.feedback.adapters_dir) / persona
    try:
        adapter_dir, _ = resolve(pdir)
    except ConfigError:
        return SpeakerMap(None, None)
    return SpeakerMap.from_meta(read_adapter_meta(adapter_dir))


@feedback_app.command("export")
def export_cmd(
    ctx: typer.Context,
    persona: Annotated[str, typer.Option("--persona", help="Whose feedback to export.")],
    out: Annotated[Path, typer.Option("--out", help="Dir for sft.jsonl, kto.jsonl and pairs.jsonl.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """Write sft.jsonl, kto.jsonl and pairs.jsonl in the dataset's prompt/completion format (TRL-ready)."""
    from training.feedback.export import ExportError, build_rows, write_export

    settings = _settings(ctx)
    store = _store(settings)
    try:
        events = [s.event for s in store.iter_events(persona=persona)]
    finally:
        store.close()
    if not events:
        raise ExportError(f"no feedback stored for persona {persona!r} (personas with feedback: see "
                          "`convo feedback stats`)")
    exported = build_rows(events, speaker_map(settings, persona))
    paths = write_export(exported, out)
    summary = {"persona": persona, "events": len(events), **exported.counts, "skipped": exported.skipped,
               "paths": {k: str(v) for k, v in paths.items()}}
    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    table = Table.grid(padding=(0, 2))
    table.add_row("events", str(len(events)))
    for k, v in exported.counts.items():
        table.add_row(k.replace("_", " "), str(v))
    for reason, n in exported.skipped.items():
        table.add_row("skipped", f"{n} ({escape(reason)})")
    for k, v in paths.items():
        table.add_row(k, escape(str(v)))
    console.print(Panel(table, title=f"feedback of {escape(persona)} exported", expand=False))


# ---------------------------------------------------------------- convo adapters


@adapters_app.command("list")
def adapters_list_cmd(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Persona (default: every persona).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Versions of each persona's adapter: parent, gate metrics, decision, and which one is current."""
    from dataclasses import asdict

    from inference.versions import discover
    from training.versions import persona_dir, version_infos

    settings = _settings(ctx)
    root = Path(settings.feedback.adapters_dir)
    dirs = {name: persona_dir(root, name)} if name else discover(root)
    listing = {p: [asdict(v) for v in version_infos(d)] for p, d in dirs.items()}
    if as_json:
        print(json.dumps(listing, indent=2, ensure_ascii=False))
        return
    if not listing:
        console.print(f"no adapters under {escape(str(root))}")
    for p, versions in listing.items():
        table = Table("", "version", "parent", "created", "status", "val NLL", "margin", title=escape(p))
        for v in versions:
            m = v["metrics"]
            table.add_row("→" if v["current"] else "", v["version"], v["parent"] or "", v["created_at"] or "",
                          v["status"] or "", _f(m.get("val_nll")), _f(m.get("margin")))
        if not versions:
            table.add_row("", "(unversioned adapter dir)", "", "", "", "", "")
        console.print(table)


def _f(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else ""


def _switch(ctx: typer.Context, name: str, version: str, verb: str) -> None:
    from training.versions import persona_dir, promote, publish_reload

    settings = _settings(ctx)
    pdir = persona_dir(Path(settings.feedback.adapters_dir), name)
    previous, new = promote(pdir, version)
    receivers = publish_reload(settings.redis, name, new)
    told = "Redis did not answer: workers switch on restart" if receivers is None else f"{receivers} worker(s) told"
    console.print(f"{verb} {escape(name)}: current {previous or '(none)'} -> [bold]{new}[/] ({told})")


@adapters_app.command("promote")
def adapters_promote_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Persona.")],
    version: Annotated[str, typer.Argument(help="Version to serve (v3 or 3).")],
) -> None:
    """Point NAME's `current` at VERSION (atomically) and tell running workers to reload."""
    _switch(ctx, name, version, "promoted")


@adapters_app.command("rollback")
def adapters_rollback_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Persona.")],
    version: Annotated[str | None, typer.Argument(help="Version to go back to (default: the current one's parent).")] = None,
) -> None:
    """Point NAME's `current` back at its parent (or VERSION) and tell running workers to reload."""
    from training.versions import persona_dir, rollback_target

    settings = _settings(ctx)
    target = rollback_target(persona_dir(Path(settings.feedback.adapters_dir), name), version)
    _switch(ctx, name, target, "rolled back")


# ---------------------------------------------------------------- convo retrain / forget


def retrain_cmd(
    ctx: typer.Context,
    persona: Annotated[str, typer.Option("--persona", help="Whose adapter to retrain (adapters/NAME).")],
    data: Annotated[Path | None, typer.Option("--data", help="The persona's dataset dir (default: the one the current version was trained on).")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model (default: the one the current version records).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", min=0.0, help="SFT passes over the new training set. \\[default: feedback.retrain_epochs = 1]")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Cap on SFT steps (-1: off). \\[default: feedback.retrain_max_steps]")] = None,
    budget: Annotated[str | None, typer.Option("--budget", help="Time budget for the SFT part, e.g. 30m: its steps are timed and capped to fit. \\[default: none, feedback.retrain_epochs decides]")] = None,
    kto_max_steps: Annotated[int | None, typer.Option("--kto-max-steps", help="Cap on KTO steps (-1: off). \\[default: feedback.kto_max_steps]")] = None,
    tolerance: Annotated[float | None, typer.Option("--tolerance", min=0.0, help="Allowed validation NLL increase, nats/token. \\[default: feedback.tolerance = 0.02]")] = None,
    publish: Annotated[bool, typer.Option("--publish/--no-publish", help="Tell running workers to reload after a promotion.")] = True,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads for torch (0: torch's choice).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
) -> None:
    """SFT from the current version on dataset + sent/edited drafts, KTO on 👍/👎, then promote only if the gate passes."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    from dataclasses import asdict

    from convo.commands.train import budget_minutes
    from training.retrain import retrain

    minutes = budget_minutes(budget)
    settings = _settings(ctx, retrain_epochs=epochs, retrain_max_steps=max_steps, kto_max_steps=kto_max_steps,
                         tolerance=tolerance)
    _logging()
    store = _store(settings)
    try:
        outcome = retrain(settings, persona, store, data_dir=data, base=base,
                          train_overrides={"budget_min": minutes} if minutes is not None else None,
                          console=Console(stderr=True) if as_json else console, publish=publish)
    finally:
        store.close()
    if as_json:
        print(json.dumps(asdict(outcome), indent=2, ensure_ascii=False, default=str))
        return
    table = Table("", "current " + outcome.parent, "candidate " + outcome.candidate)
    for key in ("val_nll", "sent_nll", "margin"):
        table.add_row(key, _f(outcome.gate["current"].get(key)), _f(outcome.gate["candidate"].get(key)))
    console.print(table)
    colour = "green" if outcome.status == "promoted" else "yellow"
    lines = [f"[{colour}]{escape(outcome.reason)}[/]", f"version: {escape(outcome.paths['version'])}"]
    if outcome.kto:
        lines.append(f"KTO: {outcome.kto['labels']} labels, {outcome.kto['steps']} steps")
    if outcome.status == "promoted":
        r = outcome.reload_receivers
        lines.append("reload: " + ("not published" if r is None else f"{r} worker(s) told"))
    console.print(Panel("\n".join(lines), title=f"retrain {escape(persona)}: {outcome.status}", expand=False))


def forget_cmd(
    ctx: typer.Context,
    persona: Annotated[str, typer.Option("--persona", help="Whose data to remove.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove a persona's feedback rows, drafts, stream entries and every adapter version."""
    import redis

    from inference.client import connect
    from inference.protocol import Keys
    from training.feedback.forget import forget_persona
    from training.versions import persona_dir, publish_reload

    settings = _settings(ctx)
    pdir = persona_dir(Path(settings.feedback.adapters_dir), persona, must_exist=False)
    if not yes and not typer.confirm(f"Remove every feedback row, draft and adapter of {persona}?"):
        raise typer.Abort()
    store = _store(settings)
    client = connect(settings.redis, sync=True)
    try:
        try:
            client.ping()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise ConfigError(f"Redis at {settings.redis.url} does not answer ({type(e).__name__}); forget needs it "
                              "to remove drafts: start Redis and run forget again") from e
        removed = forget_persona(persona, store, client, Keys(settings.redis.prefix), pdir)
    finally:
        client.close()
        store.close()
    publish_reload(settings.redis, persona, None)
    console.print(f"forgot {escape(persona)}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in removed.items()))


def register(app: typer.Typer) -> None:
    """Add `serve feedback`, `serve scheduler`, `feedback`, `adapters`, `retrain` and `forget`."""
    serve_app.command("feedback")(serve_feedback_cmd)
    serve_app.command("scheduler")(serve_scheduler_cmd)
    app.add_typer(feedback_app, name="feedback")
    app.add_typer(adapters_app, name="adapters")
    app.command("retrain")(retrain_cmd)
    app.command("forget")(forget_cmd)
