"""The self-contained HTML report: metrics table, inline SVG plots, side-by-side replies filterable by method.

No external resources: styles, plots (matplotlib SVG, text kept as text) and the filter script are inline, so
the file renders offline.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

from training.evaluate import markers as K
from training.evaluate import metrics as M

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}thead{background:#f3f3f3}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plot{flex:1 1 330px}.plot svg{width:100%;height:auto}
.cmp{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:1em 0}
.cmp pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em;margin:.3em 0;font-size:12px}
.reply{margin:.3em 0}.reply b{display:inline-block;min-width:11em}.real b{color:#0a6}
.ci{color:#777;font-size:11px}.hidden{display:none}.wide{overflow-x:auto}#filters label{margin-right:1em}.note{color:#666;font-size:12px}
"""

_JS = """
(function(){
  var methods = JSON.parse(document.getElementById('methods-data').textContent);
  var box = document.getElementById('filters');
  function apply(){
    var on = {};
    box.querySelectorAll('input').forEach(function(i){ on[i.value] = i.checked; });
    document.querySelectorAll('.reply[data-method]').forEach(function(el){
      el.classList.toggle('hidden', !on[el.getAttribute('data-method')]);
    });
    var shown = methods.filter(function(m){ return on[m]; }).length;
    document.getElementById('filter-status').textContent =
      document.querySelectorAll('.cmp').length + ' comparisons, ' + shown + ' of ' + methods.length + ' methods shown';
  }
  methods.forEach(function(m){
    var label = document.createElement('label');
    var input = document.createElement('input');
    input.type = 'checkbox'; input.checked = true; input.value = m; input.className = 'method-filter';
    input.addEventListener('change', apply);
    label.appendChild(input); label.appendChild(document.createTextNode(' ' + m));
    box.appendChild(label);
  });
  apply();
  document.body.setAttribute('data-ready', '1');
})();
"""


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _plots(metrics: dict, comparisons: list[dict], train_log: Path | None) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "convo", "font.size": 9})
    out = []
    methods = list(metrics["methods"])

    fig, ax = plt.subplots(figsize=(5, 3.2))
    series = {"real": [len(M.words(m)) for c in comparisons for m in c["real"]]}
    for name in methods:
        series[name] = [len(M.words(m)) for c in comparisons for r in c["replies"][name] for m in r]
    top = max([max(v) for v in series.values() if v] + [1])
    bins = list(range(0, min(top, 40) + 2))
    for name, vals in series.items():
        if vals:
            ax.hist([min(v, bins[-1] - 1) for v in vals], bins=bins, histtype="step", density=True,
                    label=name, linewidth=2.2 if name == "real" else 1.2)
    ax.set_xlabel("words per message (last bin: more)")
    ax.set_ylabel("share of messages")
    ax.legend(fontsize=7)
    out.append(("Message length distributions", _svg(fig)))

    for key, title, label in (
        ("nll_per_token", "Likelihood of the real replies (lower is better)", "NLL per completion token"),
        ("semantic", "Meaning: semantic similarity to the real reply (higher is better)", "cosine (all-MiniLM-L6-v2)"),
        ("auc", "Distinguishability from real replies (0.5 is best)", "classifier ROC AUC"),
    ):
        bars = [(n, _value(r, key), (r.get("intervals") or {}).get(key)) for n, r in metrics["methods"].items()]
        bars = [b for b in bars if b[1] is not None]
        if not bars:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        # Error bars: the bootstrap 95% interval over prompts (asymmetric; none where it was not computed).
        err = [[max(v - iv[0], 0.0) if iv else 0.0 for _, v, iv in bars],
               [max(iv[1] - v, 0.0) if iv else 0.0 for _, v, iv in bars]]
        ax.bar([n for n, _, _ in bars], [v for _, v, _ in bars], color="#4c78a8", yerr=err, capsize=4,
               ecolor="#333")
        if key == "auc":
            ax.axhline(0.5, color="#0a6", linestyle="--", linewidth=1)
            ax.set_ylim(0, 1)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=25)
        out.append((title + " · bars: 95% bootstrap interval", _svg(fig)))

    out += _marker_plots(metrics)

    curve = read_train_log(train_log) if train_log else {}
    if curve:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        draw_loss(ax, curve)
        out.append(("Adapter training loss · validation: the same held-out samples at every evaluation", _svg(fig)))
    return out


