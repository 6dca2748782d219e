"""OpenAI's request shapes and how they map onto a convo conversation: the wire half of `convo serve api`.

Bodies are validated here (pydantic), with every problem a 400 naming the field the way OpenAI does
(`messages[2].content`); fields of OpenAI's API that a persona cannot honour are refused unless left neutral. The
mapping rules (user = owner, assistant = persona, `name` = another speaker, system ignored, one message per line,
bursts joined with BURST_SEPARATOR, stop strings cut the text) are documented in docs/api.md; the server
(bot/openai_api.py) only calls these functions. Import-light: pydantic and the prompt format, no torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bot.core import Persona, clip_text, window_start
from errors import ProtocolError
from inference.prompt_format import END_TAG, PromptFormatError, line_speaker, parse, render_completion
from inference.protocol import MAX_N, MAX_NEW_TOKENS, HistoryMessage, Mode

BURST_SEPARATOR = "\n"  # between the messages of one reply in `content` (and between streamed partial lines)
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
_IGNORED_ROLES = ("system", "developer")
# Fields of OpenAI's API that cannot be honoured: refused (400 naming them) unless left at their neutral value.
_REFUSED = {
    "tools": "personas reply with chat text only", "tool_choice": "personas reply with chat text only",
    "functions": "personas reply with chat text only", "function_call": "personas reply with chat text only",
    "response_format": "only plain text replies", "logprobs": "the worker returns no log probabilities",
    "top_logprobs": "the worker returns no log probabilities", "logit_bias": "not supported by the worker",
    "seed": "the worker does not take a seed", "presence_penalty": "not supported by the worker",
    "frequency_penalty": "not supported by the worker", "audio": "text only", "modalities": "text only",
    "prediction": "not supported by the worker", "echo": "not supported", "suffix": "not supported",
    "best_of": "use n", "web_search_options": "not supported", "reasoning_effort": "not a reasoning model",
}
_UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict"}  # pydantic names the union member in a loc
_NEUTRAL = (None, False, 0, 0.0, "", [], {}, "none", "auto", {"type": "text"}, ["text"])


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        """The JSON body OpenAI's clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_field(param: str, message: str) -> ApiError:
    """400 naming the field."""
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


# ---------------------------------------------------------------- request bodies


class SamplingBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored; the known unsupported ones refused

    model: str = Field(min_length=1, max_length=200)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None


class ConvoOptions(BaseModel):
    """The `convo` extension object of a request body."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = "friend"  # friend: the persona answers; self: a draft of the owner's next message


class ChatMessage(BaseModel):
    """One message of `messages` (text content only)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(None, min_length=1, max_length=64)


