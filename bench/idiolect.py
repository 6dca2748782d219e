"""Planted-style study: does a method pick up a person's texting habits, and can a reader tell whose reply it is?

The quality study's speakers barely have personal style (chitchat strangers). Here each studied chitchat speaker's
bursts are rewritten with a planted texting style (training.evaluate.planted: lowkey, sunny, proper; everyone
else in the conversations stays as written), so the answer is known. For every method (base, incontext,
retrieval, the SFT adapter `adapter` and the default adapter `adapter+preference`, SFT then the preference step)
it reports each marker's rate in the generated replies against the person's real held-out replies, the marker
error (training.evaluate.markers), and attribution (training.evaluate.attribution: a classifier over the persona
and `--contacts` other chitchat speakers, natural text, names who wrote each reply), with bootstrap intervals and
paired differences through bench/quality.py's machinery (speakers, training, eval, bootstrap, paired
differences). Two reference rows beside them: `(real)`, the held-out replies themselves (marker error 0, the
attribution ceiling), and `(natural)`, the same held-out replies before the style was planted (the person's words
without their habits: what a method that learned everything but the style would score).

    python bench/idiolect.py --base models/smollm2-135m --work runs/idiolect-smollm2      # one base (resumes)
    python bench/idiolect.py --doc-only --results A.json --results B.json \\
        --natural bench/quality_results/run1-demo.json ...     # docs/quality.md: the natural study + this one

The doc is docs/quality.md: bench/quality.py's natural study (from its --natural results) followed by this
study's sections for every base given, computed from the results alone (bench/quality.py --planted FILE writes
the same doc). Results are saved after every method; a rerun with the same settings skips what is done.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import quality as Q  # noqa: E402  (bench/quality.py: the study machinery this mode reuses)

METHODS = ("incontext", "adapter+preference", "adapter", "base", "retrieval")  # the order they run
DEFAULT = Q.PREFERENCE  # the adapter `convo train` gives by default (SFT, then the preference step)
REFS = ("(real)", "(natural)")
TABLE_ORDER = ("base", "incontext", "retrieval", "adapter", DEFAULT)
RESUME_KEYS = ("base", "max_prompts", "n", "max_new_tokens", "budget", "seed", "max_steps", "eval_steps", "patience",
               "lr", "lora_r", "lora_targets", "pref_pairs", "pref_steps", "batch_size", "max_length", "val_samples",
               "context", "contacts", "styles", "max_conversations")


# ---------------------------------------------------------------- data

NATURAL = "natural"  # not a planted style: the speaker's chitchat messages as written (the same speaker, unplanted)


class Unplanted:
    """`--styles natural`: the speaker as written, so one base is studied on the same speakers natural and
    planted. No designed rates, so no marker targets; attribution then tells natural speakers apart."""

    name = NATURAL
    description = "no style planted, the speaker's chitchat messages as written"
    rates: dict[str, float] = {}

    def rewrite(self, burst, seed: int = 0) -> list[str]:
        return list(burst)


def style_of(name: str):
    """A planted style (training.evaluate.planted) or `natural`."""
    from training.evaluate.planted import get_style

    return Unplanted() if name == NATURAL else get_style(name)



def study_speakers(data, args) -> tuple[list[tuple[Q.Speaker, str]], list[str]]:
    """[(speaker, style)] (speaker i gets style i) and the contacts: the next most active chitchat speakers."""
    styles = args.styles.split(",")
    ids = [c["speaker"] for c in Q.candidates(data) if c["messages"] <= args.max_messages]
    chosen = args.speakers.split(",") if args.speakers else ids[: len(styles)]
    contacts = [s for s in ids if s not in chosen][: args.contacts]
    out = [(Q.Speaker(f"{style}-{sp[:8]}", f"`{style}` on chitchat `{sp[:8]}`", sp, None, "Robin", "Sam"), style)
           for sp, style in zip(chosen, styles, strict=False)]
    return out, contacts


def write_contacts(data, contacts: list[str], path: Path, per_contact: int) -> int:
    """The contacts' own bursts (natural text) as a message log, each burst its own chat so no two merge."""
    from training.ingest.records import Message

    lines = []
    for sid in contacts:
        taken = 0
        for conv_id in sorted(data):
            for k, b in enumerate(data[conv_id]["messages"]):
                if b[0]["sender"] != sid or taken >= per_contact:
                    continue
                taken += 1
                for m in b:
                    lines.append(Message(
                        chat=f"{conv_id}-{k}", ts=datetime.fromisoformat(m["timestamp"].replace("Z", "+00:00")),
                        speaker=f"chitchat {sid[:8]}", speaker_id=sid, text=m["text"], source="jsonl").to_json())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return len(lines)