def _bars(ax, bars) -> None:
    """Bars with their bootstrap 95% interval as asymmetric error bars (none where it was not computed)."""
    err = [[max(v - iv[0], 0.0) if iv else 0.0 for _, v, iv in bars],
           [max(iv[1] - v, 0.0) if iv else 0.0 for _, v, iv in bars]]
    ax.bar([n for n, _, _ in bars], [v for _, v, _ in bars], color="#4c78a8", yerr=err, capsize=4, ecolor="#333")
    ax.tick_params(axis="x", labelrotation=25)


def _marker_plots(metrics: dict) -> list[tuple[str, str]]:
    """Marker error per method (the floor: another sample of the person's replies) and attribution per method
    (the ceiling: the real held-out replies; chance: 1 / candidates)."""
    import matplotlib.pyplot as plt

    out = []
    methods = metrics["methods"]
    bars = [(n, r["marker_error"], (r.get("intervals") or {}).get("marker_error")) for n, r in methods.items()
            if r.get("marker_error") is not None]
    if bars:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        _bars(ax, bars)
        ref = metrics["real"].get("marker_reference")
        if ref is not None:
            ax.axhline(ref, color="#0a6", linestyle="--", linewidth=1, label="another sample of the person")
            ax.legend(fontsize=7)
        ax.set_ylabel("mean |rate - real rate| over markers")
        out.append(("Texting habits: marker error (lower is better) · bars: 95% bootstrap interval", _svg(fig)))
    att = metrics.get("attribution") or {}
    bars = [(n, r["attribution"], (r.get("intervals") or {}).get("attribution")) for n, r in methods.items()
            if r.get("attribution") is not None]
    if bars and not att.get("skipped"):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        _bars(ax, bars)
        if att.get("real") is not None:
            ax.axhline(att["real"], color="#0a6", linestyle="--", linewidth=1, label="real held-out replies")
        ax.axhline(att["chance"], color="#e45756", linestyle=":", linewidth=1,
                   label=f"chance (1/{len(att['candidates'])})")
        ax.set_ylim(0, 1)
        ax.set_ylabel("share named the persona")
        ax.legend(fontsize=7)
        out.append(("Whose reply is this: attribution to the persona (higher is better) · bars: 95% bootstrap "
                    "interval", _svg(fig)))
    return out


def _value(r: dict, key: str):
    return r.get(key)


