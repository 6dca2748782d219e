"""The decode loop on one GPU, sized for a 15-minute device lease: three architectures, bf16 and 4-bit, batching.

    python bench/gpu/run.py --tokenizer DIR [--out results.json] [--budget-s 540]
    python bench/gpu/run.py --tokenizer DIR --cpu-smoke          # a tiny config on the CPU: checks it runs

Models are built on the device with random weights (nothing to copy): the SmolLM2-135M, SmolLM2-1.7B and
Llama-3-8B architectures (layers, widths, heads, KV heads), all with the given tokenizer's vocabulary (SmolLM2's
49,152, so Llama-3-8B's embedding and LM head are 0.65 GB smaller than the real one's). Speed and memory do not
depend on the weights; random weights rarely write a stop tag, and stops are turned off anyway, so every request
generates exactly --max-new-tokens. 8 random LoRA adapters (rank 16, every linear layer of every block) are put
straight into the adapter bank.

For each architecture, bf16 then 4-bit NF4 (the bf16 layers quantized in place): a single stream, then 1/16/64
concurrent requests (2x that many requests, kept in flight) over 1 and over 8 adapters: tokens/s, draft p50/p99
(a draft is one request of --max-new-tokens), the cost of mixing 8 adapters vs 1 at the top concurrency, peak
GPU memory, and each tokens/s as a share of the roofline: rows x HBM bandwidth / weight bytes read per decode
step (KV reads ignored: an upper bound). Architectures past --budget-s are skipped and listed as skipped. Results
go to --out (JSON) and a table on stdout. The mixed-adapter run at the top concurrency is repeated with the
other way of mixing (inference.lora_batch: "gather" vs "dense"), to settle which suits the GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker import closed_loop  # noqa: E402 - bench/worker.py: keep N requests in flight, tokens/s and latencies

ARCHS = {  # (hidden, intermediate, layers, heads, kv heads, head dim, tie embeddings)
    "smollm2-135m": (576, 1536, 30, 9, 3, 64, True),
    "smollm2-1.7b": (2048, 8192, 24, 32, 32, 64, True),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128, False),
    "cpu-smoke": (64, 128, 2, 2, 1, 32, True),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINES = ["hey are we still going tonight?", "yeah! want to meet at 7?", "sounds perfect", "ok see you there",
         "running late sorry", "did you see the game?", "coffee tomorrow?", "haha same"]


def build_model(arch: str, vocab: int, device: str):
    """A Llama-architecture model with random weights, built directly on `device`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, head_dim, tie = ARCHS[arch]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                         tie_word_embeddings=tie, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def quantize_4bit(model, device: str) -> None:
    """Swap every linear layer of the blocks for a bitsandbytes NF4 one, in place (frees the bf16 weights)."""
    import bitsandbytes as bnb
    import torch

    compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=compute,
                                          quant_type="nf4", compress_statistics=True, device="meta")
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True).to(device)
                    setattr(parent, name, q)
                    del child
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (4-bit weights as packed, plus their quantization state)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def add_adapters(bank, model, count: int, rank: int = 16) -> list[str]:
    """`count` random LoRA adapters on every targeted linear layer, straight into the bank."""
    import torch

    names = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for i in range(count):
        weights = {}
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                a = torch.randn(rank, module.in_features, generator=g) * 0.01
                b = torch.randn(module.out_features, rank, generator=g) * 0.01
                weights[name] = (a, b)
        bank.put(f"p{i}", weights, alpha=2.0 * rank)
        names.append(f"p{i}")
    return names


def items_for(adapters: list[str], count: int, max_new_tokens: int, history: int = 6):
    """Greedy one-message drafts with short chat histories, spread over `adapters`."""
    from inference.batching import BatchItem, build_prompt
    from inference.protocol import GenerateRequest

    out = []
    for i in range(count):
        q = GenerateRequest.build(persona="p", temperature=0, max_new_tokens=max_new_tokens, history=[
            {"speaker": "OWNER" if k % 2 else "FRIEND", "text": LINES[(i + k) % len(LINES)]} for k in range(history)])
        prompt, target = build_prompt(q, None)
        out.append(BatchItem(q, prompt, target, adapters[i % len(adapters)]))
    return out


