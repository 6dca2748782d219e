"""CPU seconds (this process, 1 thread) per LoRA training step and per generated token, SmolLM2-135M vs Gemma 3
270M, alternating, on Jordan's demo rows: contention changes wall time, much less the process's CPU time.

    PYTHONPATH=. .venv/bin/python bench/base_checks/cpu_ratio.py DATASET_DIR models/smollm2-135m models/gemma3-270m
"""

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

torch.set_num_threads(1)
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from inference.engine import tokenize_pair  # noqa: E402
from training.train import read_dataset  # noqa: E402

data = read_dataset(__import__("pathlib").Path(sys.argv[1]))
bases = dict(smollm2=sys.argv[2], gemma=sys.argv[3])
rows = data.train[:16]
models = {}
for name, path in bases.items():
    tok = AutoTokenizer.from_pretrained(path)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    batches = []
    for i in range(0, 16, 4):
        seqs = [tokenize_pair(tok, r["prompt"], r["completion"]) for r in rows[i : i + 4]]
        seqs = [(ids[-96:], mask[-96:]) for ids, mask in seqs]  # keep the end (the completion), 96 tokens
        L = max(len(s[0]) for s in seqs)
        pad = tok.pad_token_id or 0
        ids = torch.tensor([[pad] * (L - len(a)) + a for a, _ in seqs])
        att = torch.tensor([[0] * (L - len(a)) + [1] * len(a) for a, _ in seqs])
        lab = torch.tensor(
            [[-100] * (L - len(a)) + [x if k else -100 for x, k in zip(a, mk, strict=True)] for a, mk in seqs]
        )
        batches.append((ids, att, lab))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    models[name] = (tok, m, batches, opt)
res = {n: {"step_cpu": [], "step_wall": [], "tok_cpu": [], "tok_wall": []} for n in bases}
prompt = data.val[0]["prompt"]
for rep in range(3):
    for name, (tok, m, batches, opt) in models.items():
        ids, att, lab = batches[rep % len(batches)]
        c0, w0 = time.process_time(), time.monotonic()
        loss = m(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        res[name]["step_cpu"].append(time.process_time() - c0)
        res[name]["step_wall"].append(time.monotonic() - w0)
        x = tok(prompt, return_tensors="pt")
        x = {k: v[:, -128:] for k, v in x.items()}
        c0, w0 = time.process_time(), time.monotonic()
        with torch.no_grad():
            out = m.generate(**x, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        n = out.shape[1] - x["input_ids"].shape[1]
        res[name]["tok_cpu"].append((time.process_time() - c0) / n)
        res[name]["tok_wall"].append((time.monotonic() - w0) / n)
        print(
            name,
            rep,
            f"step cpu {res[name]['step_cpu'][-1]:.2f}s wall {res[name]['step_wall'][-1]:.2f}s; "
            f"token cpu {res[name]['tok_cpu'][-1] * 1000:.0f}ms wall {res[name]['tok_wall'][-1] * 1000:.0f}ms; tokens/batch {int(batches[rep % len(batches)][1].sum())}",
            flush=True,
        )
med = {n: {k: sorted(v)[1] for k, v in r.items()} for n, r in res.items()}
print(json.dumps(med, indent=1))
print("ratio gemma/smollm2:", {k: round(med["gemma"][k] / med["smollm2"][k], 2) for k in med["gemma"]})
