"""Per-chat prefix (KV) cache: the next turn of a conversation reuses the keys/values of the history it shares.

A chat's next request repeats the previous prompt and adds a few messages, and on a CPU reading that prompt
(prefill) is most of a draft's time. After each prefill the decode loop stores the prompt's keys/values here under
its adapter's name (unique per loaded version); a later prompt for the same adapter starts from the longest stored
token prefix it shares and prefills only the rest. Bounded in bytes, least recently used entries dropped first;
`drop(adapter)` forgets an adapter's entries (hot reload or eviction), so a new version never sees the old one's.

Two kinds of model need more than a shared prefix. With a length-dependent rope (longrope, dynamic NTK) a
prompt's keys depend on its length's rope regime (inference.architectures.regime), so entries are reused only
within their regime. Sliding-window layers keep only their last window - 1 keys/values (as the decode loop's cache
does) plus a margin (inference.architectures.PREFIX_MARGIN, 64), so an entry longer than its window serves a
prompt sharing all but at most its last 64 tokens (the next turn of the same chat), not a shorter prefix.

Limits: the prefix must be shared token for token from the first token, so once a bot's history window starts to
slide (the oldest message dropped) the saving drops to the tokens before the first changed message.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from inference.engine import common_prefix_length

KV = list[tuple["object", "object"]]  # per layer (keys, values), each a tensor (1, heads, tokens, head_dim)
# (a sliding-window layer's tokens: the last window - 1 at most)


@dataclass(slots=True)
class _Entry:
    adapter: str
    ids: tuple[int, ...]
    kv: KV
    nbytes: int
    regime: str = ""  # rope regime the keys were computed in
    min_reuse: int = 0  # sliding-window layers dropped their oldest keys: no shorter prefix can be served


class PrefixCache:
    """Keys/values of recent prompts, by adapter; `lookup` gives the longest shared prefix (LRU, byte-bounded)."""

    def __init__(self, max_bytes: int, min_tokens: int = 8):
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens  # a shorter shared prefix is not worth a lookup hit
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_saved = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest use first
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, adapter: str, ids: list[int], regime: str = "") -> tuple[int, KV | None]:
        """(tokens reusable, their keys/values cut to that length) for prompt `ids` prefilled in rope `regime`;
        (0, None) on a miss.

        At most len(ids) - 1 tokens are reused: the last prompt token is always run, for its logits.
        """
        with self._lock:
            best, best_key = 0, None
            for key, entry in self._entries.items():
                if entry.adapter == adapter and entry.regime == regime:
                    n = min(common_prefix_length(entry.ids, ids), len(ids) - 1)
                    if n < entry.min_reuse:
                        continue
                    if n > best:
                        best, best_key = n, key
            if best < self.min_tokens or best_key is None:
                self.misses += 1
                return 0, None
            self._entries.move_to_end(best_key)
            self.hits += 1
            self.tokens_saved += best
            entry = self._entries[best_key]
            drop = len(entry.ids) - best  # the newest tokens not shared; a sliding layer holds the newest only
            kv = [(k[:, :, : k.shape[2] - drop], v[:, :, : v.shape[2] - drop]) for k, v in entry.kv]
            return best, kv

    def put(self, adapter: str, ids: list[int], kv: KV, regime: str = "", min_reuse: int = 0) -> None:
        """Store the keys/values of prompt `ids` (replacing an entry that is a prefix of it); evict to the bound."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.max_bytes or len(ids) < self.min_tokens:
            return
        key_ids = tuple(ids)
        with self._lock:
            for key, entry in list(self._entries.items()):  # an older turn of the same chat is now redundant
                if entry.adapter == adapter and entry.regime == regime and key_ids[: len(entry.ids)] == entry.ids:
                    self._remove(key)
            self._next += 1
            self._entries[self._next] = _Entry(adapter, key_ids, kv, nbytes, regime, min_reuse)
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes:
                self._remove(next(iter(self._entries)))

    def drop(self, adapter: str) -> None:
        """Forget every entry of `adapter` (its version was replaced or unloaded)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.adapter == adapter]:
                self._remove(key)

    def _remove(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