def bench_one(arch: str, quant: str, model, tokenizer, device: str, args) -> dict:
    """Every measurement of one (architecture, precision)."""
    import torch

    from inference.decode import DecodeBackend
    from inference.lora_batch import LoraBank

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    bank = LoraBank(model, torch.bfloat16 if cuda else torch.float32)
    backend = DecodeBackend(model, tokenizer, bank, device, max_rows=max(args.concurrency))
    backend.newline_ids, backend.eos_ids = frozenset(), frozenset()  # every request runs max_new_tokens
    adapters = add_adapters(bank, model, args.adapters)
    nbytes = weight_bytes(model)
    steps_per_s_roofline = args.hbm_gbps * 1e9 / nbytes
    n = args.max_new_tokens
    t0 = time.perf_counter()
    backend.generate(items_for(adapters, 4, 4))  # warm-up
    warm_s = time.perf_counter() - t0
    out: dict = {"arch": arch, "quant": quant, "weight_mib": nbytes / 2**20, "warm_up_s": warm_s, "runs": []}
    single = closed_loop(backend, items_for(adapters[:1], args.single_requests, n), 1)
    single.update(adapters=1, roofline_share=single["tokens_per_s"] / steps_per_s_roofline)
    out["runs"].append(single)
    for names in (adapters[:1], adapters):
        for c in args.concurrency:
            if c == 1:
                continue
            run = closed_loop(backend, items_for(names, 2 * c, n), c)
            run.update(adapters=len(names), roofline_share=run["tokens_per_s"] / (c * steps_per_s_roofline))
            out["runs"].append(run)
    top = max(args.concurrency)
    by = {(r["adapters"], r["concurrency"]): r for r in out["runs"]}
    if (1, top) in by and (len(adapters), top) in by:
        out["mixing_cost"] = by[(1, top)]["tokens_per_s"] / by[(len(adapters), top)]["tokens_per_s"]
        out["batched_vs_single"] = by[(len(adapters), top)]["tokens_per_s"] / single["tokens_per_s"]
        default, bank.mixed = bank.mixed, "gather" if bank.mixed == "dense" else "dense"
        other = closed_loop(backend, items_for(adapters, 2 * top, n), top)  # the other way of mixing adapters
        out["mixed_modes"] = {default: by[(len(adapters), top)]["tokens_per_s"], bank.mixed: other["tokens_per_s"]}
        bank.mixed = default
    if cuda:
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    backend.close()
    bank.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="A dir with a tokenizer (SmolLM2's).")
    parser.add_argument("--archs", default="smollm2-135m,smollm2-1.7b,llama3-8b")
    parser.add_argument("--quant", default="bf16,4bit")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--single-requests", type=int, default=8)
    parser.add_argument("--hbm-gbps", type=float, default=4800.0, help="HBM bandwidth (H200: 4,800 GB/s).")
    parser.add_argument("--budget-s", type=float, default=540.0, help="Skip what would start after this.")
    parser.add_argument("--out", type=Path, default=Path("gpu_bench.json"))
    parser.add_argument("--cpu-smoke", action="store_true", help="A tiny architecture on the CPU, to check it runs.")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    import torch
    from transformers import AutoTokenizer

    if args.cpu_smoke:
        torch.set_num_threads(1)
        archs, device = ["cpu-smoke"], "cpu"
        args.concurrency, args.single_requests, args.max_new_tokens = [1, 4], 2, 6
    else:
        archs, device = args.archs.split(","), "cuda"
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-smoke to check the script on the CPU")
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    started = time.perf_counter()
    results = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
               "hbm_gbps": args.hbm_gbps, "max_new_tokens": args.max_new_tokens, "results": [], "skipped": []}
    for arch in archs:
        model = None
        for quant in args.quant.split(","):
            if time.perf_counter() - started > args.budget_s:
                results["skipped"].append(f"{arch} {quant}")
                continue
            t0 = time.perf_counter()
            if model is None:
                model = build_model(arch, len(tokenizer), device)
            if quant == "4bit":
                quantize_4bit(model, device)
            build_s = time.perf_counter() - t0
            try:
                r = bench_one(arch, quant, model, tokenizer, device, args)
            except Exception as e:  # noqa: BLE001 - one configuration failing must not lose the others' figures
                r = {"arch": arch, "quant": quant, "error": f"{type(e).__name__}: {e}"[:500]}
            r["build_s"] = build_s
            results["results"].append(r)
            print(json.dumps(r), flush=True)
            args.out.write_text(json.dumps(results, indent=2))
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    results["wall_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=2))
    print(f"{'arch':14} {'quant':5} {'adapters':>8} {'conc':>4} {'tok/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'roofline':>8}")
    for r in results["results"]:
        for run in r.get("runs", []):
            print(f"{r['arch']:14} {r['quant']:5} {run['adapters']:>8} {run['concurrency']:>4} "
                  f"{run['tokens_per_s']:9.1f} {run['p50_ms']:8.0f} {run['p99_ms']:8.0f} {run['roofline_share']:8.1%}")
        if "error" in r:
            print(f"{r['arch']:14} {r['quant']:5} error: {r['error']}")
        else:
            print(f"{r['arch']:14} {r['quant']:5} mixing {r.get('mixing_cost', 0):.2f}x  batched/single "
                  f"{r.get('batched_vs_single', 0):.1f}x  peak {r.get('peak_memory_mib', 0):.0f} MiB  "
                  f"weights {r['weight_mib']:.0f} MiB  mixed modes tok/s {r.get('mixed_modes')}")
    if results["skipped"]:
        print("skipped (time budget):", ", ".join(results["skipped"]))
    print(f"total {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
