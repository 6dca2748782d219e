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
    attribution_chance: float | None = None
    source: str = "convo eval"

    @property
    def methods(self) -> list[str]:
        """Methods in the demo's order (base, in-context, retrieval, adapter), then any others."""
        return [m for m in METHOD_ORDER if m in self.rates] + [m for m in self.rates if m not in METHOD_ORDER]


def _read_generations(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _marker_column(res: dict) -> dict | None:
    """The eval's marker column of one method, as {rates, error, error_ci, real}, when it has one."""
    col = res.get("markers")
    if not isinstance(col, dict):
        return None
    rates = col.get("rates") or col.get("generated")
    error = col.get("error", res.get("marker_error"))
    if rates is None or error is None:
        return None
    ci = col.get("error_ci") or (res.get("intervals") or {}).get("marker_error")
    return {"rates": rates, "error": error, "error_ci": ci, "real": col.get("real")}


def _attribution_column(res: dict) -> tuple[float | None, list | None, float | None, float | None]:
    """(accuracy, interval, real replies' accuracy, chance) of one method's attribution column."""
    col = res.get("attribution")
    if isinstance(col, dict):
        acc = col.get("accuracy", col.get("top1"))
        ci = col.get("ci") or col.get("interval") or (res.get("intervals") or {}).get("attribution")
        return acc, ci, col.get("real", col.get("ceiling")), col.get("chance")
    if isinstance(col, (int, float)):
        return float(col), (res.get("intervals") or {}).get("attribution"), None, None
    return None, None, None, None


def style_figures(eval_dir: Path) -> StyleFigures:
    """The marker table and attribution of the evaluation in `eval_dir` (see the module docstring)."""
    from training.evaluate.markers import MARKERS, marker_error, marker_rates

    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    methods = metrics["methods"]
    columns = {m: _marker_column(r) for m, r in methods.items()}
    attribution: dict[str, float | None] = {}
    attribution_ci: dict[str, list | None] = {}
    ceiling = chance = None
    for m, r in methods.items():
        acc, ci, real_acc, ch = _attribution_column(r)
        attribution[m], attribution_ci[m] = acc, ci
        ceiling = ceiling if real_acc is None else real_acc
        chance = chance if ch is None else ch
    real_col = metrics.get("real", {})
    ceiling = real_col.get("attribution", {}).get("accuracy", ceiling) if isinstance(
        real_col.get("attribution"), dict) else ceiling
    measured = attribution if any(v is not None for v in attribution.values()) else None

    if all(c is not None for c in columns.values()):
        real = next((c["real"] for c in columns.values() if c.get("real")), None)
        real = real or real_col.get("markers", {}).get("rates") or real_col.get("markers")
        markers = tuple(k for k in MARKERS if k in (real or columns[next(iter(columns))]["rates"]))
        return StyleFigures(markers, dict(real or {}), {m: c["rates"] for m, c in columns.items()},
                            {m: c["error"] for m, c in columns.items()},
                            {m: c["error_ci"] for m, c in columns.items()}, measured, attribution_ci, ceiling, chance)

    # The eval has no marker column: count the markers in the replies it wrote.
    rows = _read_generations(eval_dir / "generations.jsonl")
    real = marker_rates(r["real"] for r in rows)
    rates = {m: marker_rates(reply for r in rows for reply in r["replies"].get(m, [])) for m in methods}
    return StyleFigures(MARKERS, real, rates, {m: marker_error(real, v) for m, v in rates.items()}, {}, measured,
                        attribution_ci, ceiling, chance, source="computed from generations.jsonl")


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(ci: list | None) -> str:
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and len(ci) == 2 and None not in ci else ""


def marker_table(fig: StyleFigures, persona: str = "Jordan"):
    """A rich Table: one row per marker (the real replies' rate, each method's), then marker error and attribution."""
    from rich.table import Table

    methods = fig.methods
    table = Table(title=f"how {persona} texts: marker rates of the replies ({fig.source})", title_justify="left")
    table.add_column("marker")
    table.add_column(f"{persona} (real)", justify="right")
    for m in methods:
        table.add_column(LABELS.get(m, m), justify="right")
    for k in fig.markers:
        table.add_row(k, _f(fig.real.get(k)), *(_f(fig.rates[m].get(k)) for m in methods))
    table.add_row("[bold]marker error[/]", "0", *(f"[bold]{_f(fig.error.get(m), 3)}[/]{_ci(fig.error_ci.get(m))}"
                                                  for m in methods), end_section=True)
    if fig.attribution is not None:
        table.add_row("[bold]attribution[/]", _f(fig.attribution_real),
                      *(f"[bold]{_f(fig.attribution.get(m))}[/]{_ci(fig.attribution_ci.get(m))}" for m in methods))
    return table


def verdict(fig: StyleFigures, persona: str = "Jordan") -> tuple[bool, str]:
    """(v1 beats in-context on marker error and attribution, one sentence with the figures)."""
    e_a, e_i = fig.error.get("adapter"), fig.error.get("incontext")
    parts, ok = [], True
    if e_a is None or e_i is None:
        return False, "marker error not measured for both adapter v1 and in-context"
    better = e_a < e_i
    ok &= better
    parts.append(f"marker error {e_a:.3f} vs in-context {e_i:.3f} ({'lower: better' if better else 'not lower'})")
    a_a = fig.attribution.get("adapter") if fig.attribution else None
    a_i = fig.attribution.get("incontext") if fig.attribution else None
    if a_a is None or a_i is None:
        ok = False
        parts.append("attribution missing (this `convo eval` has no attribution column)")
    else:
        better = a_a > a_i
        ok &= better
        extra = "" if fig.attribution_real is None else f"; real replies {fig.attribution_real:.2f}"
        extra += "" if fig.attribution_chance is None else f", chance {fig.attribution_chance:.2f}"
        parts.append(f"attribution {a_a:.2f} vs in-context {a_i:.2f} ({'higher: better' if better else 'not higher'}"
                     f"{extra})")
    head = (f"adapter v1 beats in-context on how {persona} texts" if ok else
            "adapter v1 does NOT beat in-context on both within this demo's budget")
    return ok, f"{head}: " + "; ".join(parts)
