"""Benchmark `convo ingest` on a generated 1,000,000-message export against a plain `json.load` of the same file.

    .venv/bin/python bench/ingest.py                    # Telegram and Discord, 1,000,000 messages each
    .venv/bin/python bench/ingest.py --messages 100000 --formats telegram

For each format it writes a realistic export into a temp folder (Telegram Desktop single-chat result.json
with entity lists, stickers, photos, service entries, replies; DiscordChatExporter JSON with authors,
replies, attachments, join messages), then runs, each in a fresh subprocess so peak RSS is that run's alone:
`json.load` of the file, and the whole ingest (parse, normalise, write the JSONL log and its sidecar).
It prints messages/s, wall time and peak RSS (ru_maxrss of the child) side by side, and the ratios against
the targets: ingest time <= 2x json.load, ingest peak RSS < 1/10 of json.load's. With `--repeat N` each
measurement runs N times, alternating json.load and ingest, and the fastest of each is kept.

`--formats reingest` is the re-ingest case: two Telegram exports of one chat, March (entries 0..N) and June
(entries N/2..1.5N, so half of it overlaps March, message for message), then, each in a fresh process:
a plain ingest of March (the log to append to), `ingest --append` of June onto that log, and a plain ingest
of both files together; the appended log must equal the one from both files byte for byte.

    .venv/bin/python bench/ingest.py --formats reingest                 # 1M onto 1M, 50% overlap
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "hey yeah ok lol what are you doing tonight maybe we should go see the movie sure sounds good haha "
    "no way i'm so tired coffee tomorrow? omw running late sorry did you see that love it 😂 🙌 ☕"
).split()

_JSON_LOAD = """
import json, resource, sys, time
t = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    data = json.load(f)
n = len(data["messages"]) if "messages" in data else sum(len(c["messages"]) for c in data["chats"]["list"])
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "items": n}))
"""

_INGEST = """
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from training.ingest.pipeline import ingest
t = time.perf_counter()
result = ingest([Path(sys.argv[1])], Path(sys.argv[2]), me=sys.argv[4])
dt = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": dt, "rss_mb": rss, "items": result.meta["messages"]}))
"""

_APPEND = """
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from training.ingest.pipeline import ingest
t = time.perf_counter()
result = ingest([Path(p) for p in sys.argv[1].split("|")], Path(sys.argv[2]), me=sys.argv[4] or None,
                append=sys.argv[5] == "append")
dt = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": dt, "rss_mb": rss, "items": result.meta["messages"],
                  "duplicates": result.meta["duplicates"]}))