# ---------------------------------------------------------------- running


def run_style(sp: Q.Speaker, style_name: str, data, args, work: Path, contacts_log: Path, results: dict, save,
              embedder, console) -> None:
    """Planted log and dataset, SFT adapter, preference step and every method for one speaker and style."""
    from training.dataset import build_dataset
    from training.evaluate import attribution as A
    from training.evaluate import metrics as M
    from training.evaluate.data import read_samples, sessions

    style = style_of(style_name)
    d = work / sp.key
    run = results["runs"].setdefault(sp.key, {"key": sp.key, "label": sp.label, "speaker": sp.persona_id,
                                              "style": style_name, "methods": {}})
    originals: dict[tuple, list[str]] = {}

    def rewrite(texts: list[str]) -> list[str]:
        out = style.rewrite(texts, seed=args.seed)
        originals.setdefault(tuple(out), list(texts))
        return out

    convs, n_msgs = Q.write_messages(data, sp, d / "messages.jsonl", args.max_conversations, rewrite=rewrite)
    if "counts" not in run or not (d / "data" / "meta.json").is_file():
        summary = build_dataset(d / "messages.jsonl", "persona", d / "data", me="partner", mode="friend",
                                context_messages=args.context)
        run.update(conversations=convs, messages=n_msgs, counts=summary.counts)
        console.print(f"{sp.label}: {n_msgs} messages -> {summary.counts}")
        save()
    methods = [m for m in METHODS if m in args.methods.split(",")]
    needs_adapter = any(m.startswith("adapter") for m in methods)
    if needs_adapter and ("adapter" not in run or not (d / "adapter" / "adapter_config.json").is_file()):
        run["adapter"] = Q.train_adapter(d / "data", args.base, d / "adapter", args, console)
        save()
    train = read_samples(d / "data" / "train.jsonl")
    training_messages = M.normalise_messages([t.text for sess in sessions(train) for t in sess])

    def record(method: str, engine, adapter: Path) -> None:
        rec, comps, metrics = Q.eval_method(method, engine, d / "data", adapter, d / "eval" / method.replace("+", "-"),
                                            args, embedder, training_messages, None, attribution_log=contacts_log)
        real = [c["real"] for c in comps]
        if "real" not in run:
            natural = [originals.get(tuple(r)) for r in real]
            own = [s.reply() for s in train if s.target == metrics["persona"]["tag"] and s.reply()]
            att = A.build_attributor(contacts_log, "persona", metrics["persona"]["name"], own, seed=args.seed)
            run.update(real=real, last_messages=[Q._last_message(c["prompt"]) for c in comps],
                       style_reference=metrics["real"]["style_reference"],
                       real_flags=Q._sum_flags([Q.reply_flags([r], training_messages) for r in real]),
                       natural=natural, natural_found=sum(x is not None for x in natural),
                       attribution=metrics["attribution"],
                       real_attribution=[c["attribution"]["(real)"] if c.get("attribution") else None for c in comps],
                       natural_attribution=(A.per_prompt_hits(att, [[x if x is not None else r]
                                                                     for x, r in zip(natural, real, strict=True)])
                                            if not isinstance(att, str) else None))
        elif run["real"] != real:
            raise SystemExit(f"{sp.label}: {method} was scored on other prompts than the methods before it")
        run["methods"][method] = rec
        console.print(f"{sp.label}: {method} done in {rec['seconds']:.0f} s")
        save()

    from inference.engine import Engine

    engine = None
    adapter = d / "adapter" if needs_adapter else None
    for m in [m for m in methods if m not in run["methods"]]:
        if m != DEFAULT:
            engine = engine or Engine.load(base=args.base, adapter=adapter)
            record(m, engine, adapter)
            continue
        if "preference" not in run or not (d / "adapter-preference" / "adapter_config.json").is_file():
            run["preference"] = Q.train_preference(d, args, console)
            save()
        record(DEFAULT, Engine.load(base=args.base, adapter=d / "adapter-preference"), d / "adapter-preference")
    run["done"] = all(m in run["methods"] for m in methods)
    run["methods_asked"] = methods
    save()


