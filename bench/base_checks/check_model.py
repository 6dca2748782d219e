"""A converted base's sanity checks: BOS handling, NLL of four plain English sentences with and without BOS, and a
chat continuation of a bare `[SAM] hey\n[JORDAN]` prompt (greedy and sampled), fp32, one thread.

    PYTHONPATH=. .venv/bin/python bench/base_checks/check_model.py models/gemma3-270m
"""

import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

d = sys.argv[1]
t0 = time.time()
tok = AutoTokenizer.from_pretrained(d)
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
m.eval()
print(
    "load", time.time() - t0, type(tok).__name__, "bos", tok.bos_token, tok.bos_token_id, "eos", tok.eos_token
)
ids = tok("hello world")["input_ids"]
print("default ids", ids, tok.convert_ids_to_tokens(ids))
print("no special", tok("hello world", add_special_tokens=False)["input_ids"])
print(
    "newline tokens",
    tok.convert_ids_to_tokens(tok("[SAM] hey\n[JORDAN]", add_special_tokens=False)["input_ids"]),
)
sents = [
    "The quick brown fox jumps over the lazy dog.",
    "I went to the store yesterday to buy some milk and bread, but they were out of both.",
    "Paris is the capital and most populous city of France.",
    "Can you send me the file when you get a chance? Thanks!",
]
for bos in (True, False):
    tot, n = 0.0, 0
    for s in sents:
        x = tok(s, return_tensors="pt", add_special_tokens=bos)["input_ids"]
        if not bos:
            x = x  # first token has no context
        with torch.no_grad():
            out = m(x, labels=x)
        k = x.shape[1] - 1
        tot += out.loss.item() * k
        n += k
    print("bos" if bos else "nobos", "NLL/token", tot / n, "PPL", math.exp(tot / n))
for p in [
    "[SAM] hey\n[JORDAN]",
    "[SAM] hey, how was your weekend?\n[JORDAN] pretty good, went hiking\n[SAM] nice where did you go?\n[JORDAN]",
]:
    x = tok(p, return_tensors="pt")["input_ids"]
    t0 = time.time()
    with torch.no_grad():
        g = m.generate(x, max_new_tokens=30, do_sample=False)
    print(repr(p), "->", repr(tok.decode(g[0, x.shape[1] :])), f"{time.time() - t0:.1f}s")
    torch.manual_seed(0)
    with torch.no_grad():
        g = m.generate(x, max_new_tokens=30, do_sample=True, temperature=0.8, top_p=0.95)
    print("  sampled ->", repr(tok.decode(g[0, x.shape[1] :])))
