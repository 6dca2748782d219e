"""The generation engine: a base model with (optionally) one persona adapter, used by simulate, eval, training's
samples and the preference step; `load_base` is the one loader of a base model, for them and the worker.

Heavy module (imports torch). Prompts come from inference.prompt_format. Generation goes through the worker's own
path, so what simulate and eval measure is what users get: each call builds a DecodeBackend (inference.decode:
the decode loop, its stops on token ids, repetition rule and seeded sampling) on this model, with a LoraBank
(inference.lora_batch) filled from the PEFT adapter's current weights (PEFT's own LoRA is off meanwhile), and
`sample`/`sample_batch` run the worker's candidate step (inference.batching.CandidateBackend) on it. HF
`generate` is not used here: it stays as the reference the tests compare the loop with.

Tokenization is shared with training (`tokenize_pair`): the prompt is encoded alone and together with its
completion, and the completion starts where the two id lists diverge, as TRL does for prompt/completion data.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from errors import ConfigError, ConvoError, TrainError
from inference.adapter_meta import AdapterMeta, check_compatible, read_adapter_meta
from inference.candidates import Outcome
from inference.completion_nll import token_nll
from inference.prompt_format import (
    Turn,
    check_tag,
    line_speaker,
    parse_line,
    render_prompt,
    split_completion,
    trim_burst,
)

trim_completion = trim_burst  # the name simulate and eval know


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as training and serving both see them (the tokenizer's own special tokens, e.g. BOS)."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(input_ids, completion_mask) of prompt+completion; mask is 1 on completion tokens only.

    The completion starts where the encodings of the prompt alone and of prompt+completion diverge (normally the
    prompt's length: prompts end with `]` and completions start with a space, a token boundary for BPE).
    """
    prompt_ids = encode(tokenizer, prompt)
    ids = encode(tokenizer, prompt + completion)
    start = common_prefix_length(prompt_ids, ids)
    return ids, [0] * start + [1] * (len(ids) - start)


ENGINE_ADAPTER = "engine"  # the name of the engine's adapter in its LoRA bank
ENGINE_PREFIX_CACHE_BYTES = 64 * 2**20  # per call: re-draws of a prompt reuse its KV


def prompt_seed(seed: int | None, prompt: str) -> int | None:
    """The random stream of one prompt's rows: fixed by `seed` and the prompt text (None: unseeded)."""
    if seed is None:
        return None
    import zlib

    return (seed * 1_000_003 + zlib.crc32(prompt.encode("utf-8"))) % 2**62  # re-draws add to it: stays < 2**64