# ---------------------------------------------------------------- statistics (no model: --doc-only)


def with_refs(run: dict) -> dict:
    """The run with the reference rows as pseudo-methods: `(real)` (the held-out replies) and `(natural)` (the
    same replies before the style was planted; a prompt whose original was not found keeps the planted reply)."""
    n = len(run["real"])
    real_att = run.get("real_attribution") or [None] * n
    nat_att = run.get("natural_attribution") or [None] * n
    natural = [x if x is not None else r for x, r in zip(run.get("natural") or [None] * n, run["real"], strict=True)]
    methods = dict(run["methods"])
    methods["(real)"] = {"units": [{"replies": [r], "attribution": a, "nll": None, "semantic": None}
                                   for r, a in zip(run["real"], real_att, strict=True)]}
    methods["(natural)"] = {"units": [{"replies": [r], "attribution": a, "nll": None, "semantic": None}
                                      for r, a in zip(natural, nat_att, strict=True)]}
    return {**run, "methods": methods, "marker_set": marker_set({**run, "methods": methods})}


def marker_set(run: dict) -> list[str]:
    """The markers every method's marker error is computed over: those defined for the real replies and for
    every method's and reference row's replies (training.evaluate.markers.common_markers, as `convo eval` does),
    so a method that never writes a you-word is not let off `short_forms` while another is charged for it."""
    from training.evaluate import markers as K

    return K.common_markers(K.marker_rates(run["real"]), (marker_rates(run, m) for m in run["methods"]))


def columns(run: dict, method: str, seed: int) -> dict:
    """{column: fn(prompt indices)} for one method: marker error, attribution, NLL, semantic."""
    from training.evaluate import markers as K
    from training.evaluate import metrics as M

    units = run["methods"][method]["units"]
    real_counts = [K.marker_counts([r]) for r in run["real"]]
    gen_counts = [K.marker_counts(u["replies"]) for u in units]

    def marker_error(idx):
        return K.marker_error(K.rates_from_counts(K.add_counts(real_counts[i] for i in idx)),
                              K.rates_from_counts(K.add_counts(gen_counts[i] for i in idx)), only=run["marker_set"])

    def attribution(idx):
        pts = [units[i]["attribution"] for i in idx if units[i].get("attribution")]
        total = sum(p[1] for p in pts)
        return sum(p[0] for p in pts) / total if total else None

    def nll(idx):
        pairs = [units[i]["nll"] for i in idx if units[i].get("nll")]
        return M.nll_summary(pairs)["nll_per_token"] if pairs else None

    def semantic(idx):
        vals = [units[i]["semantic"] for i in idx if units[i].get("semantic") is not None]
        return sum(vals) / len(vals) if vals else None

    return {"marker_error": marker_error, "attribution": attribution, "nll": nll, "semantic": semantic}


COLUMNS = (("marker_error", "marker error", "lower", 3), ("attribution", "attribution", "higher", 2),
           ("nll", "NLL/token", "lower", 3), ("semantic", "semantic", "higher", 3))


def analyse(results: dict) -> dict:
    """Per style: statistics of every method and reference row, and the paired differences the targets need."""
    b, seed = results["args"]["bootstrap"], results["args"]["seed"]
    runs = {k: with_refs(r) for k, r in results["runs"].items() if r.get("real") and r.get("methods")}
    stats = {k: Q.speaker_statistics(r, b, seed, columns) for k, r in runs.items()}
    return {"runs": runs, "stats": stats}


def marker_rates(run: dict, method: str) -> dict:
    """Each marker's rate over all of a method's (or reference row's) replies."""
    from training.evaluate import markers as K

    return K.marker_rates(r for u in run["methods"][method]["units"] for r in u["replies"])


