"""`convo feedback stats`: counts by kind and persona, and the acceptance rate per ISO week and per adapter version.

A draft is *shown* when any event mentions it as shown, sent or edited; it is *accepted* when it was sent as
drafted or edited only a little: its *edit similarity* (difflib ratio of the owner's text to the draft, 1.0 when
sent as drafted) is >= `feedback.small_edit_ratio` (0.8 by default: "be there soon" -> "be there soon!" is 0.96,
"nah, next week" against the draft "omg yes 🙌 / be there soon" 0.27). A draft counts in the week it was first shown, and
under the adapter version that drafted it (the events' `adapter_version`; `None` for the bare base or an
unversioned adapter dir). An edit of an empty draft has similarity 0.0 and is never accepted: nothing was drafted.

Per version there are two numbers: the acceptance rate over drafts shown, and the mean edit similarity over drafts
the owner answered (sent or edited; a draft shown and left alone has no similarity). They are the numbers an owner
watches after a promotion: a better version gets sent more, and edited less. A version known from the adapters
dir with no drafts yet has a row of zeros (rate and similarity None), not no row.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from inference.protocol import FeedbackEvent
from inference.versions import version_number


def edit_similarity(draft: list[str], final_text: str) -> float:
    """difflib ratio of the owner's text to the draft (messages joined by newlines): 1.0 is unchanged."""
    return difflib.SequenceMatcher(None, "\n".join(draft), final_text, autojunk=False).ratio()


@dataclass(frozen=True, slots=True)
class DraftOutcome:
    """One draft as the stats see it: who drafted it, when it was first shown, how close the owner's reply was."""

    persona: str
    draft_id: str
    version: str | None  # the adapter version that drafted it
    first_seen: datetime
    similarity: float | None  # the owner's reply against the draft (max over its sent/edited events); None: no reply
    accepted: bool


def draft_outcomes(events: Iterable[FeedbackEvent], small_edit_ratio: float) -> list[DraftOutcome]:
    """Every draft shown, sent or edited, with its version, first time shown and edit similarity."""
    cells: dict[tuple[str, str], dict] = {}
    for ev in events:
        if ev.kind not in ("shown", "sent", "edited"):
            continue
        cell = cells.setdefault((ev.persona, ev.draft_id), {"ts": ev.ts, "version": None, "sim": None, "ok": False})
        cell["ts"] = min(cell["ts"], ev.ts)
        cell["version"] = cell["version"] or ev.adapter_version  # every event of a draft carries the same one
        if ev.kind == "shown":
            continue
        if ev.kind == "sent":
            sim = 1.0
        elif ev.candidate:
            sim = edit_similarity(ev.candidate, ev.final_text or "")
        else:
            sim = 0.0  # the owner wrote a reply where the draft was empty: nothing of it was kept
        cell["sim"] = sim if cell["sim"] is None else max(cell["sim"], sim)
        cell["ok"] = cell["ok"] or ev.kind == "sent" or (bool(ev.candidate) and sim >= small_edit_ratio)
    return [DraftOutcome(p, d, c["version"], c["ts"], c["sim"], c["ok"]) for (p, d), c in cells.items()]


def _version_key(version: str | None) -> tuple[int, str]:
    n = version_number(version) if version else None
    return (-1 if version is None else n if n is not None else 1 << 30, version or "")


def per_version(outcomes: Sequence[DraftOutcome], known: Mapping[str, Sequence[str]] | None = None) -> list[dict]:
    """Acceptance and mean edit similarity per (persona, adapter version), oldest version first; the versions in
    `known` (persona -> versions on disk) get a row even with no drafts."""
    groups: dict[tuple[str, str | None], list[DraftOutcome]] = {}
    for persona, versions in (known or {}).items():
        for v in versions:
            groups.setdefault((persona, v), [])
    for o in outcomes:
        groups.setdefault((o.persona, o.version), []).append(o)
    rows = []
    for (persona, version), group in sorted(groups.items(), key=lambda kv: (kv[0][0], _version_key(kv[0][1]))):
        sims = [o.similarity for o in group if o.similarity is not None]
        accepted = sum(o.accepted for o in group)
        rows.append({
            "persona": persona, "version": version, "shown": len(group), "accepted": accepted,
            "rate": accepted / len(group) if group else None, "replied": len(sims),
            "mean_similarity": sum(sims) / len(sims) if sims else None,
            "first_shown": min(o.first_seen for o in group).isoformat() if group else None,
            "last_shown": max(o.first_seen for o in group).isoformat() if group else None,
        })
    return rows