class ChatBody(SamplingBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    convo: ConvoOptions = Field(default_factory=ConvoOptions)


class CompletionBody(SamplingBody):
    """POST /v1/completions."""

    prompt: str | list[str]


class FeedbackBody(BaseModel):
    """POST /v1/convo/feedback."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=140)  # the completion's id (chatcmpl-... or cmpl-...)
    kind: Literal["liked", "disliked", "sent", "edited"]
    choice: int = Field(0, ge=0, le=MAX_N - 1)
    text: str | None = Field(None, max_length=4000)  # what the owner actually sent (edited)


def parse_body(model: type[BaseModel], raw: bytes):
    """Validate a JSON body; 400 naming the first bad field (`messages[0].role`) otherwise."""
    try:
        data = json.loads(raw or b"null")
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from e
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [p for p in err["loc"] if isinstance(p, int) or p not in _UNION_MEMBERS and "[" not in p]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"
        if err["type"] == "missing":
            raise ApiError(400, f"{param}: required", param=param, code="missing_required_parameter") from e
        raise bad_field(param, err["msg"]) from e
    for name, why in _REFUSED.items():
        value = (body.model_extra or {}).get(name)
        if value not in _NEUTRAL:
            raise ApiError(400, f"{name}: not supported ({why})", param=name, code="unsupported_parameter")
    return body


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """The request's stop strings, checked (at most 4, none empty)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise bad_field("stop", f"at most {MAX_STOP} strings")
    if any(not s for s in stops):
        raise bad_field("stop", "an empty string never stops anything")
    return stops


# ---------------------------------------------------------------- messages -> history


def content_text(message: ChatMessage, index: int) -> str:
    """A message's text: a string, or the text parts of a list (other parts are refused)."""
    param = f"messages[{index}].content"
    if message.content is None:
        raise bad_field(param, "a message needs text content")
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_field(param, f"only text parts are supported, not {str(part.get('type'))[:30]!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_history(messages: Sequence[ChatMessage], persona: Persona, limit: int, cut: int = 1
                 ) -> list[HistoryMessage]:
    """OpenAI messages -> speaker-tagged history: user = owner, assistant = persona, `name` = another speaker.

    System and developer messages are skipped; each non-empty line of a content is one message (a burst); at most
    `limit` messages are kept, the window's start moving in blocks of `cut` messages as the bots' does
    (bot.core.window_start), so the next turn of a long chat starts its prompt the same way (a prefix cache hit).
    """
    history: list[HistoryMessage] = []
    for i, message in enumerate(messages):
        if message.role in _IGNORED_ROLES:
            continue
        if message.role not in ("user", "assistant"):
            raise bad_field(f"messages[{i}].role", f"{message.role!r} messages are not supported (no tools)")
        if message.name:
            speaker = persona.tag_for(message.name)
        else:
            speaker = persona.me_tag if message.role == "user" else persona.tag
        for line in content_text(message, i).splitlines():
            if line.strip():
                history.append(message_of(speaker, line.strip(), f"messages[{i}].name"))
    return history[window_start(len(history), limit, cut):] if limit else []


def message_of(speaker: str, text: str, param: str) -> HistoryMessage:
    """One history message (text cut to the wire's limit); a speaker tag the wire refuses is a 400 on `param`."""
    try:
        return HistoryMessage.build(speaker=speaker, text=clip_text(text))
    except ProtocolError as e:
        raise bad_field(param, f"speaker {speaker[:20]!r}...: {e}") from e


def prompt_history(prompt: str | list[str], persona: Persona, limit: int, cut: int = 1
                   ) -> tuple[list[HistoryMessage], Mode]:
    """A raw prompt ("[RIYA] hi\\n[ALICE]") -> (history, mode): it must end with the persona's or the owner's tag;
    its window of at most `limit` messages moves in blocks of `cut`, as `chat_history`'s."""
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_field("prompt", "send one prompt per request (a list of one string at most)")
        prompt = prompt[0]
    lines = prompt.rstrip(" ").split("\n")
    last = lines[-1].strip()
    target = line_speaker(last)
    if target is None or last != f"[{target}]":
        raise bad_field("prompt", "must end with the next speaker's tag on its own line, e.g. \"...\\n[ALICE]\"")
    if target == persona.tag:
        mode: Mode = "friend"
    elif target == persona.me_tag:
        mode = "self"
    else:
        raise bad_field("prompt", f"ends with [{target}]: {persona.name}'s adapter writes as [{persona.tag}] "
                                  f"(the persona) or [{persona.me_tag}] (you)")
    try:
        turns = parse("\n".join(lines[:-1]))
    except PromptFormatError as e:
        raise bad_field("prompt", str(e)) from e
    history = [message_of(t.speaker, t.text, "prompt") for t in turns if t.speaker != END_TAG]
    return (history[window_start(len(history), limit, cut):] if limit else []), mode


def raw_completion(messages: Sequence[str], target: str) -> str:
    """A burst as it continues a prompt ending in `[TARGET]`: " first\\n[TARGET] second" (the plain format)."""
    if not messages:
        return ""
    return render_completion(target, messages, None).removesuffix(f"\n[{END_TAG}]")


def apply_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the first stop string; True when one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i != -1]
    return (text[: min(cuts)], True) if cuts else (text, False)


def held_back(text: str, stops: Sequence[str]) -> str:
    """What of streamed `text` may be sent now: all but a tail that could still become a stop string."""
    keep = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep]


def cut_messages(messages: Sequence[str], stops: Sequence[str]) -> list[str]:
    """A burst cut at the first stop string of its joined text (messages after the cut are dropped)."""
    if not stops:
        return list(messages)
    out, seen = [], 0
    text, stopped = apply_stop(BURST_SEPARATOR.join(messages), stops)
    if not stopped:
        return list(messages)
    for message in messages:
        room = len(text) - seen
        if room <= 0:
            break
        out.append(message[:room])
        seen += len(message) + len(BURST_SEPARATOR)
    return [m for m in out if m]