class Engine:
    """A loaded base model (+ adapter) and its tokenizer; `meta` is the adapter's AdapterMeta (None for a bare base)."""

    def __init__(self, model, tokenizer, meta: AdapterMeta | None = None, device: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = device or str(next(model.parameters()).device)
        self._bare = False  # inside adapter_disabled()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def load(
        cls,
        base: str | Path | None = None,
        adapter: str | Path | None = None,
        *,
        qlora: bool = False,
        device: str | None = None,
    ) -> Engine:
        """Load `base` (default: the adapter's recorded base) and `adapter`, after checking they fit together.

        With `qlora`, the base is loaded in 4-bit NF4 (load_base); otherwise bf16 on CUDA, float32 on the CPU.
        """
        meta = None
        if adapter is not None:
            meta = read_adapter_meta(adapter)
            check_compatible(meta, base)
            base = base if base is not None else meta.base_model.id
            if meta.base_model.local_path_sha256 is not None and not Path(base).is_dir():
                raise ConvoError(
                    f"base model {base} recorded by {adapter} is not there any more: pass --base DIR with the same model"
                )
        if base is None:
            raise ConvoError("no model to load: give a base model (--base) or an adapter (--adapter)")
        revision = meta.base_model.revision if meta is not None and not Path(base).is_dir() else None
        model, tokenizer, device = load_base(base, "4bit" if qlora else "none", device, revision=revision)
        if adapter is not None:
            import warnings

            from peft import PeftModel

            with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5; not ours to fix
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(model, str(adapter))
            model.eval()
        return cls(model, tokenizer, meta, device)

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Run the bare base model inside this block (no-op without an adapter): scoring and generation alike."""
        if not hasattr(self.model, "disable_adapter") or self._bare:
            yield
            return
        self._bare = True
        try:
            with self.model.disable_adapter():
                yield
        finally:
            self._bare = False

    def generate_raw(
        self,
        prompt: str,
        target_tag: str,
        *,
        n: int = 3,
        temperature: float = 0.8,
        top_p: float = 0.95,
        max_new_tokens: int = 64,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
    ) -> list[str]:
        """`n` sampled completions of `prompt` (which ends with `[TARGET]`), each trimmed before the line that ends the burst.

        A completion reads like the training targets without their final tag: " msg1\\n[TARGET] msg2".
        Repetition control (inference.repetition) counts the generated burst only.
        """
        return self.generate_raw_batch(
            [prompt], target_tag, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        )[0]

    def generate_raw_batch(
        self,
        prompts: Sequence[str],
        target_tag: str,
        *,
        n: int = 3,
        temperature: float = 0.8,
        top_p: float = 0.95,
        max_new_tokens: int = 64,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
    ) -> list[list[str]]:
        """`generate_raw` for many prompts at once: `n` rows per prompt, all in the worker's decode loop.

        Every row computes what it would alone (inference.decode), so a prompt's completions do not depend on the
        batch it shares; with `seed`, each prompt's rows draw from a stream seeded by the seed and the prompt.
        """
        check_tag(target_tag)
        if not prompts:
            return []
        with self._decoding(repetition_penalty, no_repeat_ngram_size) as backend:
            items = self._items(prompts, target_tag, n=n, temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens, seed=seed)
            return [result.raw for result in backend.generate(items)]

    def generate(
        self,
        prompt: str,
        target_tag: str,
        *,
        n: int = 3,
        temperature: float = 0.8,
        top_p: float = 0.95,
        max_new_tokens: int = 64,
        seed: int | None = None,
    ) -> list[list[str]]:
        """`n` candidates for the target's next burst, each as its list of messages."""
        return self.generate_batch(
            [prompt], target_tag, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
        )[0]

    def generate_batch(
        self,
        prompts: Sequence[str],
        target_tag: str,
        *,
        n: int = 3,
        temperature: float = 0.8,
        top_p: float = 0.95,
        max_new_tokens: int = 64,
        seed: int | None = None,
    ) -> list[list[list[str]]]:
        """`generate` for many prompts in one run of the decode loop: per prompt, `n` candidates."""
        raw = self.generate_raw_batch(
            prompts, target_tag, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
        )
        return [[split_completion(text, target_tag) for text in texts] for texts in raw]

    def sample(self, prompt: str, target_tag: str, opts: SimulateOptions) -> Outcome:
        """Clean, distinct candidates for one prompt through inference.candidates (re-sampling, rerank by `opts`).

        Rerank (the adapter's per-token likelihood ratio to the base) needs an adapter and a sampling temperature;
        a greedy request keeps its greedy completion first and draws the rest at `opts.resample_temperature`.
        """
        return self.sample_batch([prompt], target_tag, opts)[0]

    def sample_batch(self, prompts: Sequence[str], target_tag: str, opts: SimulateOptions) -> list[Outcome]:
        """`sample` for many prompts at once, through the worker's candidate step (inference.batching.
        CandidateBackend) on its decode loop: each round is one `generate` of the loop, rerank one `score`."""
        from inference.batching import CandidateBackend

        check_tag(target_tag)
        if not prompts:
            return []
        rerank = opts.rerank_k if opts.temperature > 0 and hasattr(self.model, "disable_adapter") else 0
        with self._decoding(opts.repetition_penalty, opts.no_repeat_ngram_size) as backend:
            step = CandidateBackend(backend, rerank_k=rerank, max_resample_rounds=opts.max_resample_rounds,
                                    resample_temperature=opts.resample_temperature)
            step.generate(self._items(prompts, target_tag, n=opts.n, temperature=opts.temperature, top_p=opts.top_p,
                                      max_new_tokens=opts.max_new_tokens, seed=opts.seed))
            return step.last

    def _items(self, prompts: Sequence[str], target_tag: str, *, n: int, temperature: float, top_p: float,
               max_new_tokens: int, seed: int | None) -> list:
        """One BatchItem per prompt: `n` rows on this engine's adapter (or the bare base), seeded per prompt."""
        from inference.batching import BASE_ADAPTER, BatchItem
        from inference.protocol import GenerateRequest

        adapter = BASE_ADAPTER if self._bare or not hasattr(self.model, "disable_adapter") else ENGINE_ADAPTER
        # In-process and trusted: the wire limits (n <= 8, 256 new tokens) are for queue requests.
        request = GenerateRequest.model_construct(persona="engine", n=n, temperature=temperature, top_p=top_p,
                                                  max_new_tokens=max_new_tokens)
        return [BatchItem(request, prompt, target_tag, adapter, samples=n, seed=prompt_seed(seed, prompt))
                for prompt in prompts]

    @contextlib.contextmanager
    def _decoding(self, repetition_penalty: float, no_repeat_ngram_size: int) -> Iterator:
        """A DecodeBackend on this engine's model for one call: the LoRA bank filled from the PEFT adapter's weights
        as they are now (a model under training is never read stale), PEFT's own LoRA off meanwhile (the bank adds
        it, as in the worker), eval mode; afterwards the bank's hooks come off and train mode comes back."""
        from inference.decode import DecodeBackend
        from inference.lora_batch import LoraBank, peft_lora
        from inference.prefix_cache import PrefixCache

        peft = hasattr(self.model, "get_base_model")
        base = self.model.get_base_model() if peft else self.model
        was_training = self.model.training
        self.model.eval()
        bank = LoraBank(base, torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
        backend = None
        try:
            with contextlib.ExitStack() as stack:
                if peft and not self._bare:
                    weights, scalings = peft_lora(self.model)
                    bank.put(ENGINE_ADAPTER, weights, 1.0, scalings=scalings)
                    stack.enter_context(self.model.disable_adapter())
                backend = DecodeBackend(base, self.tokenizer, bank, self.device,
                                        prefix_cache=PrefixCache(ENGINE_PREFIX_CACHE_BYTES),
                                        repetition_penalty=repetition_penalty,
                                        no_repeat_ngram_size=no_repeat_ngram_size)
                yield backend
        finally:
            if backend is not None:
                backend.close()
            bank.close()
            if was_training:
                self.model.train()

    def completion_nll(
        self, pairs: Sequence[tuple[str, str]], batch_size: int = 8, max_length: int | None = None
    ) -> list[tuple[float, int]]:
        """For each (prompt, completion): (sum of NLL in nats over completion tokens, number of completion tokens).

        Tokenized exactly as training does (`tokenize_pair`); prompt tokens never carry loss. With `max_length`,
        the oldest tokens are dropped first (training's keep_end truncation).
        """
        encoded = [tokenize_pair(self.tokenizer, p, c) for p, c in pairs]
        if max_length is not None:
            encoded = [(ids[-max_length:], mask[-max_length:]) for ids, mask in encoded]
        was_training = self.model.training
        self.model.eval()
        try:
            results: list[tuple[float, int]] = []
            for i in range(0, len(encoded), batch_size):
                chunk = completion_logprobs(self.model, self.tokenizer.pad_token_id, encoded[i : i + batch_size],
                                            self.device)
                results += [(-lp, count) for lp, count in chunk]
        finally:
            if was_training:
                self.model.train()
        return results

    def score(self, pairs: Sequence[tuple[str, str]], batch_size: int = 8) -> list[tuple[float, float, int]]:
        """Per (prompt, completion): log-prob of the completion under the adapter, under the bare base, tokens."""
        with_adapter = self.completion_nll(pairs, batch_size=batch_size)
        with self.adapter_disabled():
            bare = self.completion_nll(pairs, batch_size=batch_size)
        return [(-a, -b, n) for (a, n), (b, _) in zip(with_adapter, bare, strict=True)]


def completion_logprobs(model, pad_id: int, encoded: Sequence[tuple[list[int], list[int]]], device,
                        ) -> list[tuple[float, int]]:
    """One forward pass over (input_ids, completion_mask) rows: (summed log-prob of the masked tokens, their count).

    Rows are right-padded; the LM head scores only the masked positions, in chunks, so memory does not grow with
    batch x length x vocabulary (Gemma 3's 262k vocabulary: 2 GB of logits for 8 x 256 tokens otherwise).
    """
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(encoded), width), dtype=torch.long)
    loss_mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, (seq, mask) in enumerate(encoded):
        ids[row, : len(seq)] = torch.tensor(seq)
        attn[row, : len(seq)] = 1
        loss_mask[row, : len(seq)] = torch.tensor(mask, dtype=torch.bool)
    ids, attn, loss_mask = ids.to(device), attn.to(device), loss_mask.to(device)
    with torch.no_grad():
        # The LM head only on completion positions, in chunks (inference.completion_nll): no (B, T, V) logits.
        nll, rows, _ = token_nll(model, ids, attn, loss_mask)
    sums = torch.zeros(len(encoded), dtype=torch.float32, device=nll.device).index_add_(0, rows, -nll)
    counts = loss_mask[:, 1:].sum(dim=1)
    return [(float(a), int(b)) for a, b in zip(sums.tolist(), counts.tolist(), strict=True)]


