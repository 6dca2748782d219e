"""The optional `api` method: an OpenAI-compatible chat endpoint asked to write the persona's next messages.

It gets the same in-context block as the `incontext` method and the conversation, and answers as the person.
Text only (chat endpoints give no likelihood of a fixed completion). Plain urllib: no client package.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from errors import EvalError
from inference.prompt_format import PromptFormatError, line_speaker, parse_line

SYSTEM = (
    "You continue text conversations as one specific person. Lines look like '[NAME] message'. "
    "Study how [{tag}] writes in the examples (length, casing, punctuation, emoji, how many messages in a row) "
    "and write [{tag}]'s next message(s) exactly as they would. Answer with one message per line, each "
    "starting with [{tag}], and nothing else."
)


@dataclass(frozen=True, slots=True)
class ApiClient:
    """Where to send requests: `base` is the URL up to `/v1` (the client adds `/chat/completions`)."""

    base: str
    model: str
    key: str | None = None
    timeout_s: float = 60.0

    def chat(self, messages: list[dict], *, temperature: float, top_p: float, max_tokens: int, seed: int) -> str:
        """One chat completion; the first choice's text."""
        url = self.base.rstrip("/") + "/chat/completions"
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "seed": seed,
            "n": 1,
        }
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise EvalError(f"--api-base {url}: HTTP {e.code} ({e.reason}); check --api-model and the key") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise EvalError(f"--api-base {url}: cannot reach it ({e})") from e
        except json.JSONDecodeError as e:
            raise EvalError(f"--api-base {url}: answer is not JSON; is it an OpenAI-compatible endpoint?") from e
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise EvalError(f"--api-base {url}: no choices[0].message.content in the answer") from e


def build_messages(context_text: str, prompt: str, tag: str) -> list[dict]:
    """System instructions with the in-context examples, then the conversation ending at `[TAG]`."""
    system = SYSTEM.format(tag=tag)
    if context_text:
        system += "\n\nExamples of past conversations ([END] ends one):\n" + context_text.rstrip("\n")
    history = prompt.rsplit("\n", 1)[0] if "\n" in prompt else ""
    user = f"Conversation so far:\n{history}\n\nWrite [{tag}]'s next message(s)."
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_reply(text: str, tag: str) -> list[str]:
    """Messages of the answer: lines tagged `[TAG]` (or untagged), up to the first other speaker's tag."""
    out = []
    for raw in text.strip().split("\n"):
        line = raw.strip()
        if not line:
            continue
        speaker = line_speaker(line)
        if speaker is None:
            out.append(line)
        elif speaker == tag:
            try:
                msg = parse_line(line).text.strip()
            except PromptFormatError:
                msg = line[len(tag) + 2 :].strip()
            if msg:
                out.append(msg)
        else:
            break
    return out


def generate(
    client: ApiClient, context_text: str, prompt: str, tag: str, *, n: int, temperature: float, top_p: float,
    max_new_tokens: int, seed: int,
) -> list[list[str]]:
    """`n` candidate replies (message lists), one request each with seeds `seed`, `seed+1`, ..."""
    messages = build_messages(context_text, prompt, tag)
    return [
        parse_reply(
            client.chat(messages, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed + i),
            tag,
        )
        for i in range(n)
    ]
