"""An offline base model: a byte-level BPE tokenizer and a small Llama trained from scratch on chat text.

Model hubs are unreachable here, so demos and tests need a base built locally. The corpus is rendered in the
prompt format (one `[TAG] text` line per message), so the base already knows the shape of a conversation before
any adapter is trained on it. `build_tiny_base` is the library function (tests build a very small variant in
seconds); `chitchat_texts` and `messages_texts` turn a corpus into those texts.

The result is a normal HF checkpoint (`AutoModelForCausalLM` / `AutoTokenizer`) plus `convo_base.json`, which
records the corpus, the speakers left out and the sha256 of the weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from errors import ConvoError
from inference.prompt_format import END_TAG, ROLE_FRIEND, ROLE_ME, Turn, make_tag, render

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
BASE_META_FILE = "convo_base.json"

# Speaker tags for corpus conversations. Names (not only [ME]/[FRIEND]) so the base learns that any bracketed tag
# is a speaker, whatever the persona's tag turns out to be; the role tags are in the pool too.
_NAMES = (
    "Alice Bob Riya Sam Maya Leo Zoe Omar Ana Ben Chloe Dev Emma Finn Grace Hugo Ines Jack Kai Lina Marco Nora "
    "Priya Quinn Rosa Theo Uma Vera Will Yuki Jo Tom Lea Max Mia Noah Ivy Eli Ada Luca"
).split()


class BaseModelError(ConvoError):
    """The offline base model cannot be built (empty corpus, unknown corpus file, ...)."""


@dataclass(frozen=True, slots=True)
class TinyBaseResult:
    """What build_tiny_base produced."""

    out_dir: Path
    steps: int
    final_loss: float
    seconds: float
    n_params: int
    tokens_seen: int


def speaker_tags(n: int, rng: random.Random) -> list[str]:
    """`n` distinct speaker tags for one conversation: mostly names, sometimes the [ME]/[FRIEND] role tags."""
    if n == 2 and rng.random() < 0.15:
        return [ROLE_ME, ROLE_FRIEND] if rng.random() < 0.5 else [ROLE_FRIEND, ROLE_ME]
    return [make_tag(name) for name in rng.sample(_NAMES, n)]


def render_conversation(turns: Sequence[tuple[str, str]], rng: random.Random) -> str:
    """Render (speaker_id, text) turns in the prompt format with fresh tags, ending with `[END]`."""
    speakers = list(dict.fromkeys(s for s, _ in turns))
    tags = dict(zip(speakers, speaker_tags(len(speakers), rng), strict=True))
    return render([Turn(tags[s], t) for s, t in turns if t.strip()]) + f"\n[{END_TAG}]"


def chitchat_texts(
    exclude_speakers: Iterable[str] = (), seed: int = 0, limit: int | None = None
) -> tuple[list[str], dict]:
    """Conversations of the chitchat-dataset package in the prompt format, and a description for convo_base.json.

    Conversations involving any of `exclude_speakers` (sender ids) are left out entirely.
    """
    excluded = set(exclude_speakers)
    rng = random.Random(seed)
    texts, skipped = [], 0
    data = _chitchat()
    for conv_id in sorted(data):
        turns = [(m["sender"], m["text"]) for block in data[conv_id]["messages"] for m in block]
        if excluded & {s for s, _ in turns}:
            skipped += 1
            continue
        if len(turns) >= 2:
            texts.append(render_conversation(turns, rng))
        if limit is not None and len(texts) >= limit:
            break
    digest = hashlib.sha256(Path(data.path).read_bytes()).hexdigest()
    return texts, {"corpus": "chitchat", "source_sha256": digest, "conversations_excluded": skipped}


@functools.cache
def _chitchat():
    """The chitchat-dataset conversations (a 40 MB JSON file: loaded once per process)."""
    try:
        import chitchat_dataset
    except ImportError as e:  # pragma: no cover - part of the ml extra
        raise BaseModelError("the chitchat corpus needs the chitchat-dataset package: pip install -e '.[ml]'") from e
    return chitchat_dataset.Dataset()


def messages_texts(
    path: Path, exclude_speakers: Iterable[str] = (), seed: int = 0, session_gap_min: float = 60.0
) -> tuple[list[str], dict]:
    """Chats of a canonical messages.jsonl (from `convo ingest`) in the prompt format, split into sessions.

    Messages by `exclude_speakers` (speaker id or display name) are dropped, and so are the sessions they took
    part in, so a study can train a base that never saw a given person.
    """
    from datetime import datetime

    path = Path(path)
    if not path.is_file():
        raise BaseModelError(f"{path}: corpus file not found (use --corpus chitchat or a messages.jsonl)")
    excluded = set(exclude_speakers)
    chats: dict[str, list[tuple[datetime, str, str, str]]] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ts = datetime.fromisoformat(str(rec["ts"]).replace("Z", "+00:00"))
                chats.setdefault(str(rec.get("chat", "")), []).append(
                    (ts, str(rec["speaker_id"]), str(rec.get("speaker") or rec["speaker_id"]), rec["text"] or "")
                )
            except (ValueError, KeyError, TypeError) as e:
                raise BaseModelError(f"{path}:{n}: not a message record ({e}); expected `convo ingest` output") from e
    rng = random.Random(seed)
    texts, skipped = [], 0
    for chat in chats.values():
        chat.sort(key=lambda m: m[0])
        sessions: list[list[tuple[datetime, str, str, str]]] = []
        for m in chat:
            if sessions and (m[0] - sessions[-1][-1][0]).total_seconds() <= session_gap_min * 60:
                sessions[-1].append(m)
            else:
                sessions.append([m])
        for s in sessions:
            if any(sid in excluded or name in excluded for _, sid, name, _ in s):
                skipped += 1
                continue
            if len(s) >= 2:
                texts.append(render_conversation([(sid, text) for _, sid, _, text in s], rng))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return texts, {"corpus": str(path), "source_sha256": digest, "sessions_excluded": skipped}


def corpus_texts(corpus: str, exclude_speakers: Iterable[str] = (), seed: int = 0) -> tuple[list[str], dict]:
    """Texts for `--corpus`: "chitchat" or the path of a messages.jsonl."""
    if corpus == "chitchat":
        return chitchat_texts(exclude_speakers, seed=seed)
    return messages_texts(Path(corpus), exclude_speakers, seed=seed)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (no unknown tokens, any emoji encodes) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # No BOS: prompts and completions are tokenized without special tokens, and EOS only separates documents.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=2048, padding_side="right"
    )


def build_tiny_base(
    out_dir: Path | str,
    texts: Sequence[str],
    *,
    vocab_size: int = 4096,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    max_steps: int = 1_000_000,
    max_minutes: float = 3.0,
    seed: int = 0,
    seq_len: int = 128,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    meta: dict | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> TinyBaseResult:
    """Train a tokenizer and a small Llama on `texts` and save both as an HF checkpoint in `out_dir`.

    Training stops at `max_steps` or after `max_minutes`, whichever comes first (0 steps gives a random model,
    which is enough for plumbing tests). `on_step(step, loss, elapsed_s)` is called after every step.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from inference.adapter_meta import local_model_sha256

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise BaseModelError("no conversations to train the base model on (empty corpus or everything excluded)")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    rng = random.Random(seed)

    tokenizer = train_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3 // 8 * 8 or 8,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max(512, seq_len),
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())

    # One long stream of documents separated by EOS, cut into seq_len blocks (classic LM pre-training).
    stream: list[int] = []
    order = list(range(len(texts)))
    rng.shuffle(order)
    # The raw tokenizers backend: fast batch encoding, and no "longer than model_max_length" warnings for whole
    # conversations that are cut into blocks below anyway.
    for enc in tokenizer.backend_tokenizer.encode_batch([texts[i] for i in order], add_special_tokens=False):
        stream += enc.ids + [tokenizer.eos_token_id]
    n_blocks = max(1, len(stream) // seq_len)
    if len(stream) < seq_len:
        stream += [tokenizer.eos_token_id] * (seq_len - len(stream))
    blocks = torch.tensor(stream[: n_blocks * seq_len]).view(n_blocks, seq_len)  # (n_blocks, seq_len)

    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = 20
    start, step, loss_ema, tokens_seen = time.monotonic(), 0, float("nan"), 0
    budget_s = max_minutes * 60
    model.train()
    while step < max_steps and time.monotonic() - start < budget_s:
        idx = torch.randint(0, n_blocks, (min(batch_size, n_blocks),))
        batch = blocks[idx]
        # Warmup then a constant rate: the run length is a wall-clock budget, so no schedule can know its end.
        for g in opt.param_groups:
            g["lr"] = learning_rate * min(1.0, (step + 1) / warmup)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += batch.numel()
        value = loss.item()
        loss_ema = value if loss_ema != loss_ema else 0.9 * loss_ema + 0.1 * value
        if on_step is not None:
            on_step(step, loss_ema, time.monotonic() - start)
    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    seconds = time.monotonic() - start

    # Write into a sibling temp dir, then rename: a crash never leaves a half-written model at out_dir.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {
        **(meta or {}),
        "texts": len(texts),
        "train_tokens": len(stream),
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "steps": step,
        "seconds": round(seconds, 1),
        "final_loss": None if loss_ema != loss_ema else round(loss_ema, 4),
        "seed": seed,
        "weights_sha256": local_model_sha256(tmp),
    }
    (tmp / BASE_META_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return TinyBaseResult(out_dir, step, loss_ema, seconds, n_params, tokens_seen)


def sample_text(model_dir: Path | str, prompt: str, *, max_new_tokens: int = 40, seed: int = 0) -> str:
    """Sample a continuation of `prompt` from a saved base (for the end-of-build demo line)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
