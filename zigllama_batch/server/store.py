"""Stored responses: what ``store: true`` keeps for ``previous_response_id`` and
``GET /v1/responses/{id}``.

Inside: :class:`ResponseStore`, a bounded in-memory map, least recently used first out. Each
entry holds the response as it was answered and the conversation that led to it (input items of
every turn, then the output items), without instructions: OpenAI does not carry a turn's
``instructions`` over to the next. A follow-up turn's prompt starts with that conversation, so
the processor's prefix cache finds the earlier turn's tokens already computed.

Simplified: entries live in this process only (lost on restart, not shared between Ray
replicas that each serve the app), and the bound counts responses, not bytes (each is at most a
request body plus its answer).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_RESPONSE_STORE_SIZE", "ResponseStore", "StoredResponse"]

DEFAULT_RESPONSE_STORE_SIZE = 1024
"""Responses kept (a conversation of a few dozen turns each for a few dozen clients)."""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """One stored response and the conversation up to and including it."""

    response: dict[str, Any]
    items: tuple[dict[str, Any], ...]


class ResponseStore:
    """At most ``max_responses`` responses, the least recently used dropped first."""

    def __init__(self, max_responses: int = DEFAULT_RESPONSE_STORE_SIZE) -> None:
        if max_responses < 0:
            raise ValueError(f"max_responses must be >= 0, got {max_responses}")
        self.max_responses = max_responses
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ResponseStore({len(self)}/{self.max_responses})"

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response (now the most recently used), or None."""
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def put(self, response_id: str, entry: StoredResponse) -> None:
        """Keep ``entry``, dropping the least recently used beyond the bound."""
        if self.max_responses == 0:
            return
        self._entries[response_id] = entry
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.max_responses:
            self._entries.popitem(last=False)

    def delete(self, response_id: str) -> bool:
        """Forget a response; whether it was stored."""
        return self._entries.pop(response_id, None) is not None