def targets(a: dict, key: str) -> list[tuple[str, bool, str]]:
    """The issue's targets on one style: (target, met, the figures)."""
    st = a["stats"][key]
    if DEFAULT not in st or a["runs"][key]["style"] == NATURAL:  # the targets are on the planted styles
        return []
    out = []
    me = {m: st[m]["marker_error"]["value"] for m in st}
    for other, factor in (("incontext", 0.5), ("base", 0.25)):
        if other not in st or me.get(DEFAULT) is None or not me.get(other):
            continue
        d = Q.paired(st, DEFAULT, other, "marker_error")
        ratio = me[DEFAULT] / me[other]
        ok = ratio <= factor and d is not None and d["interval"] is not None and d["interval"][1] < 0
        out.append((f"marker error ≤ {factor}× {other}'s, interval excluding 0", ok,
                    f"{me[DEFAULT]:.3f} vs {me[other]:.3f} = {ratio:.2f}×; difference {Q._with_iv(d, 3, True)}"))
    att = {m: st[m]["attribution"]["value"] for m in st}
    if att.get(DEFAULT) is not None and att.get("(real)"):
        ratio = att[DEFAULT] / att["(real)"]
        out.append(("attribution ≥ 0.8× the real replies'", ratio >= 0.8,
                    f"{att[DEFAULT]:.2f} vs {att['(real)']:.2f} = {ratio:.2f}×"))
    if att.get(DEFAULT) is not None and att.get("incontext") is not None:
        d = Q.paired(st, DEFAULT, "incontext", "attribution")
        ok = d is not None and d["interval"] is not None and d["interval"][0] > 0
        out.append(("attribution above in-context's, interval excluding 0", ok,
                    f"{att[DEFAULT]:.2f} vs {att['incontext']:.2f}; difference {Q._with_iv(d, 2, True)}"))
    return out


def compare_bases(parts: list[tuple[str, dict, dict]]) -> list[str]:
    """Which base is better on generated text: each method both bases ran, paired over the same prompts of the
    same styles (each style resampled on its own, then averaged); the verdict rests on the default adapter when
    both have it, else on the methods both ran."""
    if len(parts) < 2:
        return []
    (name_a, _, a), (name_b, _, b) = parts[:2]
    methods = [m for m in TABLE_ORDER if any(
        m in a["stats"][k] and m in b["stats"].get(k, {}) and a["runs"][k]["real"] == b["runs"][k]["real"]
        for k in a["stats"])]
    if not methods:
        return ["- No method has results on the same prompts of the same style for both bases yet."]
    lines, verdicts = [], {}
    for m in methods:
        common = [k for k in a["stats"] if m in a["stats"][k] and m in b["stats"].get(k, {})
                  and a["runs"][k]["real"] == b["runs"][k]["real"]]
        for col, label, better, digits in COLUMNS[:2] + COLUMNS[3:]:
            per = [Q.paired({"a": a["stats"][k][m], "b": b["stats"][k][m]}, "a", "b", col) for k in common]
            pooled = Q.pooled(per)
            v = Q.verdict(pooled, better, digits)
            verdicts[(m, col)] = v
            lines.append(f"- `{m}`, {label}: {name_a} − {name_b} = {Q._with_iv(pooled, digits, True)} "
                         f"({len(common)} style{'s' if len(common) > 1 else ''}: "
                         + ", ".join(f"{k.split('-')[0]} {Q._with_iv(d, digits, True)}"
                                     for k, d in zip(common, per, strict=True))
                         + ")" + (f": better on {name_a if v > 0 else name_b}" if v else ": not distinguishable") + ".")
    basis = [DEFAULT] if DEFAULT in methods else methods
    cols = ("marker_error", "attribution")
    votes = [verdicts[(m, c)] for m in basis for c in cols]
    win = name_a if max(votes) > 0 and min(votes) >= 0 else name_b if min(votes) < 0 and max(votes) <= 0 else None
    on = ", ".join(f"`{m}`" for m in basis)
    label = dict((c, lab) for c, lab, _, _ in COLUMNS)
    deciding = ", ".join(f"`{m}` {label[c]}" for m in basis for c in cols if verdicts[(m, c)])
    lines.append(f"- **Better base on generated text: {win}**: better on {deciding} (pooled paired interval "
                 f"excluding 0), worse on none of marker error and attribution for {on}." if win else
                 f"- **Better base on generated text: neither** on this evidence (for {on}, the pooled paired "
                 "differences on marker error and attribution do not favour one base with the interval excluding 0 "
                 "without another favouring the other"
                 + (f"; differing with the interval excluding 0: {deciding}" if deciding else "") + ").")
    if DEFAULT not in methods:
        lines.append(f"- The default adapter (`{DEFAULT}`) did not run on both bases, so this verdict is about "
                     f"{on} only, not about the adapters.")
    return lines