def qlora_config(compute_dtype: torch.dtype = torch.bfloat16, flag: str = "--qlora"):
    """BitsAndBytes 4-bit NF4 with double quantization; TrainError naming `flag` without bitsandbytes.

    bitsandbytes >= 0.49 runs 4-bit NF4 on the CPU too, so QLoRA and the quantized worker work on either device.
    Training and simulate compute in bf16; the worker computes in fp32 on the CPU (`compute_dtype`).
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise TrainError(f"{flag} needs bitsandbytes: pip install -e '.[ml]'") from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


QLORA_CPU_BLOCK = 64  # values per 4-bit block in bitsandbytes' CPU kernels


def check_qlora_shapes(config, device: str) -> None:
    """TrainError when a 4-bit model cannot run on the CPU: bitsandbytes needs layer widths divisible by 64 there."""
    if device.startswith("cuda"):
        return
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config  # multimodal
    widths = {k: getattr(config, k, None) for k in ("hidden_size", "intermediate_size")}
    bad = {k: v for k, v in widths.items() if isinstance(v, int) and v % QLORA_CPU_BLOCK}
    if bad:
        raise TrainError(
            f"--qlora on the CPU needs layer widths that are multiples of {QLORA_CPU_BLOCK} (bitsandbytes' 4-bit "
            f"blocks); this base has {', '.join(f'{k}={v}' for k, v in bad.items())}: drop --qlora for this model"
        )


def qlora_device_map(device: str) -> dict:
    """Where a 4-bit model goes: the whole model on one device (GPU 0 with CUDA, else the CPU)."""
    return {"": 0 if device.startswith("cuda") else "cpu"}


AUTO_BF16_MEMORY_SHARE = 0.4  # --quantize auto on CUDA: bf16 while its weights take at most this share of the GPU


def choose_quantize(base: str | Path, quantize: str, device: str, revision: str | None = None) -> bool:
    """True when `base` is to be loaded in 4-bit: `4bit`; or `auto` on CUDA when bf16 weights would not fit.

    The `auto` rule: bf16 on CUDA while the bf16 weights take at most AUTO_BF16_MEMORY_SHARE of the GPU's memory
    (4-bit dequantisation is launch-bound on small matrices, so small bases decode faster in bf16), 4-bit beyond;
    never 4-bit on the CPU. Not measured on a GPU yet (docs/serving.md).
    """
    if quantize != "auto":
        return quantize == "4bit"
    if not device.startswith("cuda"):
        return False
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base), revision=revision)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return 2 * params > AUTO_BF16_MEMORY_SHARE * total


def load_base(base: str | Path, quantize: str = "none", device: str | None = None, *, revision: str | None = None):
    """(model, tokenizer, device): the one loader of a base model, for simulate, eval and the worker.

    `quantize`: `none` (bf16 on CUDA, float32 on the CPU), `4bit` (NF4 through bitsandbytes; computes in bf16 on
    CUDA, float32 on the CPU) or `auto` (choose_quantize). The model is in eval mode; the tokenizer has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    try:
        four_bit = choose_quantize(base, quantize, device, revision)
        kwargs: dict = {}
        if four_bit:
            from transformers import AutoConfig

            check_qlora_shapes(AutoConfig.from_pretrained(str(base), revision=revision), device)
            kwargs["quantization_config"] = qlora_config(torch.bfloat16 if cuda else torch.float32, "--quantize 4bit")
            kwargs["device_map"] = qlora_device_map(device)
        else:
            kwargs["dtype"] = torch.bfloat16 if cuda else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(str(base), revision=revision)
        model = AutoModelForCausalLM.from_pretrained(str(base), revision=revision, **kwargs)
    except OSError as e:
        raise ConfigError(
            f"cannot load base model {base}: {str(e).splitlines()[0]} (a local dir, or a hub id when online)"
        ) from e
    if not four_bit:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, device


