"""`convo chat`: a terminal chat through the same bot core, WorkerClient and feedback path as the platform bots.

friend mode: you write as yourself, the persona answers (one burst, with typing pauses).
self mode:   you paste the friend's messages, the bot drafts your next message (`bot.drafts` candidates).

Commands: /good and /bad (👍 / 👎 on the last reply or draft N: `/good 2`), /regen (🔄), /send N (self mode: send
draft N as drafted), /me TEXT (self mode: what you sent instead, an `edited` event), /forget, /help, /quit.
History lives in Redis under the chat `console:<persona>:<mode>`, so a new session continues the conversation.
However the chat ends (/quit, Ctrl-D, Ctrl-C at the prompt), the persona's last reply stays in the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Awaitable, Callable

from rich.console import Console
from rich.markup import escape

from bot.core import BotCore, DraftExpired, DraftRecord, Persona
from errors import ConvoError
from inference.client import WorkerError, WorkerTimeout

PLATFORM = "console"
HELP = (
    "/good [N]  👍 the last reply (or draft N)     /bad [N]  👎\n"
    "/regen     🔄 draft again from the same context\n"
    "/send N    (self mode) send draft N as drafted  /me TEXT  (self mode) what you sent instead\n"
    "/forget    delete this chat's history and drafts  /quit  leave"
)


def chat_id(persona: Persona, mode: str) -> str:
    """The history key of a console chat."""
    return f"{persona.name}:{mode}"


class ConsoleChat:
    """One terminal conversation with a persona; `handle(line)` processes one input line."""

    def __init__(self, core: BotCore, persona: Persona, mode: str, console: Console | None = None):
        self.core = core
        self.persona = persona
        self.mode = mode
        self.chat = chat_id(persona, mode)
        self.console = console or Console(highlight=False)
        self.pending: DraftRecord | None = None  # the last reply/drafts, committed to history when accepted

    async def handle(self, line: str) -> bool:
        """Process one input line; False when the chat should end."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            return await self._command(line)
        if self.mode == "friend":
            await self._commit_reply()
            await self.core.add_message(self.chat, self.persona.me_tag, line)
        else:
            if self.pending is not None:  # new messages from the friend: the old drafts were not used
                await self._close_pending()
            await self.core.add_message(self.chat, self.persona.tag, line)
        await self._generate()
        return True

    async def _command(self, line: str) -> bool:
        name, _, arg = line.partition(" ")
        name = name.lower()
        if name in ("/quit", "/exit"):
            await self.close()
            return False
        if name == "/help":
            self.console.print(HELP)
        elif name in ("/good", "/bad"):
            await self._react("liked" if name == "/good" else "disliked", arg)
        elif name == "/regen":
            await self._regenerate()
        elif name == "/send":
            await self._send(arg)
        elif name == "/me":
            await self._own_text(arg)
        elif name == "/forget":
            self.pending = None
            deleted = await self.core.forget(self.chat)
            self.console.print(f"[dim]forgot this chat ({deleted} stored item(s) deleted)[/]")
        else:
            self.console.print(f"[yellow]unknown command {escape(name)}; /help lists them[/]")
        return True

    def _index(self, arg: str) -> int | None:
        """Draft number (1-based in the UI) to index; None with a message when it is not a valid number."""
        if self.pending is None:
            self.console.print("[yellow]nothing to react to yet[/]")
            return None
        if not arg.strip():
            return 0
        try:
            index = int(arg) - 1
        except ValueError:
            index = -1
        if not 0 <= index < len(self.pending.candidates):
            self.console.print(f"[yellow]pick a draft from 1 to {len(self.pending.candidates)}[/]")
            return None
        return index

    async def _react(self, kind: str, arg: str) -> None:
        index = self._index(arg)
        if index is not None:
            await self.core.feedback(self.pending, kind, index)
            self.console.print("[dim]noted 👍[/]" if kind == "liked" else "[dim]noted 👎[/]")

    async def _regenerate(self) -> None:
        if self.pending is None:
            self.console.print("[yellow]nothing to regenerate yet[/]")
            return
        try:
            new = await self.core.regenerate(self.pending, self.persona)
        except (WorkerTimeout, WorkerError, DraftExpired) as e:
            self._problem(e)
            return
        if new is None:
            self.pending = None
            self.console.print("[yellow]that draft is not open any more[/]")
            return
        self.pending = new
        await self._show(new)

    async def _send(self, arg: str) -> None:
        if self.mode != "self":
            self.console.print("[yellow]/send is for drafts (--mode self); in friend mode just keep chatting[/]")
            return
        index = self._index(arg)
        if index is None:
            return
        pending, self.pending = self.pending, None
        try:
            draft = await self.core.transition(pending.id, {"open"}, status="sent")
        except DraftExpired as e:
            self._problem(e)
            return
        if draft is None:
            self.console.print("[yellow]that draft is not open any more[/]")
            return
        await self.core.add_messages(self.chat, self.persona.me_tag, draft.candidates[index])
        await self.core.feedback(draft, "sent", index)
        self.console.print("[dim]sent ✅ (recorded as drafted)[/]")

    async def _own_text(self, text: str) -> None:
        if self.mode != "self" or not text.strip():
            self.console.print("[yellow]/me TEXT records what you sent yourself (--mode self)[/]")
            return
        await self.core.add_message(self.chat, self.persona.me_tag, text)
        event = await self.core.owner_wrote(self.chat, text)
        self.pending = None
        if event is not None:
            self.console.print(f"[dim]recorded ({event.kind})[/]")

    async def close(self) -> None:
        """The chat ends: the persona's last reply stands, as if you had answered it."""
        await self._commit_reply()

    async def _commit_reply(self) -> None:
        """Friend mode: the persona's last reply stands once you answer it."""
        if self.mode == "friend" and self.pending is not None:
            await self.core.add_messages(self.chat, self.persona.tag, self.pending.candidates[0])
            await self._close_pending()

    async def _close_pending(self) -> None:
        """The pending draft is done with: close it unless it expired or closed meanwhile (never stored again)."""
        with contextlib.suppress(DraftExpired):
            await self.core.transition(self.pending.id, {"open"}, status="closed")
        self.pending = None

    async def _generate(self) -> None:
        n = 1 if self.mode == "friend" else self.core.config.drafts
        try:
            with self.console.status(f"{escape(self.persona.name)} is typing…" if self.mode == "friend"
                                     else "drafting…"):
                self.pending = await self.core.generate(self.chat, self.persona, self.mode, n=n)
        except (WorkerTimeout, WorkerError) as e:
            self._problem(e)
            return
        await self._show(self.pending)

    async def _show(self, draft: DraftRecord) -> None:
        if self.mode == "friend":
            async def send(text: str) -> None:
                self.console.print(f"[bold cyan]{escape(self.persona.name)} (AI)[/]: {escape(text)}")

            await self.core.deliver(draft.candidates[0], send=send)
            return
        for i, candidate in enumerate(draft.candidates, 1):
            body = "\n    ".join(escape(m) for m in candidate)
            self.console.print(f"[bold green]draft {i}[/]: {body}")
        self.console.print("[dim]/send N, /me TEXT, /good N, /bad N, /regen[/]")

    def _problem(self, e: ConvoError) -> None:
        if isinstance(e, WorkerTimeout):
            self.console.print(f"[red]no reply from the model worker within {self.core.config.reply_timeout_s:g} s: "
                               "is `convo serve worker` running on the same Redis and prefix?[/]")
        else:
            self.console.print(f"[red]{escape(str(e))}[/]")