def _cell(st: dict, m: str, col: str, digits: int) -> str:
    return Q._with_iv(st[m][col], digits) if m in st else "-"


def stop_text(ad: dict) -> str:
    """What stopped an adapter, with what its validation curve says about an interrupted one."""
    if ad.get("stopped_early") or "interruption" not in str(ad.get("stopped_by")):
        return str(ad["stopped_by"])
    curve = ad.get("eval_curve") or []
    if not curve:
        return "an interruption (SIGINT) before any validation"
    best = min(curve, key=lambda p: p[1])
    still = best[0] == curve[-1][0]
    return (f"an interruption (SIGINT, the study's time budget) at step {ad['steps']}, before early stopping: the "
            f"best checkpoint so far (step {best[0]}, val loss {best[1]:.3f}) became the adapter, and the validation "
            + ("loss was still falling at the last validation" if still else
               f"loss had not improved for {sum(1 for p in curve if p[0] > best[0])} validation(s)"))


def style_section(results: dict, a: dict, key: str) -> list[str]:
    """One style on one base: the adapter's training, the table, marker rates, paired differences, targets."""
    from training.evaluate.markers import MARKERS

    run, st = a["runs"][key], a["stats"][key]
    style = style_of(run["style"])
    ad, pref = run.get("adapter"), run.get("preference")
    att = run.get("attribution") or {}
    curve = ", ".join(f"{v:.3f}@{s}" for s, v in (ad or {}).get("eval_curve", []))
    lines = [f"#### {run['label']}", "",
             f"Style `{style.name}`: {style.description}. {run['conversations']} conversations, {run['messages']} "
             f"messages; dataset {run['counts'].get('train')} train / {run['counts'].get('val')} val samples; "
             f"{run.get('natural_found', 0)} of {len(run['real'])} held-out replies matched to their unplanted "
             "original. Marker error over: " + ", ".join(run["marker_set"]) + " (the markers defined for the real replies "
             "and every row's)."
             + (f" SFT adapter: {ad['steps']} steps in {ad['seconds']:.0f} s, stopped by {stop_text(ad)} "
                f"(val loss at steps: {curve or '-'})." if ad else "")
             + (f" Preference step: {pref['summary']}." if pref else "")
             + (f" Attribution: {len(att['candidates'])} candidates (the persona and {len(att['candidates']) - 1} "
                f"other chitchat speakers), chance {att['chance']:.2f}." if att.get("candidates") else
                f" Attribution skipped: {att.get('skipped')}." if att else "")
             + " Eval seconds per method: " + ", ".join(f"{m} {r['seconds']:.0f}" for m, r in run["methods"].items()
                                                      if m not in REFS) + ".", ""]
    head = "| method | " + " | ".join(f"{lab} {'↑' if b == 'higher' else '↓'}" for _, lab, b, _ in COLUMNS) + " |"
    lines += [head, "|---|" + "---:|" * len(COLUMNS)]
    for m in (*TABLE_ORDER, *REFS):
        if m in st:
            lines.append(f"| {m} | " + " | ".join(_cell(st, m, c, d) for c, _, _, d in COLUMNS) + " |")
    if att.get("chance") is not None:
        lines.append(f"| (chance) | | {att['chance']:.2f} | | |")
    lines += ["", "Marker rates (all replies of each method; designed rates of the style in the header):", "",
              "| method | " + " | ".join(f"{k}{f' ({style.rates[k]:g})' if k in style.rates else ''}" for k in MARKERS)
              + " |", "|---|" + "---:|" * len(MARKERS)]
    for m in (*TABLE_ORDER, *REFS):
        if m in run["methods"]:
            rates = marker_rates(run, m)
            lines.append(f"| {m} | " + " | ".join(Q._fmt(rates[k], 2) for k in MARKERS) + " |")
    lines += ["", "Paired differences (method − baseline, same resampled prompts):", "",
              "| method − baseline | marker error | attribution |", "|---|---:|---:|"]
    for base_m in ("incontext", "base"):
        for m in TABLE_ORDER:
            if m == base_m or m not in st or base_m not in st:
                continue
            cells = []
            for col, _, better, digits in COLUMNS[:2]:
                d = Q.paired(st, m, base_m, col)
                text = Q._with_iv(d, digits, True)
                v = Q.verdict(d, better, digits)
                cells.append(f"**{text}**" if v > 0 else f"*{text}*" if v < 0 else text)
            lines.append(f"| {m} − {base_m} | " + " | ".join(cells) + " |")
    tg = targets(a, key)
    if tg:
        lines += ["", "Targets: " + "; ".join(f"{t}: {'met' if ok else '**not met**'} ({fig})" for t, ok, fig in tg)
                  + "."]
    lines += ["", "Sample replies (first sample of each method; ⏎ separates messages of one burst):", "",
              Q.samples_table({**run, "methods": {m: run["methods"][m] for m in run["methods"] if m not in REFS}})]
    return lines