"""

_BASELINE = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import training.ingest.pipeline, training.ingest.telegram, training.ingest.discord_export
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _text(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(1, 14)))


def write_telegram(path: Path, n: int, seed: int = 0, chats: int = 1, start: int = 0) -> None:
    """A Telegram Desktop export with `n` entries, formatted like Telegram's (indent 1).

    chats=1: a single chat's result.json; more: a full account export whose `chats.list` holds `chats` chats.
    `start` (single chat only): the entries `start..start+n` of the stream that `start=0` begins, the same
    messages with the same ids, so two ranges of one seed overlap exactly.
    """
    assert start == 0 or chats == 1
    rng = random.Random(seed)
    people = [("Alice Smith", "user4242"), ("Riya", "user777")]
    t = 1_600_000_000
    per_chat = -(-n // chats)
    with path.open("w", encoding="utf-8") as f:
        if chats == 1:
            f.write('{\n "name": "Alice Smith",\n "type": "personal_chat",\n "id": 4242,\n "messages": [\n')
        else:
            f.write('{\n "personal_information": {"user_id": 777, "first_name": "Riya", "last_name": ""},\n'
                    ' "chats": {\n  "about": "",\n  "list": [\n   {"name": "Chat 0", "type": "personal_chat", '
                    '"id": 0, "messages": [\n')
        for i in range(start + n):
            if i and i % per_chat == 0 and chats > 1:
                f.write(f'\n  ]}},\n   {{"name": "Chat {i // per_chat}", "type": "personal_chat", '
                        f'"id": {i // per_chat}, "messages": [\n')
            t += rng.randint(1, 600)
            name, uid = people[rng.random() < 0.5]
            m: dict = {"id": i + 1, "type": "message", "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)),
                       "date_unixtime": str(t), "from": name, "from_id": uid}
            r = rng.random()
            if r < 0.02:
                m = {"id": i + 1, "type": "service", "date": m["date"], "date_unixtime": str(t), "actor": name,
                     "actor_id": uid, "action": "phone_call", "duration_seconds": 30, "text": "", "text_entities": []}
            elif r < 0.05:
                m.update(file="stickers/s.webp", media_type="sticker", sticker_emoji="😂", text="", text_entities=[])
            elif r < 0.08:
                m.update(photo="photos/p.jpg", width=1280, height=960, text="", text_entities=[])
            elif r < 0.20:
                a, b = _text(rng), _text(rng)
                m["text"] = [a + " ", {"type": "bold", "text": b}]
                m["text_entities"] = [{"type": "plain", "text": a + " "}, {"type": "bold", "text": b}]
            else:
                s = _text(rng)
                m["text"] = s
                m["text_entities"] = [{"type": "plain", "text": s}]
            if i and rng.random() < 0.1:
                m["reply_to_message_id"] = rng.randint(max(1, i - 50), i)
            if i < start:
                continue  # generated all the same, so the random stream stays in step
            first = i == start if chats == 1 else i % per_chat == 0
            f.write(("  " if first else ",\n  ") + json.dumps(m, ensure_ascii=False, indent=1).replace("\n", "\n  "))
        f.write("\n ]\n}\n" if chats == 1 else "\n  ]}\n  ]\n }\n}\n")


def write_discord(path: Path, n: int, seed: int = 0) -> None:
    """A DiscordChatExporter channel export with `n` messages."""
    rng = random.Random(seed)
    authors = [
        {"id": "111", "name": "tom_b", "discriminator": "0000", "nickname": "Tom", "color": "#E67E22",
         "isBot": False, "roles": [], "avatarUrl": "https://cdn.discordapp.com/embed/avatars/0.png"},
        {"id": "222", "name": "riya.k", "discriminator": "0000", "nickname": None, "color": None,
         "isBot": False, "roles": [], "avatarUrl": "https://cdn.discordapp.com/embed/avatars/1.png"},
    ]
    t = 1_600_000_000
    with path.open("w", encoding="utf-8") as f:
        head = {"guild": {"id": "800000000000000001", "name": "Board Games", "iconUrl": "x"},
                "channel": {"id": "800000000000000002", "type": "GuildTextChat", "categoryId": "3",
                            "category": "Text Channels", "name": "general", "topic": None},
                "dateRange": {"after": None, "before": None}, "exportedAt": "2023-04-02T12:00:00.000+00:00"}
        f.write(json.dumps(head, indent=2)[:-2] + ',\n  "messages": [\n')
        for i in range(n):
            t += rng.randint(1, 600)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{rng.randint(0, 999):03d}+00:00"
            r = rng.random()
            m = {"id": str(900000000000000000 + i), "type": "Default", "timestamp": stamp, "timestampEdited": None,
                 "callEndedTimestamp": None, "isPinned": False, "content": _text(rng),
                 "author": authors[rng.random() < 0.5], "attachments": [], "embeds": [], "stickers": [],
                 "reactions": [], "mentions": []}
            if r < 0.02:
                m["type"], m["content"] = "GuildMemberJoin", ""
            elif r < 0.05:
                m["content"] = ""
                m["attachments"] = [{"id": str(i), "url": "https://cdn.discordapp.com/a.png", "fileName": "a.png",
                                     "fileSizeBytes": 1234}]
            elif r < 0.15 and i:
                m["type"] = "Reply"
                m["reference"] = {"messageId": str(900000000000000000 + i - 1), "channelId": "2", "guildId": "1"}
            f.write(("    " if i == 0 else ",\n    ") + json.dumps(m, ensure_ascii=False))
        f.write(f'\n  ],\n  "messageCount": {n}\n}}\n')


def _child(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(fmt: str, n: int, folder: Path, repeat: int = 1) -> dict:
    """Generate one export, then measure json.load and ingest on it, each in a fresh process."""
    src = folder / f"{fmt}.json"
    t = time.perf_counter()
    if fmt == "telegram-full":
        write_telegram(src, n, chats=100)
    else:
        (write_telegram if fmt == "telegram" else write_discord)(src, n)
    gen_s = time.perf_counter() - t
    out = folder / f"{fmt}.jsonl"
    me = "222" if fmt == "discord" else "user777"
    loads, runs = [], []
    for _ in range(repeat):  # alternate the two so both see the same machine load; keep the fastest of each
        loads.append(_child(_JSON_LOAD, str(src)))
        runs.append(_child(_INGEST, str(src), str(out), str(ROOT), me))
    load = min(loads, key=lambda r: r["seconds"])
    run = min(runs, key=lambda r: r["seconds"])
    size_mb = src.stat().st_size / 2**20
    src.unlink()
    out.unlink()
    return {"format": fmt, "entries": n, "file_mb": size_mb, "generate_s": gen_s, "json_load": load, "ingest": run}


def bench_reingest(n: int, folder: Path) -> dict:
    """The re-ingest case (module docstring): append June onto March's log vs. a plain ingest of both."""
    march, june = folder / "march.json", folder / "june.json"
    t = time.perf_counter()
    write_telegram(march, n)
    write_telegram(june, n, start=n // 2)
    gen_s = time.perf_counter() - t
    log, both = folder / "log.jsonl", folder / "both.jsonl"
    first = _child(_APPEND, str(march), str(log), str(ROOT), "user777", "plain")
    appended = _child(_APPEND, str(june), str(log), str(ROOT), "", "append")
    plain = _child(_APPEND, f"{march}|{june}", str(both), str(ROOT), "user777", "plain")
    same = log.read_bytes() == both.read_bytes()
    size_mb = (march.stat().st_size + june.stat().st_size) / 2**20
    for p in (march, june, log, both):
        p.unlink()
    return {"format": "reingest", "entries": n, "file_mb": size_mb, "generate_s": gen_s, "first_log": first,
            "append": appended, "plain_both": plain, "identical_logs": same}


def _print_reingest(r: dict) -> None:
    n, first, app, plain = r["entries"], r["first_log"], r["append"], r["plain_both"]
    print(f"\nreingest: March export {n:,} entries, June export {n:,} entries (half overlapping), "
          f"{r['file_mb']:.0f} MB together")
    print(f"  plain ingest of March (the log)   {first['seconds']:7.2f} s  peak RSS {first['rss_mb']:6.0f} MB  "
          f"{first['items']:,} messages")
    print(f"  --append June onto the log       {app['seconds']:7.2f} s  peak RSS {app['rss_mb']:6.0f} MB  "
          f"{app['items']:,} messages, {app['duplicates']:,} duplicates skipped")
    print(f"  plain ingest of March + June     {plain['seconds']:7.2f} s  peak RSS {plain['rss_mb']:6.0f} MB  "
          f"{plain['items']:,} messages, {plain['duplicates']:,} duplicates skipped")
    print(f"  appended log == log of both files: {'yes' if r['identical_logs'] else 'NO'}")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmarks, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000, help="entries per generated export")
    ap.add_argument("--formats", default="telegram,discord", help="comma-separated: telegram (one chat's result.json), telegram-full (full account export, "
                    "100 chats in one file), discord, reingest (--append with 50%% overlap, see above)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each N times, alternating, and keep the fastest (steadier on a busy machine)")
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = ap.parse_args(argv)
    base = _child(_BASELINE, str(ROOT))
    rows = []
    with tempfile.TemporaryDirectory(prefix="convo-bench-ingest-") as tmp:
        for fmt in args.formats.split(","):
            if fmt.strip() == "reingest":
                rows.append(bench_reingest(args.messages, Path(tmp)))
            else:
                rows.append(bench(fmt.strip(), args.messages, Path(tmp), args.repeat))
    if args.json:
        print(json.dumps({"interpreter_with_imports_rss_mb": base["rss_mb"], "runs": rows}, indent=2))
        return
    print(f"python {sys.version.split()[0]}, ijson backend {__import__('ijson').backend}; "
          f"interpreter + ingest imports alone: {base['rss_mb']:.0f} MB RSS")
    for r in rows:
        if r["format"] == "reingest":
            _print_reingest(r)
            continue
        lo, ing = r["json_load"], r["ingest"]
        t_ratio = ing["seconds"] / lo["seconds"]
        m_ratio = ing["rss_mb"] / lo["rss_mb"]
        print(f"\n{r['format']}: {r['entries']:,} entries, {r['file_mb']:.0f} MB file, "
              f"{ing['items']:,} messages written")
        print(f"  json.load  {lo['seconds']:7.2f} s  {r['entries'] / lo['seconds']:>10,.0f} entries/s  "
              f"peak RSS {lo['rss_mb']:7.0f} MB")
        print(f"  ingest     {ing['seconds']:7.2f} s  {r['entries'] / ing['seconds']:>10,.0f} entries/s  "
              f"peak RSS {ing['rss_mb']:7.0f} MB")
        print(f"  time  ingest/json.load = {t_ratio:.2f}x  (target <= 2.00x: {'met' if t_ratio <= 2 else 'MISSED'})")
        print(f"  RSS   ingest/json.load = {m_ratio:.3f}  (target < 0.100: {'met' if m_ratio < 0.1 else 'MISSED'})")


if __name__ == "__main__":
    main()
