"""The generation engine: a base model with (optionally) one persona adapter, used by simulate and eval; `load_base`
is the one loader of a base model, for them and the worker (inference.decode).

Heavy module (imports torch). Prompts come from inference.prompt_format; completions are cut from generated token
ids at the prompt's token length (inference.completion.cut_completion), and sampling stops as soon as the model
starts a line tagged by anyone but the target (prompt_format.completion_finished).

Tokenization is shared with training (`tokenize_pair`): the prompt is encoded alone and together with its
completion, and the completion starts where the two id lists diverge, as TRL does for prompt/completion data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from errors import ConfigError, ConvoError, TrainError
from inference.adapter_meta import AdapterMeta, check_compatible, read_adapter_meta
from inference.candidates import Outcome
from inference.completion import cut_completion
from inference.prompt_format import (
    Turn,
    check_tag,
    completion_finished,
    line_speaker,
    parse_line,
    render_prompt,
    split_completion,
    trim_burst,
)
from inference.repetition import BurstRepetition

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


class _StopAtOtherSpeaker(StoppingCriteria):
    """Per-row stop once the text generated after the prompt starts a line not tagged by the target."""

    def __init__(self, tokenizer, prompt_len: int, target: str):
        self.tokenizer, self.prompt_len, self.target = tokenizer, prompt_len, target

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = [
            completion_finished(cut_completion(self.tokenizer, row, self.prompt_len), self.target)
            for row in input_ids
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """A loaded base model (+ adapter) and its tokenizer; `meta` is the adapter's AdapterMeta (None for a bare base)."""

    def __init__(self, model, tokenizer, meta: AdapterMeta | None = None, device: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = device or str(next(model.parameters()).device)
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
        """Run the bare base model inside this block (no-op without an adapter)."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
        else:
            yield

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
        """`generate_raw` for many prompts in one `generate`: `n` rows per prompt, left-padded to one width.

        Left padding puts every row's completion at the same column, so the stop test and the cut need one prompt
        length. One prompt alone has no padding and samples exactly as before; in a batch, a row's samples depend
        on the seed and on the batch it shares.
        """
        check_tag(target_tag)
        encoded = [encode(self.tokenizer, p) for p in prompts]
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompts) * n, width), pad, dtype=torch.long)  # (rows, width), left-padded
        attention = torch.zeros_like(input_ids)
        for r in range(len(prompts) * n):
            ids = encoded[r // n]
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            attention[r, width - len(ids) :] = 1
        stop = StoppingCriteriaList([_StopAtOtherSpeaker(self.tokenizer, width, target_tag)])
        sampling = temperature > 0
        gen_kwargs = dict(
            attention_mask=attention.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            stopping_criteria=stop,
            pad_token_id=pad,
        )
        if sampling:
            gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        repetition = BurstRepetition(self.tokenizer, width, repetition_penalty, no_repeat_ngram_size)
        if repetition.active():
            from transformers import LogitsProcessorList

            gen_kwargs["logits_processor"] = LogitsProcessorList([repetition])
        was_training = self.model.training
        self.model.eval()
        devices = [torch.device(self.device)] if self.device.startswith("cuda") else []
        try:
            # A private RNG stream: sampling with a seed neither depends on nor disturbs the global torch state.
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                if seed is not None:
                    torch.manual_seed(seed)
                out = self.model.generate(input_ids=input_ids.to(self.device), **gen_kwargs)  # (rows, width + new)
        finally:
            if was_training:
                self.model.train()
        texts = [trim_completion(cut_completion(self.tokenizer, row, width), target_tag) for row in out]
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

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
        """`generate` for many prompts in one left-padded `generate` call: per prompt, `n` candidates."""
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
        """`sample` for many prompts at once: each round of the candidate step is one left-padded `generate` per
        distinct number of rows asked (usually one), and rerank scores every candidate in batches."""
        from inference.candidates import greedy_split, rerank_score, sample_candidates

        calls = 0
        common = dict(top_p=opts.top_p, max_new_tokens=opts.max_new_tokens,
                      repetition_penalty=opts.repetition_penalty, no_repeat_ngram_size=opts.no_repeat_ngram_size)

        def generate_fn(items: list[int], samples: list[int]) -> list[list[str]]:
            nonlocal calls
            seed = None if opts.seed is None else opts.seed + 7919 * calls
            texts: dict[int, list[str]] = {i: [] for i in items}
            groups: dict[tuple[int, int], list[int]] = {}
            for i, k in zip(items, samples, strict=True):
                groups.setdefault(greedy_split(k, calls == 0) if opts.temperature <= 0 else (0, k), []).append(i)
            for (greedy, sampled), group in groups.items():
                batch = [prompts[i] for i in group]
                if greedy:
                    for i, out in zip(group, self.generate_raw_batch(batch, target_tag, n=1, temperature=0, **common),
                                      strict=True):
                        texts[i] += out
                if sampled:
                    temperature = opts.temperature if opts.temperature > 0 else opts.resample_temperature
                    for i, out in zip(group, self.generate_raw_batch(batch, target_tag, n=sampled,
                                                                     temperature=temperature, seed=seed, **common),
                                      strict=True):
                        texts[i] += out
            calls += 1
            return [texts[i] for i in items]

        def score_fn(pairs: list[tuple[int, str]]) -> list[float]:
            return [rerank_score(*s) for s in self.score([(prompts[i], text) for i, text in pairs])]

        rerank = opts.rerank_k if opts.temperature > 0 and hasattr(self.model, "disable_adapter") else 0
        return sample_candidates(list(range(len(prompts))), [target_tag] * len(prompts), [opts.n] * len(prompts),
                                 generate_fn, score_fn, rerank_k=rerank, max_resample_rounds=opts.max_resample_rounds)

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
                        **forward_kwargs) -> list[tuple[float, int]]:
    """One forward pass over (input_ids, completion_mask) rows: (summed log-prob of the masked tokens, their count).

    Rows are right-padded; `forward_kwargs` go to the model (e.g. PEFT's per-row `adapter_names`).
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
        logits = model(input_ids=ids, attention_mask=attn, **forward_kwargs).logits.float()  # (B, T, V)
    # Token t is predicted from position t-1.
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    m = loss_mask[:, 1:]
    sums = (target_logp * m).sum(dim=1)
    counts = m.sum(dim=1)
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
