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


class _ThreadLoop:
    """An event loop running in a daemon thread, for synchronous wrappers of services that
    must keep running between calls (a served SM, an agent's Ks link)."""

    def __init__(self, name: str) -> None:
        import threading

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._loop.is_closed() or not self._loop.is_running():
            coro.close()
            raise RuntimeError("this object is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()
