"""The demo's "does v1 text like Jordan?" figures: the marker table and attribution, beside NLL in the panel.

Jordan's messages carry a planted texting style (examples/make_examples.py, training/evaluate/planted.py), so the
answer is known: a method that learned how Jordan texts writes replies with the style's markers at Jordan's rates.
Read from the evaluation stage's output (demo/eval):

    metrics.json methods[m]["markers"] / ["attribution"]  -- when `convo eval` writes those columns, taken as is
    generations.jsonl (real reply, each method's replies)  -- otherwise the marker rates are computed here with
                                                              training.evaluate.markers; attribution is then missing

Marker error is the mean absolute difference of the rates (0 = every habit at Jordan's rate; lower is better);
attribution is the share of replies a char n-gram classifier over the log's speakers names as Jordan's (higher is
better; the real held-out replies are its ceiling, 1 / speakers its chance). `verdict` compares v1 with in-context
on both and says plainly when v1 does not beat it, with the figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

METHOD_ORDER = ("base", "incontext", "retrieval", "adapter")
LABELS = {"base": "base", "incontext": "in-context", "retrieval": "retrieval", "adapter": "adapter v1"}


@dataclass(frozen=True)
class StyleFigures:
    """Marker rates of the real replies and of each method, marker error, and attribution when measured."""

    markers: tuple[str, ...]
    real: dict[str, float | None]
    rates: dict[str, dict[str, float | None]]  # method -> marker -> rate
    error: dict[str, float | None]  # method -> marker error
    error_ci: dict[str, list[float] | None] = field(default_factory=dict)
    attribution: dict[str, float | None] | None = None  # method -> top-1 accuracy (None: not measured)
    attribution_ci: dict[str, list[float] | None] = field(default_factory=dict)
    attribution_real: float | None = None  # the real held-out replies: the ceiling
    attribution_real_ci: list[float] | None = None
    attribution_chance: float | None = None  # 1 / candidates
    candidates: tuple[str, ...] = ()
    attribution_skipped: str | None = None  # why the eval skipped the column
    marker_reference: float | None = None  # another sample of the person's own replies: the floor of marker error
    prompts: int | None = None
    source: str = "convo eval"

    @property
    def methods(self) -> list[str]:
        """Methods in the demo's order (base, in-context, retrieval, adapter), then any others."""
        return [m for m in METHOD_ORDER if m in self.rates] + [m for m in self.rates if m not in METHOD_ORDER]


