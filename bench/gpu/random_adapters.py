"""Random LoRA adapters on one loaded base, with convo_adapter.json: `random_adapters.py BASE OUT N`.

`inference.adapters.random_adapter` reloads the base for every adapter, which took minutes per adapter on the GPU
machine's CPU; this loads the base once and adds the adapters to it.
"""

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from inference.adapter_meta import AdapterMeta, Speaker, base_model_ref, write_adapter_meta  # noqa: E402
from inference.prompt_format import FORMAT_VERSION, make_tag  # noqa: E402


def main() -> None:
    """Write N adapters p0..pN-1 under OUT."""
    base, root, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    ref = base_model_ref(base)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device)
    peft_model = None
    for i in range(count):
        t0 = time.time()
        torch.manual_seed(i)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=f"p{i}")
        else:
            peft_model.add_adapter(f"p{i}", cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(str(root / "_tmp"), selected_adapters=[f"p{i}"])
        saved = root / "_tmp" / f"p{i}"
        out = root / f"p{i}"
        (saved if saved.exists() else root / "_tmp").rename(out)
        persona = f"Persona {i}"
        tag = make_tag(persona)
        write_adapter_meta(out, AdapterMeta(
            persona=Speaker(name=persona, tag=tag), me=Speaker(name="Owner", tag=make_tag("Owner", [tag])),
            base_model=ref, format_version=FORMAT_VERSION,
        ))
        print(f"adapter p{i} {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
