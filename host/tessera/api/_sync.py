"""Running an asyncio API from plain synchronous code: one private event loop per object."""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _LoopOwner:
    """Owns an event loop that runs only during each call (sockets wait in between)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("this object is closed")
        return self._loop.run_until_complete(coro)

    def _close_loop(self) -> None:
        if not self._loop.is_closed():
            self._loop.close()
