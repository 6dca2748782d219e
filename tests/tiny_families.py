"""Tiny random-weight models of the architectures users deploy, on the tiny base's tokenizer (for serving tests).

Each is hidden 64, 2-3 layers, fp32, with weights drawn wider than the default init (std 0.2 mostly) so greedy
outputs depend on the context; long-context settings are scaled down so a test's prompts cross them: sliding windows of
8 tokens, a LongRoPE short/long switch at 40 positions, `dynamic` NTK past 32. `build(name, tokenizer_dir, out)`
saves one as a normal checkpoint (config, weights, the tokenizer) that `load_backend` and PEFT load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

WINDOW = 8  # sliding window of the windowed families: shorter than every test prompt
SWITCH = 40  # LongRoPE original_max_position_embeddings: short prompts cross it while generating
DYNAMIC_MAX = 32  # dynamic NTK max_position_embeddings

STD = {"gemma3_multimodal": 0.02, "gpt2": 0.3}  # weight std where 0.2 gives outputs that ignore the context
FAMILIES = ("llama", "llama3_rope", "qwen2", "qwen3_yarn", "mistral_window", "gemma3_window", "gemma3_multimodal",
            "phi3_fused", "phi3_longrope", "llama_dynamic", "gpt2")


def config_of(name: str, vocab: int, pad: int, eos: int):
    """The transformers config of family `name` at the tiny size."""
    import transformers as t

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=pad, eos_token_id=eos,
                  bos_token_id=None, max_position_embeddings=512, tie_word_embeddings=False)
    half = 64 // 4 // 2  # rotary pairs per head
    if name == "llama":
        return t.LlamaConfig(**common)
    if name == "llama3_rope":
        return t.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if name == "llama_dynamic":
        return t.LlamaConfig(**{**common, "max_position_embeddings": DYNAMIC_MAX},
                             rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    if name == "qwen2":
        return t.Qwen2Config(**common)
    if name == "qwen3_yarn":
        return t.Qwen3Config(**common, head_dim=16, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32})
    if name == "mistral_window":
        return t.MistralConfig(**common, sliding_window=WINDOW, head_dim=16)
    if name in ("gemma3_window", "gemma3_multimodal"):
        text = t.Gemma3TextConfig(**{**common, "num_hidden_layers": 3}, head_dim=16, sliding_window=WINDOW,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  query_pre_attn_scalar=16, final_logit_softcapping=30.0)
        if name == "gemma3_window":
            return text
        vision = t.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=14)
        return t.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=1,
                              image_token_index=vocab - 1, boi_token_index=vocab - 2, eoi_token_index=vocab - 3,
                              pad_token_id=pad, eos_token_id=eos, bos_token_id=None)
    if name == "phi3_fused":
        return t.Phi3Config(**common)
    if name == "phi3_longrope":
        return t.Phi3Config(**{**common, "max_position_embeddings": 4 * SWITCH},
                            original_max_position_embeddings=SWITCH, rope_parameters={
                                "rope_type": "longrope", "rope_theta": 10000.0,
                                "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                "long_factor": [2.0 + 3.0 * i for i in range(half)]})
    if name == "gpt2":
        return t.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512, pad_token_id=pad,
                            eos_token_id=eos, bos_token_id=eos)
    raise KeyError(name)


def build(name: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """Save family `name` (random weights, std 0.2) with the tokenizer of `tokenizer_dir` at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = config_of(name, len(tok), tok.pad_token_id, tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, STD.get(name, 0.2))
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
