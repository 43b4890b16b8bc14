"""asyncio plumbing shared by the four role adapters."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tessera.simulcrypt.engine import Endpoint, Event

log = logging.getLogger("tessera.simulcrypt")

READ_SIZE = 65536


def flush(engine: Endpoint, writer: asyncio.StreamWriter) -> None:
    out = engine.data_to_send()
    if out and not writer.is_closing():
        writer.write(out)


async def flush_and_drain(engine: Endpoint, writer: asyncio.StreamWriter) -> None:
    """Send what the engine has queued (e.g. a closing channel_close) on a link that may
    already be gone; a dead link is not an error here."""
    flush(engine, writer)
    try:
        await writer.drain()
    except (ConnectionError, OSError):
        pass


async def read_loop(engine: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    on_events: Callable[[list[Event]], bool | None]) -> None:
    """Feeds the engine until EOF, or until on_events returns True (close requested)."""
    while True:
        data = await reader.read(READ_SIZE)
        if not data:
            return
        events = engine.receive_data(data)
        stop = on_events(events)
        flush(engine, writer)
        await writer.drain()
        if stop:
            return


async def close_writer(writer: asyncio.StreamWriter) -> None:
    if writer.is_closing():
        return
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 2.0)
    except (OSError, asyncio.TimeoutError, ConnectionError):
        pass