async def run_chat(core: BotCore, persona: Persona, mode: str, read_line: Callable[[], Awaitable[str | None]],
                   console: Console | None = None) -> None:
    """Read lines until /quit or end of input, handling each through ConsoleChat."""
    chat = ConsoleChat(core, persona, mode, console)
    history = await core.context(chat.chat)
    chat.console.print(f"[dim]chatting with {escape(persona.name)} ({mode} mode, {len(history)} message(s) of "
                       "context from earlier); /help for commands[/]")
    try:
        while True:
            line = await read_line()
            if line is None or not await chat.handle(line):
                break
    finally:  # end of input, /quit, or Ctrl-C (the task is cancelled while it waits for a line)
        await chat.close()


def stdin_reader(prompt: str = "> ", fd: int | None = None) -> Callable[[], Awaitable[str | None]]:
    """Read a line from the terminal off the event loop; None at end of input (Ctrl-D).

    Lines come from a daemon thread that reads the file descriptor with os.read. Not `input()` in the loop's
    executor: on Ctrl-C asyncio.run cancels the chat and then joins its executor's threads, which would wait for
    Enter; and a daemon thread inside `input()` holds stdin's buffer lock, which aborts the interpreter at exit.
    """
    fd = sys.stdin.fileno() if fd is None else fd
    encoding = sys.stdin.encoding or "utf-8"
    lines: asyncio.Queue[str | None] | None = None

    def pump(loop: asyncio.AbstractEventLoop) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            if chunk:
                pending += chunk
            while b"\n" in pending or (not chunk and pending):
                line, _, pending = pending.partition(b"\n")
                if not _hand_over(loop, line.decode(encoding, errors="replace").rstrip("\r")):
                    return
            if not chunk:
                _hand_over(loop, None)
                return

    def _hand_over(loop: asyncio.AbstractEventLoop, line: str | None) -> bool:
        try:
            loop.call_soon_threadsafe(lines.put_nowait, line)
            return True
        except RuntimeError:  # the loop is closed: the chat has ended
            return False

    async def read() -> str | None:
        nonlocal lines
        if lines is None:
            lines = asyncio.Queue()
            threading.Thread(target=pump, args=(asyncio.get_running_loop(),), name="convo-chat-stdin",
                             daemon=True).start()
        sys.stdout.write(prompt)
        sys.stdout.flush()
        line = await lines.get()
        if line is None:
            lines.put_nowait(None)  # end of input stays the end
            sys.stdout.write("\n")  # Ctrl-D: the shell's prompt starts on a line of its own
        return line

    return read