def _read_generations(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def style_figures(eval_dir: Path) -> StyleFigures:
    """The marker table and attribution of the evaluation in `eval_dir` (see the module docstring)."""
    from training.evaluate.markers import MARKERS, common_markers, marker_error, marker_rates

    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    methods, real_col = metrics["methods"], metrics.get("real", {})
    att = metrics.get("attribution") or {}
    measured = None
    if not att.get("skipped") and any(r.get("attribution") is not None for r in methods.values()):
        measured = {m: r.get("attribution") for m, r in methods.items()}
    common = dict(
        attribution=measured,
        attribution_ci={m: (r.get("intervals") or {}).get("attribution") for m, r in methods.items()},
        attribution_real=att.get("real"), attribution_real_ci=att.get("real_interval"),
        attribution_chance=att.get("chance"), candidates=tuple(att.get("candidates") or ()),
        attribution_skipped=att.get("skipped"), marker_reference=real_col.get("marker_reference"),
        prompts=metrics.get("prompts"),
    )
    if real_col.get("markers") and all("markers" in r and "marker_error" in r for r in methods.values()):
        return StyleFigures(
            MARKERS, dict(real_col["markers"]), {m: dict(r["markers"]) for m, r in methods.items()},
            {m: r["marker_error"] for m, r in methods.items()},
            {m: (r.get("intervals") or {}).get("marker_error") for m, r in methods.items()}, **common)

    # An eval without the marker columns (an older `convo eval`): count the markers in the replies it wrote.
    rows = _read_generations(eval_dir / "generations.jsonl")
    real = marker_rates(r["real"] for r in rows)
    rates = {m: marker_rates(reply for r in rows for reply in r["replies"].get(m, [])) for m in methods}
    return StyleFigures(MARKERS, real, rates, {m: marker_error(real, v, common_markers(real, rates.values())) for m, v in rates.items()}, {},
                        **common, source="computed from generations.jsonl")


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(ci: list | None) -> str:
    return f"{ci[0]:.2f}-{ci[1]:.2f}" if ci and len(ci) == 2 and None not in ci else ""


def marker_table(fig: StyleFigures, persona: str = "Jordan"):
    """A rich Table that fits 80 columns: one row per marker (the real replies' rate, each method's), then marker
    error and attribution, each with a row of 95% bootstrap intervals."""
    from rich import box
    from rich.table import Table

    methods = fig.methods
    table = Table(title=f"how {persona} texts: marker rates of the replies ({fig.source})", title_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True)
    table.add_column("marker")
    table.add_column(persona, justify="right")
    for m in methods:
        table.add_column(LABELS.get(m, m), justify="right")
    for i, k in enumerate(fig.markers):
        table.add_row(k, _f(fig.real.get(k)), *(_f(fig.rates[m].get(k)) for m in methods),
                      end_section=i == len(fig.markers) - 1)
    table.add_row("[bold]marker error[/]", _f(fig.marker_reference, 3),
                  *(f"[bold]{_f(fig.error.get(m), 3)}[/]" for m in methods))
    if any(fig.error_ci.get(m) for m in methods):
        table.add_row("  95% interval", "", *(_ci(fig.error_ci.get(m)) for m in methods), style="dim")
    if fig.attribution is not None:
        table.add_row("[bold]attribution[/]", _f(fig.attribution_real),
                      *(f"[bold]{_f(fig.attribution.get(m))}[/]" for m in methods))
        table.add_row("  95% interval", _ci(fig.attribution_real_ci), *(_ci(fig.attribution_ci.get(m)) for m in methods),
                      style="dim")
    caption = (f"{persona}: the real held-out replies (marker error: another sample of {persona}'s replies, the "
               "floor). Marker error: mean |rate - real rate|, lower is closer.")
    if fig.attribution is not None and fig.attribution_chance is not None:
        caption += (f" Attribution: share of replies named {persona} among the log's {len(fig.candidates)} speaker "
                    f"ids ({', '.join(fig.candidates)}), higher is closer; chance {fig.attribution_chance:.2f}.")
    elif fig.attribution_skipped:
        caption += f" Attribution skipped: {fig.attribution_skipped}."
    table.caption, table.caption_justify = caption, "left"
    return table


def verdict(fig: StyleFigures, persona: str = "Jordan") -> tuple[bool, str]:
    """(v1 beats in-context on marker error and attribution, one sentence with the figures)."""
    e_a, e_i = fig.error.get("adapter"), fig.error.get("incontext")
    parts, ok = [], True
    if e_a is None or e_i is None:
        return False, "marker error not measured for both adapter v1 and in-context"
    better = e_a < e_i
    ok &= better
    parts.append(f"marker error {e_a:.3f} vs in-context {e_i:.3f} (lower is closer: v1 {'better' if better else 'not better'})")
    a_a = fig.attribution.get("adapter") if fig.attribution else None
    a_i = fig.attribution.get("incontext") if fig.attribution else None
    if a_a is None or a_i is None:
        ok = False
        why = fig.attribution_skipped or "this `convo eval` has no attribution column"
        parts.append(f"attribution missing ({why})")
    else:
        better = a_a > a_i
        ok &= better
        extra = "" if fig.attribution_real is None else f"; real replies {fig.attribution_real:.2f}"
        extra += "" if fig.attribution_chance is None else f", chance {fig.attribution_chance:.2f}"
        parts.append(f"attribution {a_a:.2f} vs in-context {a_i:.2f} (higher is closer: v1 "
                     f"{'better' if better else 'not better'}{extra})")
    head = (f"adapter v1 beats in-context on how {persona} texts" if ok else
            "adapter v1 does NOT beat in-context on both marker error and attribution within this demo's budget")
    on = f" (point estimates on {fig.prompts} validation prompts; intervals in the table)" if fig.prompts else ""
    return ok, f"{head}: " + "; ".join(parts) + on
