# UDP adapter (docs/scpm-profile.md section 9): one general frame per datagram, default
# port 24767. MicroPython's asyncio has no datagram endpoints: the socket is non-blocking
# and the coroutine sleeps in asyncio's I/O queue until a datagram arrives (the wait its
# streams use), waking at least every _TICK_MS for the timers; where that queue is not
# there (CPython) it polls every _IDLE_MS. Runs on ESP32/RP2040 (after the network is up)
# and on the unix port (virtual boards, 127.0.0.1).
#
# Configuration: scpm.json on the board filesystem, e.g.
#   {"address": "0a000002", "setup_key": "<32 hex digits>", "port": 24767,
#    "bind": "0.0.0.0", "ksn_host": "192.168.1.10", "ksn_port": 24767}
# address is 8 hex digits (or an int); ksn_host/ksn_port are optional (the adapter also
# learns the KSN's UDP address from its frames); "log": true prints each counted error.
import socket
import time
from binascii import unhexlify

try:
    import asyncio
except ImportError:
    import uasyncio as asyncio

from tessera_fw import config
from tessera_fw.scpm.const import PORT

CONFIG = "scpm.json"
_IDLE_MS = 5
_TICK_MS = 100  # MKU_REQUEST retries (5 s) are checked at least this often


def ticks_ms():
    try:
        return time.ticks_ms()
    except AttributeError:
        return int(time.monotonic() * 1000)


def load_config(path=CONFIG):
    """The device configuration, or None when there is no file. A file that is there but
    wrong raises ValueError naming the problem (never the key's value)."""
    cfg = config.load(path)
    if cfg is None:
        return None
    try:
        a = cfg["address"]
        cfg["address"] = int(a, 16) if isinstance(a, str) else int(a)
    except (KeyError, ValueError, TypeError):
        raise ValueError(path + ": \"address\" must be 8 hex digits")
    try:
        cfg["setup_key"] = unhexlify(cfg["setup_key"])
    except (KeyError, ValueError, TypeError):
        cfg["setup_key"] = b""
    if len(cfg["setup_key"]) != 16:
        raise ValueError(path + ": \"setup_key\" must be 32 hex digits")
    if not 0 < cfg["address"] < 0x100000000:
        raise ValueError(path + ": \"address\" must be non-zero and fit 32 bits")
    return cfg


def _readable(s):
    # a generator, so that MicroPython can await it: park the task in asyncio's I/O queue
    # until `s` is readable (what asyncio's Stream.read does before reading)
    yield asyncio.core._io_queue.queue_read(s)


def _can_wait():
    try:
        return callable(asyncio.core._io_queue.queue_read) and callable(asyncio.wait_for_ms)
    except AttributeError:
        return False


def make_device(cfg, root=""):
    from tessera_fw.scpm.device import Device
    from tessera_fw.scpm.store import FileFS, Store

    return Device(cfg["address"], cfg["setup_key"], store=Store(FileFS(cfg.get("store_dir", root))))


async def _sleep_ms(ms):
    try:
        await asyncio.sleep_ms(ms)
    except AttributeError:
        await asyncio.sleep(ms / 1000)


class UDPDevice:
    def __init__(self, dev, bind="0.0.0.0", port=PORT, ksn=None, log=None):
        self.dev = dev
        self.port = port
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        except (AttributeError, OSError):
            pass
        s.bind(socket.getaddrinfo(bind, port)[0][-1])
        s.setblocking(False)
        self.sock = s
        self.ksn_addr = ksn  # UDP address for device-initiated frames (MKU_REQUEST)
        self.rx = self.tx = self.faults = 0
        self.log = log
        self.running = True
        self.wakeups = 0  # passes of run()'s loop (idle ones included)

    def _send(self, frames, addr):
        for f in frames:
            if addr is None:
                continue
            try:
                self.sock.sendto(f, addr)
                self.tx += 1
            except OSError:
                pass

    def poll(self):
        """Handle every datagram waiting on the socket; run the timers. True if busy."""
        busy = False
        while True:
            try:
                data, addr = self.sock.recvfrom(1200)
            except OSError:
                break
            busy = True
            self.rx += 1
            try:
                out = self.dev.receive(data, ticks_ms())
            except Exception as e:  # noqa: BLE001 - a bug must not stop the device serving
                self.faults += 1
                print("scpm: fault", type(e).__name__)
                continue
            if self.dev.ksn and self.dev.codec.sa == self.dev.ksn and self.dev.codec.key is not None:
                self.ksn_addr = addr  # a frame authenticated from the KSN: its UDP address
            self._send(out, addr)
        self._send(self.dev.tick(ticks_ms()), self.ksn_addr)
        return busy

    def request_update(self, reason=1):
        """Device-requested master key update (profile 6.5), sent to the KSN's address."""
        self._send(self.dev.request_update(reason, ticks_ms()), self.ksn_addr)

    async def run(self):
        wait = _can_wait()
        while self.running:
            self.wakeups += 1
            if self.poll():
                continue
            if wait:
                try:
                    await asyncio.wait_for_ms(_readable(self.sock), _TICK_MS)
                except asyncio.TimeoutError:
                    pass
            else:
                await _sleep_ms(_IDLE_MS)

    def close(self):
        self.running = False
        # A loop stopped from outside (Ctrl-C lands in the scheduler, not in run()) leaves
        # this socket registered in asyncio's I/O queue, and through it the parked task,
        # this adapter and its device (kilobytes of buffers): a new device started from
        # the REPL then ran out of heap on the esp32 budget. Unregister before closing.
        try:
            q = asyncio.core._io_queue
            if id(self.sock) in q.map:
                q._dequeue(self.sock)
        except (AttributeError, KeyError, OSError, ValueError):
            pass
        self.sock.close()


def start(cfg=None, root=""):
    """Build the device and its UDP endpoint from scpm.json (None if not configured)."""
    if cfg is None:
        cfg = load_config(root + "/" + CONFIG if root else CONFIG)
    if cfg is None:
        return None
    dev = make_device(cfg, root)
    if cfg.get("log"):
        dev.log = print
    ksn = None
    if cfg.get("ksn_host"):
        ksn = socket.getaddrinfo(cfg["ksn_host"], cfg.get("ksn_port", PORT))[0][-1]
    return UDPDevice(dev, cfg.get("bind", "0.0.0.0"), cfg.get("port", PORT), ksn)


def main():
    """Entry point for main.py: serve forever (Ctrl-C returns to the REPL)."""
    u = start()
    if u is None:
        print("scpm: no scpm.json, not started")
        return None
    print("scpm: device %08x on udp port %d, %s" % (u.dev.addr, u.port, "enrolled" if u.dev.enrolled else "unenrolled"))
    try:
        asyncio.run(u.run())
    finally:
        u.close()
        try:  # after Ctrl-C, drop the interrupted loop's tasks so the REPL starts clean
            asyncio.new_event_loop()
        except AttributeError:
            pass
    return u
