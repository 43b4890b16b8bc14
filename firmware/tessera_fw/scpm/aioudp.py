# asyncio side of the UDP adapter (udp.py): UDPDevice.run() for an application that serves
# the device next to its own asyncio tasks. MicroPython's asyncio has no datagram
# endpoints: the socket is non-blocking and the coroutine sleeps in asyncio's I/O queue
# until a datagram arrives (the wait its streams use), waking at least every _TICK_MS for
# the timers; where that queue is not there (CPython) it polls every _IDLE_MS. A module of
# its own so that main() (udp.serve(), select.poll) never loads it (issue 9 #9).
from micropython import const

from tessera_fw.scpm.udp import ticks_ms

try:
    import asyncio
except ImportError:
    import uasyncio as asyncio

_IDLE_MS = const(5)
_TICK_MS = const(100)  # udp._TICK_MS: MKU_REQUEST retries (5 s) are checked at least this often


def _readable(s):
    # a generator, so that MicroPython can await it: park the task in asyncio's I/O queue
    # until `s` is readable (what asyncio's Stream.read does before reading)
    yield asyncio.core._io_queue.queue_read(s)


def _can_wait():
    try:
        return callable(asyncio.core._io_queue.queue_read) and callable(asyncio.wait_for_ms)
    except AttributeError:
        return False


async def _sleep_ms(ms):
    try:
        await asyncio.sleep_ms(ms)
    except AttributeError:
        await asyncio.sleep(ms / 1000)


async def run(u):
    wait = _can_wait()
    while u.running:
        u.wakeups += 1
        if u.poll():
            u._busy_at = ticks_ms()
            await _sleep_ms(0)  # a flood must not starve the application's other tasks
            continue
        u._idle()
        if wait:
            try:
                await asyncio.wait_for_ms(_readable(u.sock), _TICK_MS)
            except asyncio.TimeoutError:
                pass
            except Exception as e:  # noqa: BLE001 - e.g. MemoryError in the scheduler
                u._fault(e)
                await _sleep_ms(_IDLE_MS)
        else:
            await _sleep_ms(_IDLE_MS)
