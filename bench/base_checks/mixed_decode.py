"""The worker's decode loop on a real base: two adapters and the bare base mixed in one batch, greedy, each row
against the same request alone; then the prefix cache: the next turn of a chat reuses the previous prompt.

    PYTHONPATH=. .venv/bin/python bench/base_checks/mixed_decode.py BASE ADAPTERS_DIR PERSONA_A,PERSONA_B
"""

import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

torch.set_num_threads(1)
from tests.test_worker_batching import make_backend  # noqa: E402
from tests.test_worker_batching import make_item as item  # noqa: E402

base, adapters = sys.argv[1], sys.argv[2]
t0 = time.monotonic()
b = make_backend(base, adapters)
print(
    "backend", f"{time.monotonic() - t0:.1f}s", "personas", sorted(b.registry.scan() or []) if False else ""
)
H = [
    {"speaker": "Sam", "text": "hey are we still on for tonight?"},
    {"speaker": "Jordan", "text": "yes!! 7?"},
    {"speaker": "Sam", "text": "sounds good, where do you want to eat"},
]
g = dict(temperature=0, max_new_tokens=20)
personas = sys.argv[3].split(",")
items = [item(b, personas[0], H, **g), item(b, personas[1], H, **g), item(b, "__base__", H, **g)]
t0 = time.monotonic()
mixed = b.generate(items)
tm = time.monotonic() - t0
alone = []
t0 = time.monotonic()
for it in items:
    alone.append(b.generate([it])[0])
ta = time.monotonic() - t0
for name, m, a in zip(personas + ["__base__"], mixed, alone, strict=True):
    print(name, "mixed == alone:", m.candidates == a.candidates, repr(m.candidates), m.new_tokens, "tokens")
print(f"mixed batch {tm:.1f}s, one at a time {ta:.1f}s")
H2 = H + [
    {"speaker": "Jordan", "text": "the thai place?"},
    {"speaker": "Sam", "text": "perfect, see you there"},
]
second = item(b, personas[0], H2, **g)
cache, b.prefix_cache = b.prefix_cache, None
t0 = time.monotonic()
without = b.generate([second])[0]
t_without = time.monotonic() - t0
b.prefix_cache = cache
b.generate([items[0]])
saved = b.prefill_tokens_saved
t0 = time.monotonic()
with_cache = b.generate([second])[0]
t_with = time.monotonic() - t0
print(
    "prefix cache: tokens saved",
    b.prefill_tokens_saved - saved,
    "equal:",
    with_cache.candidates == without.candidates,
    f"{t_without:.1f}s without, {t_with:.1f}s with",
    repr(with_cache.candidates),
)
b.close()