def merge_by_base(parts: list[dict]) -> list[dict]:
    """One results record per base from runs made side by side (one per style, `--only`) with the same settings."""
    merged: dict[str, dict] = {}
    for res in parts:
        m = merged.get(res["base"])
        part = {"command": res["command"], "wall_s": res.get("wall_s", 0.0), "finished": res.get("finished")}
        if m is None:
            merged[res["base"]] = {**res, "runs": dict(res["runs"]), "parts": [part]}
            continue
        changed = [k for k in RESUME_KEYS if k != "styles" and m["args"].get(k) != res["args"].get(k)]
        if changed:
            raise SystemExit(f"runs on {res['base']} with other settings ({', '.join(changed)}): one doc needs one set")
        for k, r in res["runs"].items():  # a style two runs started: the one with more methods done
            if len(r.get("methods", {})) > len(m["runs"].get(k, {}).get("methods", {})):
                m["runs"][k] = r
        m["parts"].append(part)
    return list(merged.values())


def planted_sections(parts: list[dict]) -> list[str]:
    """The doc's planted-style and attribution sections for the results of one or more bases (several results
    files of one base, one per style, are merged)."""
    from training.evaluate.planted import STYLES

    analysed = [(res.get("base_label") or Path(res["base"]).name, res, analyse(res)) for res in merge_by_base(parts)]
    lines = ["", f"{PLANTED_HEADING} (`bench/idiolect.py`)", "",
             "Real chat histories carry strong habits the chitchat strangers above lack. Here each studied chitchat "
             "speaker's bursts are rewritten with a planted style (`training/evaluate/planted.py`; everyone else in "
             "their conversations stays as written), so what a method should learn is known. Columns: marker error, "
             "the mean absolute difference between the generated replies' marker rates and the person's real "
             "held-out replies' (`training/evaluate/markers.py`: lowercase, final punctuation, apostrophes, short "
             "forms, laughs, emoji, bursts of 2+ messages, messages of ≤4 words; 0 = the person's habits); "
             "attribution, the share of generated replies a char n-gram classifier over the persona and other "
             "chitchat speakers names the persona for (`training/evaluate/attribution.py`); NLL/token of the real "
             "replies; semantic similarity to the real reply. Reference rows: `(real)` the held-out replies "
             "themselves (marker error 0, the attribution ceiling), `(natural)` the same replies before the style "
             "was planted (the person's words without the habits), `(chance)` 1 / candidates. Bootstrap 95% "
             "intervals over prompts, the same resampled prompts for every method (paired). **Bold**/*italic*: "
             "better/worse with the interval excluding 0. The default adapter is `adapter+preference`.", "",
             "| style | designed rates |", "|---|---|"]
    lines += [f"| `{s.name}` | {', '.join(f'{k} {v:g}' for k, v in s.rates.items())} |" for s in STYLES.values()]
    if any(r.get("style") == NATURAL for res in parts for r in res["runs"].values()):
        lines.append(f"| `{NATURAL}` | none: {Unplanted.description} (`--styles {NATURAL}`; no marker targets) |")
    for name, res, a in analysed:
        args = res["args"]
        runs_of = res.get("parts") or [res]
        lines += ["", f"### Base: {name}", "", f"`{res['base']}` ({res['base_note']}).", "", "```bash",
                  *(p["command"] for p in runs_of), "```", "",
                  *(f"Wall time{f' of run {i + 1}' if len(runs_of) > 1 else ''}: {p.get('wall_s', 0) / 60:.1f} min "
                    f"on {args['machine']} (summed over resumed runs; last results saved {p.get('finished', '?')})."
                    for i, p in enumerate(runs_of)),
                  ("Runs side by side (one torch thread each, one style each), with the same settings. "
                   if len(runs_of) > 1 else "")
                  + f"Generation through {res.get('decode_path', 'the engine of this checkout')}.", "",
                  f"Sizes: {args['max_prompts']} validation prompts per style, {args['n']} samples each (at most "
                  f"{args['max_new_tokens']} new tokens), context budget {args['budget']} tokens; adapters LoRA "
                  f"r={args['lora_r']}, lr {args['lr']}, batch {args['batch_size']}, max length {args['max_length']}, "
                  f"{Q.budget_text(args)}; preference step {args['pref_pairs']} pairs, {args['pref_steps']} steps; "
                  f"{args['contacts']} other chitchat speakers as attribution candidates.", ""]
        planted = [k for k in a["runs"] if a["runs"][k]["style"] != NATURAL]
        tg = {k: targets(a, k) for k in planted}
        met = [k for k, t in tg.items() if t and all(ok for _, ok, _ in t)]
        ran = {m for r in a["runs"].values() for m in r["methods"] if m not in REFS}
        asked = [m for m in METHODS if m in (args["methods"].split(",") if args.get("methods") else ran)]
        if not any(tg.values()):
            lines.append(f"Targets: not evaluated on this base: the default adapter (`{DEFAULT}`) was not run "
                         f"(methods run: {', '.join(f'`{m}`' for m in asked)}).")
        else:
            lines.append(f"Targets met on every count: {len(met)} of {len(planted)} planted styles"
                         + (f" ({', '.join(a['runs'][k]['style'] for k in met)})" if met else "") + "; per target: "
                         + "; ".join(f"{t}: {sum(1 for k in tg if any(x == t and ok for x, ok, _ in tg[k]))} of "
                                     f"{sum(1 for k in tg if any(x == t for x, _, _ in tg[k]))}"
                                     for t in dict.fromkeys(x for k in tg for x, _, _ in tg[k])) + ".")
        stopped = [f"{r['label']}: {stop_text(r['adapter'])}" for r in a["runs"].values() if r.get("adapter")]
        lines += ["", "What stopped each SFT adapter: " + "; ".join(stopped) + "." if stopped else
                  "No adapter trained on this base."]
        unfinished = [r["label"] for r in res["runs"].values() if not r.get("done")]
        if unfinished:
            lines.append(f"Unfinished when this doc was written: {', '.join(unfinished)}.")
        for key in a["runs"]:
            lines += [""] + style_section(res, a, key)
    if len(analysed) >= 2:
        lines += ["", "### Which base imitates better", "",
                  "Each method both bases ran, paired over the same prompts of the same styles (computed):", "",
                  *compare_bases(analysed)]
    return lines