# ---------------------------------------------------------------- simulate (the `convo simulate` library side)


@dataclass(frozen=True, slots=True)
class SimulateOptions:
    """Sampling and candidate settings for simulate and eval (`from_settings`: config.settings.GenerateSettings)."""

    n: int = 3
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 64
    seed: int | None = None
    rerank_k: int = 0
    max_resample_rounds: int = 2
    resample_temperature: float = 0.8
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @classmethod
    def from_settings(cls, g, **overrides) -> SimulateOptions:
        """Options from a GenerateSettings `g`, with the given non-None overrides on top."""
        names = [f for f in cls.__dataclass_fields__ if f != "seed"]
        values = {name: getattr(g, name) for name in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def parse_conversation(text: str, default_tag: str) -> list[Turn]:
    """User input to turns: '[TAG] text' lines keep their speaker; other lines are `default_tag`'s messages."""
    turns = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        tag = line_speaker(line)
        if tag is not None:
            try:
                turns.append(parse_line(line))
            except ConvoError:  # "[RIYA]hi": a tag without the space
                turns.append(Turn(tag, line[len(tag) + 2 :].strip()))
        else:
            turns.append(Turn(default_tag, line.strip()))
    return turns


def resolve_target(meta: AdapterMeta | None, as_tag: str | None) -> tuple[str, str]:
    """(tag to write as, tag of the other side) from the adapter's tags and --as; ConfigError on an unknown tag."""
    if meta is None:
        target = check_tag(as_tag) if as_tag else "FRIEND"
        return target, "ME" if target != "ME" else "FRIEND"
    known = dict.fromkeys([meta.persona.tag, *([meta.me.tag] if meta.me else []), *meta.tags.values()])
    target = as_tag or meta.persona.tag
    if target not in known:
        raise ConfigError(f"--as {target}: not a speaker of this adapter; known tags: {', '.join(known)}")
    others = [t for t in known if t != target]
    if meta.me is not None and meta.me.tag != target:
        return target, meta.me.tag
    return target, others[0] if others else "ME"


def simulate(engine: Engine, turns: Sequence[Turn], target: str, opts: SimulateOptions) -> list[list[str]]:
    """Candidates for `target`'s next burst after `turns` (each a list of messages), after inference.candidates."""
    return engine.sample(render_prompt(turns, target), target, opts).candidates
