"""`convo feedback stats`: counts by kind and persona, and the acceptance rate per ISO week.

A draft is *shown* when any event mentions it as shown, sent or edited; it is *accepted* when it was sent as
drafted or edited only a little (difflib ratio of the owner's text to the draft >= `small_edit_ratio`). A draft
counts in the week it was first shown. The acceptance rate is the number to watch: better adapters get sent more.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from inference.protocol import FeedbackEvent


def edit_similarity(draft: list[str], final_text: str) -> float:
    """difflib ratio of the owner's text to the draft (messages joined by newlines): 1.0 is unchanged."""
    return difflib.SequenceMatcher(None, "\n".join(draft), final_text, autojunk=False).ratio()


def acceptance(events: Iterable[FeedbackEvent], small_edit_ratio: float) -> dict:
    """Overall and weekly acceptance: {shown, accepted, rate, weekly: [{week, shown, accepted, rate}]}."""
    first_seen: dict[str, object] = {}
    accepted: set[str] = set()
    for ev in events:
        if ev.kind not in ("shown", "sent", "edited"):
            continue
        key = f"{ev.persona}\0{ev.draft_id}"
        if key not in first_seen or ev.ts < first_seen[key]:
            first_seen[key] = ev.ts
        if ev.kind == "sent" or (
            ev.kind == "edited" and ev.candidate and edit_similarity(ev.candidate, ev.final_text or "") >= small_edit_ratio
        ):
            accepted.add(key)
    weeks: dict[str, list[int]] = {}
    for key, ts in first_seen.items():
        y, w, _ = ts.isocalendar()
        cell = weeks.setdefault(f"{y}-W{w:02d}", [0, 0])
        cell[0] += 1
        cell[1] += key in accepted
    weekly = [{"week": wk, "shown": s, "accepted": a, "rate": a / s} for wk, (s, a) in sorted(weeks.items())]
    shown = len(first_seen)
    return {"shown": shown, "accepted": len(accepted), "rate": len(accepted) / shown if shown else None,
            "weekly": weekly}


def feedback_stats(store, persona: str | None, small_edit_ratio: float) -> dict:
    """Everything `convo feedback stats` shows."""
    counts = store.counts(persona)
    kinds = ("shown", "sent", "edited", "liked", "disliked", "regenerated")
    totals = {k: sum(c.get(k, 0) for c in counts.values()) for k in kinds}
    events = [s.event for s in store.iter_events(persona=persona, kinds=("shown", "sent", "edited"))]
    return {
        "persona": persona,
        "counts": counts,
        "totals": totals,
        "acceptance": acceptance(events, small_edit_ratio),
        "small_edit_ratio": small_edit_ratio,
    }


def plot_acceptance(stats: dict, png_path: Path | str) -> Path:
    """A PNG of the weekly acceptance rate (bars: drafts shown), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    weekly = stats["acceptance"]["weekly"]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
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