# ---------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc-only", action="store_true", help="rebuild --doc from the results files and exit")
    p.add_argument("--results", type=Path, action="append", help="results file (default WORK/results.json); "
                   "--doc-only takes one per base")
    p.add_argument("--natural", type=Path, action="append", default=[],
                   help="bench/quality.py results for the natural study at the top of the doc (--doc-only)")
    p.add_argument("--natural-doc", type=Path, help="with --doc-only: keep the natural study's text from this doc "
                   "(written by bench/quality.py from the --natural results) instead of re-analysing them")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming the results file")
    p.add_argument("--styles", default="lowkey,sunny,proper", help="planted styles, one per speaker "
                   f"(`{NATURAL}`: the speaker as written, no style planted; with --only, the first speaker)")
    p.add_argument("--speakers", help="comma-separated chitchat sender ids (default: the most active)")
    p.add_argument("--only", help="run only this style's speaker (runs side by side, one per style)")
    p.add_argument("--methods", default=",".join(METHODS), help="methods to run (without adapter methods no adapter "
                   "is trained)")
    p.add_argument("--contacts", type=int, default=5, help="other chitchat speakers as attribution candidates")
    p.add_argument("--contact-bursts", type=int, default=300, help="bursts per contact in their log")
    p.add_argument("--max-messages", type=int, default=1_000_000)
    p.add_argument("--max-conversations", type=int, help="use only each speaker's first N conversations")
    p.add_argument("--base", help="base model dir")
    p.add_argument("--base-note", default="", help="what the base is, written into the doc")
    p.add_argument("--base-label", default="", help="short name of the base in the doc (default: the dir name)")
    p.add_argument("--decode-path", default=Q.DECODE_PATH, help="written into the doc")
    p.add_argument("--max-steps", type=int, default=400, help="step budget; early stopping should end training first")
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--val-samples", type=int, default=16)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-targets", default="all-linear")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pref-pairs", type=int, default=16)
    p.add_argument("--pref-steps", type=int, default=8)
    p.add_argument("--context", type=int, default=4, help="messages of history per sample")
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--max-prompts", type=int, default=12)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--rerank-k", type=int, default=0)
    p.add_argument("--gen-batch", type=int, default=12)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "idiolect")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "quality.md")
    p.add_argument("--machine", default="2 CPU cores shared with other jobs, no GPU")
    return p.parse_args(argv)