def read_train_log(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Loss series from an adapter's train_log.jsonl: {"train": [(step, loss)], "validation": [...]}."""
    series: dict[str, list[tuple[float, float]]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int | float) or rec.get("final_best_model"):
            continue  # (older logs repeated the best model's evaluation at the end, marked final_best_model)
        for key, name in (("loss", "train"), ("eval_loss", "validation"), ("val_loss", "validation")):
            v = rec.get(key)
            if isinstance(v, int | float):
                series.setdefault(name, []).append((rec["step"], float(v)))
                break
    return series


def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(r: dict, key: str, value, digits=3) -> str:
    """A value with its bootstrap interval below it, when there is one."""
    iv = (r.get("intervals") or {}).get(key)
    text = html.escape(_fmt(value, digits))
    if iv and value is not None:
        text += f'<br><span class="ci">[{iv[0]:.{digits}f}, {iv[1]:.{digits}f}]</span>'
    return text


def _table(metrics: dict) -> str:
    cols = ["method", "context tokens", "NLL/token", "perplexity", "semantic", "style (calibrated)", "style (raw)",
            *M.STYLE_COMPONENTS,
            "AUC", "marker error", "attribution", "empty", "repeated", "copied", "assistant voice", "raw rejected",
            "seconds"]
    rows = []
    for name, r in metrics["methods"].items():
        d, s = r["degeneration"], r["style"]
        cells = [html.escape(name), f"{r['context_tokens_mean']:.0f}", _cell(r, "nll_per_token", r["nll_per_token"]),
                 html.escape(_fmt(r["perplexity"], 1)), _cell(r, "semantic", r.get("semantic")),
                 _cell(r, "style_calibrated", (r.get("style_calibrated") or {}).get("combined")),
                 _cell(r, "style", s["combined"]), *(html.escape(_fmt(s[k], 2)) for k in M.STYLE_COMPONENTS),
                 _cell(r, "auc", r["auc"]), _cell(r, "marker_error", r.get("marker_error")),
                 _cell(r, "attribution", r.get("attribution"), 2), _cell(r, "empty", d["empty"], 2), _cell(r, "repeated", d["repeated"], 2),
                 _cell(r, "copied", d["copied"], 2), _cell(r, "assistant", d.get("assistant"), 2),
                 html.escape(_fmt(r.get("candidates", {}).get("rejected"), 2)), html.escape(_fmt(r.get("seconds"), 1))]
        rows.append(f'<tr data-method="{html.escape(name)}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    rd = metrics["real"]["degeneration"]
    ref = metrics["real"].get("style_reference")
    if ref:
        other = ["(another sample of the person's replies)", "", "", "", "", "0", _fmt(ref["combined"]),
                 *(_fmt(ref[k], 2) for k in M.STYLE_COMPONENTS), "", _fmt(metrics["real"].get("marker_reference")),
                 "", "", "", "", "", "", ""]
        rows.append('<tr class="real">' + "".join(f"<td>{html.escape(c)}</td>" for c in other) + "</tr>")
    att = metrics.get("attribution") or {}
    real = ["(real replies)", "", "", "", "1", "0", "0", *([""] * len(M.STYLE_COMPONENTS)), "0.5", "0",
            _fmt(att.get("real"), 2), _fmt(rd["empty"], 2),
            _fmt(rd["repeated"], 2), _fmt(rd["copied"], 2), _fmt(rd.get("assistant"), 2), "", ""]
    rows.append('<tr class="real">' + "".join(f"<td>{html.escape(c)}</td>" for c in real) + "</tr>")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    return f'<div class="wide"><table id="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _markers_table(metrics: dict) -> str:
    """Each marker's rate per method beside the real replies' rate, and the attribution's candidates."""
    real = metrics["real"].get("markers")
    if not real:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("method", *K.MARKERS, "marker error"))
    rows = ['<tr class="real">' + "".join(f"<td>{html.escape(c)}</td>" for c in (
        "(real replies)", *(_fmt(real[k], 2) for k in K.MARKERS), "0")) + "</tr>"]
    for name, r in metrics["methods"].items():
        rates = r.get("markers") or {}
        cells = [html.escape(name), *(html.escape(_fmt(rates.get(k), 2)) for k in K.MARKERS),
                 _cell(r, "marker_error", r.get("marker_error"))]
        rows.append(f'<tr data-method="{html.escape(name)}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    att = metrics.get("attribution") or {}
    if att.get("skipped"):
        note = f"Attribution skipped: {att['skipped']}."
    elif att:
        note = (f"Attribution: a char n-gram classifier over {len(att['candidates'])} candidates "
                f"({', '.join(att['candidates'])}; the persona from its training replies, the others from the log) "
                f"names who wrote each reply; chance {att['chance']:.2f}, the real held-out replies "
                f"{_fmt(att.get('real'), 2)}.")
    else:
        note = ""
    return (f'<h2>Texting habits</h2><div class="wide"><table id="markers"><thead><tr>{head}</tr></thead><tbody>'
            f'{"".join(rows)}</tbody></table></div><p class="note">Share of messages all lowercase (of those with a '
            "letter), ending with . ! or ?, holding an apostrophe, a laugh, an emoji, of at most 4 words; of short "
            "forms (u, idk, tbh...) among short and long forms; of replies of 2+ messages. Marker error: the mean "
            f"absolute difference from the real replies' rates. {html.escape(note)}</p>")


def _reply_html(messages: list[str]) -> str:
    if not messages:
        return "<i>(empty)</i>"
    return " ⏎ ".join(html.escape(m) for m in messages)


def _comparisons(comparisons: list[dict], methods: list[str]) -> str:
    parts = []
    for c in comparisons:
        rows = [f'<div class="reply real"><b>real</b> {_reply_html(c["real"])}</div>']
        for m in methods:
            for k, r in enumerate(c["replies"].get(m, [])):
                rows.append(
                    f'<div class="reply" data-method="{html.escape(m)}"><b>{html.escape(m)} #{k + 1}</b> '
                    f"{_reply_html(r)}</div>"
                )
        parts.append(
            f'<div class="cmp" id="cmp-{c["index"]}"><div class="note">chat {html.escape(str(c["chat"]))}, '
            f'session {html.escape(str(c["session"]))}</div><pre>{html.escape(c["prompt"])}</pre>{"".join(rows)}</div>'
        )
    return "".join(parts)


def render_report(metrics: dict, comparisons: list[dict], train_log: Path | None = None) -> str:
    """The whole report as one HTML string."""
    methods = list(metrics["methods"])
    cfg = metrics["config"]
    plots = "".join(
        f'<div class="plot"><h3>{html.escape(title)}</h3>{svg}</div>'
        for title, svg in _plots(metrics, comparisons, train_log)
    )
    methods_json = json.dumps(methods).replace("</", "<\\/")
    tag = html.escape(metrics["persona"]["tag"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>convo eval: [{tag}]</title><style>{_CSS}</style></head>
<body>
<h1>convo eval: [{tag}]</h1>
<p class="note">data {html.escape(str(cfg["data_dir"]))} · adapter {html.escape(str(cfg["adapter_dir"]))} ·
{metrics["prompts"]} validation prompts · {cfg["samples_per_prompt"]} samples each · context budget
{cfg["context_budget_tokens"]} tokens · seed {cfg["seed"]}</p>
<h2>Metrics</h2>
{_table(metrics)}
<p class="note">Bracketed ranges and error bars: bootstrap 95% intervals over the validation prompts.
NLL/token: mean negative log-likelihood of the real replies given each method's context (context
tokens carry no loss). Semantic: cosine between sentence embeddings of the generated and the real reply (1 = same
meaning). Style (raw): mean of six components in [0, 1] (0 = same style as the real replies); style (calibrated):
the excess over what another sample of the person's own replies scores, so 0 = as close as the person themself.
AUC: cross-validated char n-gram classifier, real vs generated (0.5 = indistinguishable). Empty/repeated/assistant
voice: share of replies (served candidates, after the candidate step); copied: share of 4+ word messages identical
to a training message; raw rejected: share of raw samples with nothing usable, re-sampled before serving.</p>
{_markers_table(metrics)}
<h2>Plots</h2><div class="plots">{plots}</div>
<h2>Validation contexts</h2>
<div id="filters"></div><p id="filter-status" class="note"></p>
<div id="comparisons">{_comparisons(comparisons, methods)}</div>
<script type="application/json" id="methods-data">{methods_json}</script>
<script>{_JS}</script>
</body></html>
"""


def ema(points: list[tuple[float, float]], span: float) -> list[tuple[float, float]]:
    """Exponential moving average of (step, value) points, weight 2/(span+1), bias-corrected from the start."""
    alpha = 2.0 / (span + 1.0)
    out, avg, weight = [], 0.0, 0.0
    for step, value in points:
        avg = (1 - alpha) * avg + alpha * value
        weight = (1 - alpha) * weight + alpha
        out.append((step, avg / weight))
    return out


def draw_loss(ax, series: dict[str, list[tuple[float, float]]]) -> None:
    """Loss curve a user can read: each logged training loss faint, their moving average bold, validation as dots.

    One batch's loss says mostly how long and how predictable its samples were (length-grouped batches come in
    runs of similar length), so the smoothed training line and above all validation, the same held-out samples
    every time, show whether the adapter learns.
    """
    train = sorted(series.get("train", []))
    if train:
        steps = [p[0] for p in train]
        ax.plot(steps, [p[1] for p in train], color="#4c78a8", alpha=0.3, linewidth=1, label="train (each log)")
        if len(train) >= 4:
            smooth = ema(train, span=max(8.0, len(train) / 5))
            ax.plot(steps, [p[1] for p in smooth], color="#4c78a8", linewidth=2, label="train (moving average)")
    val = sorted(series.get("validation", []))
    if val:
        ax.plot([p[0] for p in val], [p[1] for p in val], color="#e45756", marker="o", markersize=4,
                label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
