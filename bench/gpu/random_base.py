"""A base with SmolLM2's architecture and real tokenizer but random weights: `random_base.py SRC OUT [LAYERS]`."""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    """Write OUT from SRC's config and tokenizer (SRC's weights are not read)."""
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = AutoConfig.from_pretrained(src)
    if len(sys.argv) > 3:
        cfg.num_hidden_layers = int(sys.argv[3])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random weights")
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)


if __name__ == "__main__":
    main()