PLANTED_HEADING = "## Planted texting styles and attribution"


def write_doc(path: Path, natural: list[Path], planted: list[Path], natural_doc: Path | None = None) -> None:
    """docs/quality.md: the natural study (bench/quality.py, from its results, or the text of a doc it wrote,
    `natural_doc`, which skips re-analysing them) followed by the planted-style sections."""
    parts = [json.loads(Path(p).read_text(encoding="utf-8")) for p in planted]
    rebuild = ("python bench/idiolect.py --doc-only " + " ".join(f"--results {p}" for p in planted) + " "
               + " ".join(f"--natural {p}" for p in natural))
    extra = planted_sections(parts) + ["", f"Planted-style sections rebuilt with `{rebuild.strip()}`."]
    if natural_doc is not None:
        head = Path(natural_doc).read_text(encoding="utf-8").split("\n" + PLANTED_HEADING)[0].rstrip("\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(head + "\n" + "\n".join(extra) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    elif natural:
        Q.write_doc(path, Q.merge_results(natural), extra=extra)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("# Quality study: planted texting styles\n" + "\n".join(extra) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the planted-style study on one base, or rebuild the doc."""
    args = parse_args(argv)
    work = Path(args.work)
    results_path = Path(args.results[0] if args.results else work / "results.json")
    if args.doc_only:
        write_doc(args.doc, args.natural, args.results or [results_path], args.natural_doc)
        print(f"wrote {args.doc}")
        return 0
    if not args.base:
        print("--base DIR is needed (e.g. /work/models/smollm2-135m)", file=sys.stderr)
        return 2
    import torch
    from rich.console import Console

    torch.set_num_threads(args.threads)
    console = Console()
    data = Q.chitchat()
    speakers, contacts = study_speakers(data, args)
    speakers = [(sp, st) for sp, st in speakers if not args.only or st == args.only]
    command = "python bench/idiolect.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    fresh = {"command": command.strip(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
             "base": args.base, "base_note": args.base_note or "given with --base", "base_label": args.base_label,
             "decode_path": args.decode_path, "runs": {}, "wall_s": 0.0, "contacts": contacts}
    if results_path.is_file() and not args.fresh:
        results = json.loads(results_path.read_text(encoding="utf-8"))
        changed = [k for k in RESUME_KEYS if results["args"].get(k) != fresh["args"].get(k)]
        if changed:
            raise SystemExit(f"{results_path}: made with other settings ({', '.join(changed)}); use them or --fresh")
        results.update(command=fresh["command"], decode_path=args.decode_path)
        results["args"].update({k: fresh["args"][k] for k in ("methods", "only")})
    else:
        results = fresh
    contacts_log = work / "contacts.jsonl"
    write_contacts(data, contacts, contacts_log, args.contact_bursts)
    save = Q.results_saver(results, results_path)

    from training.evaluate.retrieval import Embedder

    embedder = Embedder()
    for sp, style in speakers:
        run_style(sp, style, data, args, work, contacts_log, results, save, embedder, console)
        write_doc(work / "quality.md", [], [results_path])
        console.print(f"{sp.label} done ({results['wall_s'] / 60:.1f} min so far); wrote {work / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