def acceptance(events: Iterable[FeedbackEvent], small_edit_ratio: float,
               known_versions: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Overall, weekly and per-version acceptance: {shown, accepted, rate, mean_similarity, weekly: [{week, shown,
    accepted, rate}], per_version: [{persona, version, shown, accepted, rate, replied, mean_similarity, ...}]}."""
    outcomes = draft_outcomes(events, small_edit_ratio)
    weeks: dict[str, list[int]] = {}
    for o in outcomes:
        y, w, _ = o.first_seen.isocalendar()
        cell = weeks.setdefault(f"{y}-W{w:02d}", [0, 0])
        cell[0] += 1
        cell[1] += o.accepted
    weekly = [{"week": wk, "shown": s, "accepted": a, "rate": a / s} for wk, (s, a) in sorted(weeks.items())]
    shown, accepted = len(outcomes), sum(o.accepted for o in outcomes)
    sims = [o.similarity for o in outcomes if o.similarity is not None]
    return {"shown": shown, "accepted": accepted, "rate": accepted / shown if shown else None,
            "replied": len(sims), "mean_similarity": sum(sims) / len(sims) if sims else None,
            "weekly": weekly, "per_version": per_version(outcomes, known_versions)}


def feedback_stats(store, persona: str | None, small_edit_ratio: float,
                   known_versions: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Everything `convo feedback stats` shows; `known_versions` (persona -> versions on disk) adds rows for
    versions that drafted nothing yet."""
    counts = store.counts(persona)
    kinds = ("shown", "sent", "edited", "liked", "disliked", "regenerated")
    totals = {k: sum(c.get(k, 0) for c in counts.values()) for k in kinds}
    events = [s.event for s in store.iter_events(persona=persona, kinds=("shown", "sent", "edited"))]
    if persona is not None and known_versions:
        known_versions = {p: v for p, v in known_versions.items() if p == persona}
    return {
        "persona": persona,
        "counts": counts,
        "totals": totals,
        "acceptance": acceptance(events, small_edit_ratio, known_versions),
        "small_edit_ratio": small_edit_ratio,
    }


def version_label(row: dict, many_personas: bool) -> str:
    """"v2" (or "jordan v2" when several personas are shown; "no version" for the bare base or an unversioned
    adapter dir)."""
    v = row["version"] or "no version"
    return f"{row['persona']} {v}" if many_personas else v


def plot_acceptance(stats: dict, png_path: Path | str) -> Path:
    """A PNG of the acceptance rate per week and per adapter version (with mean edit similarity; bars: drafts
    shown), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    acc = stats["acceptance"]
    weekly, versions = acc["weekly"], acc.get("per_version", [])
    fig, (ax, axv) = plt.subplots(1, 2, figsize=(12, 3.8), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    if weekly:
        x = list(range(len(weekly)))
        ax2 = ax.twinx()
        ax2.bar(x, [w["shown"] for w in weekly], color="#dddddd", label="drafts shown")
        ax2.set_ylabel("drafts shown")
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.plot(x, [100 * w["rate"] for w in weekly], marker="o", color="#1f77b4", label="acceptance")
        ax.set_xticks(x, [w["week"] for w in weekly], rotation=45, ha="right")
    else:
        ax.text(0.5, 0.5, "no drafts shown yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accepted (%)")
    who = stats.get("persona") or "all personas"
    ax.set_title(f"draft acceptance per week ({who})")
    ax.grid(alpha=0.3)

    if versions:
        many = len({r["persona"] for r in versions}) > 1
        x = list(range(len(versions)))
        width = 0.4
        rate = [100 * r["rate"] if r["rate"] is not None else 0 for r in versions]
        sim = [100 * r["mean_similarity"] if r["mean_similarity"] is not None else 0 for r in versions]
        axv.bar([i - width / 2 for i in x], rate, width, color="#1f77b4", label="accepted (%)")
        axv.bar([i + width / 2 for i in x], sim, width, color="#ff7f0e", label="mean edit similarity (x100)")
        for i, r in enumerate(versions):
            axv.text(i, 102, f"n={r['shown']}", ha="center", va="bottom", fontsize=8)
        axv.set_xticks(x, [version_label(r, many) for r in versions], rotation=45 if many else 0,
                       ha="right" if many else "center")
        axv.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    else:
        axv.text(0.5, 0.5, "no adapter versions yet", ha="center", va="center", transform=axv.transAxes)
    axv.set_ylim(0, 112)
    axv.set_title("per adapter version (n: drafts shown)")
    axv.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{png_path.name}.", suffix=".png", dir=png_path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return png_path
