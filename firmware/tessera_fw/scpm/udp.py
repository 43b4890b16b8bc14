# UDP adapter (docs/scpm-profile.md section 9): one general frame per datagram, default
# port 24767. The socket is non-blocking. main() (a board that runs only the device) serves
# with serve(), waiting in select.poll; run() is the coroutine for an application with its
# own asyncio tasks (aioudp.py, loaded only then). Runs on ESP32/RP2040 (after the network
# is up) and on the unix port (virtual boards, 127.0.0.1).
#
# Configuration: scpm.json on the board filesystem, e.g.
#   {"address": "0a000002", "setup_key": "<32 hex digits>", "port": 24767,
#    "bind": "0.0.0.0", "ksn_host": "192.168.1.10", "ksn_port": 24767}
# address is 8 hex digits (or an int); ksn_host/ksn_port are optional (the adapter also
# learns the KSN's UDP address from its master-key frames); "log": true prints a summary
# of the counted errors at most every 10 s (device.LOG_MS), never a line per datagram.
#
# Hostile input (issue 11 #1): every exception while receiving, decoding or answering a
# datagram (MemoryError from recvfrom included) is contained and counted (faults); main()
# is a supervisor that rebuilds the device and restarts the loop if it ever ends other
# than by Ctrl-C.
import gc
import socket
import time
from binascii import unhexlify

from micropython import const

from tessera_fw import config

CONFIG = "scpm.json"
_PORT = const(24767)  # const.PORT (profile section 9)
_TICK_MS = const(100)  # MKU_REQUEST retries (5 s) are checked at least this often
LOG_MS = 10000  # with a log: at most one summary line per 10 s
_PRECOMPUTE_IDLE_MS = const(2000)  # quiet this long: make the next MKU_START's DH key pair
_RESTART_MS = (100, 1000, 5000)  # supervisor back-off after the 1st, 2nd, 3rd+ restart


def ticks_ms():
    try:
        return time.ticks_ms()
    except AttributeError:
        return int(time.monotonic() * 1000)


def ticks_diff(a, b):
    try:
        return time.ticks_diff(a, b)
    except AttributeError:  # CPython: the boards' arithmetic
        from tessera_fw.scpm.ticks import ticks_diff30

        return ticks_diff30(a, b)


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


def make_device(cfg, root=""):
    from tessera_fw.scpm.device import Device
    from tessera_fw.scpm.store import FileFS, Store

    return Device(cfg["address"], cfg["setup_key"], store=Store(FileFS(cfg.get("store_dir", root))))


class UDPDevice:
    def __init__(self, dev, bind="0.0.0.0", port=_PORT, ksn=None, log=None):
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
        self.last_fault = None  # exception class name of the last contained fault
        self.log = log  # callback(str), e.g. print: the periodic summary (report())
        self._snap = {}  # dev.errors and faults at the last summary
        self._log_at = None  # tick of the last summary
        self.running = True
        self.wakeups = 0  # passes of run()'s loop (idle ones included)
        self.restarts = 0  # set by main()'s supervisor
        self.precompute = True  # scpm.json "precompute_dh": false turns it off
        self._busy_at = ticks_ms()  # tick of the last datagram

    def _send(self, frames, addr):
        for f in frames:
            if addr is None:
                continue
            try:
                self.sock.sendto(f, addr)
                self.tx += 1
            except OSError:
                pass

    def _fault(self, e):
        # counted and summarised (report()): a flood that provokes an exception per
        # datagram must not write a line per datagram
        self.faults += 1
        self.last_fault = type(e).__name__

    def report(self, now_ms):
        """Issue 11 #10: never a log line per datagram (a flood of junk wrote one per frame
        and, on a console nobody reads, blocked the board); at most one line per LOG_MS with
        the count of each error and of the faults since the last line. Error and exception
        names only, never key material. Returns the line or None."""
        if self.log is None:
            return None
        if self._log_at is not None and ticks_diff(now_ms, self._log_at) < LOG_MS:
            return None
        from tessera_fw.scpm.frame import name  # loaded with the device; names built only here

        snap = self._snap
        parts = []
        total = 0
        for code, n in self.dev.errors.items():  # at most one entry per error number
            d = n - snap.get(code, 0)
            if d:
                total += d
                parts.append("%s %d" % (name(code), d))
        d = self.faults - snap.get("faults", 0)
        if d:
            total += d
            parts.append("faults %d (last %s)" % (d, self.last_fault))
        if not total:
            return None
        self._log_at = now_ms
        snap = self._snap = dict(self.dev.errors)
        snap["faults"] = self.faults
        line = "scpm: %d frames dropped or refused: %s" % (total, ", ".join(parts))
        self.log(line)
        return line

    def poll(self):
        """Handle every datagram waiting on the socket; run the timers. True if busy."""
        busy = False
        for _ in range(64):  # bounded: the timers run between batches even under a flood
            data = None
            try:
                data, addr = self.sock.recvfrom(1200)
            except OSError:  # EAGAIN: nothing more waiting
                break
            except Exception as e:  # noqa: BLE001 - MemoryError: recvfrom allocates each datagram
                self._fault(e)
                gc.collect()
                break
            busy = True
            self.rx += 1
            try:
                out = self.dev.receive(data, ticks_ms())
                data = None
                if self.dev.from_ksn:
                    # only a frame that authenticated under the master key (or enrolled
                    # the device) moves where device-initiated frames go (issue 11 #2)
                    self.ksn_addr = addr
                self._send(out, addr)
            except Exception as e:  # noqa: BLE001 - a bug must not stop the device serving
                data = out = None
                self._fault(e)
                gc.collect()
        try:
            now = ticks_ms()
            self._send(self.dev.tick(now), self.ksn_addr)
            self.report(now)
        except Exception as e:  # noqa: BLE001
            self._fault(e)
        return busy

    def request_update(self, reason=1):
        """Device-requested master key update (profile 6.5), sent to the KSN's address."""
        self._send(self.dev.request_update(reason, ticks_ms()), self.ksn_addr)

    def run(self):
        """The coroutine serving this device in an application's asyncio loop (aioudp.py,
        imported only here: main() serves without asyncio)."""
        from tessera_fw.scpm.aioudp import run

        return run(self)

    def _idle(self):
        if self.precompute and ticks_diff(ticks_ms(), self._busy_at) >= _PRECOMPUTE_IDLE_MS:
            try:  # one exponentiation (seconds on a board) while nothing else is asked
                self.dev.precompute()
            except Exception as e:  # noqa: BLE001 - MemoryError: the update makes its own
                self._fault(e)
            self._busy_at = ticks_ms()

    def serve(self):
        """Serve without asyncio, for a board that runs only the device (main()): wait in
        select.poll for a datagram, at most _TICK_MS for the timers. Ctrl-C ends it."""
        import select

        p = select.poll()
        p.register(self.sock, select.POLLIN)
        while self.running:
            self.wakeups += 1
            if self.poll():
                self._busy_at = ticks_ms()
                continue
            self._idle()
            p.poll(_TICK_MS)

    def close(self):
        self.running = False
        # A loop stopped from outside (Ctrl-C lands in the scheduler, not in run()) leaves
        # this socket registered in asyncio's I/O queue, and through it the parked task,
        # this adapter and its device (kilobytes of buffers): a new device started from
        # the REPL then ran out of heap on the esp32 budget. Unregister before closing.
        try:
            import sys

            a = sys.modules.get("asyncio") or sys.modules.get("uasyncio")
            q = a.core._io_queue  # AttributeError if asyncio was never imported (None)
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
    ksn = None
    if cfg.get("ksn_host"):
        ksn = socket.getaddrinfo(cfg["ksn_host"], cfg.get("ksn_port", _PORT))[0][-1]
    u = UDPDevice(dev, cfg.get("bind", "0.0.0.0"), cfg.get("port", _PORT), ksn,
                  print if cfg.get("log") else None)
    u.precompute = cfg.get("precompute_dh", True) is not False
    return u


def _serve(u):
    try:
        u.serve()
    finally:
        u.close()


def main(max_restarts=-1, start_fn=None, config=CONFIG):
    """Entry point for main.py: serve forever (Ctrl-C returns to the REPL).

    A supervisor: if the loop ever ends (an exception that escaped it, a MemoryError while
    building the device) the device is rebuilt from its key store and served again, after
    a back-off of 0.1 s, 1 s, then 5 s; `restarts` counts the restarts. Only Ctrl-C
    (KeyboardInterrupt, what mpremote sends) or SystemExit ends it. max_restarts >= 0
    bounds the restarts (tests); start_fn replaces start() (tests). A wrong scpm.json
    raises its named ValueError at once (not retried)."""
    if start_fn is None:
        # a wrong scpm.json is not transient: its named error ends main() here, once
        cfg = load_config(config)
        if cfg is None:
            print("scpm: no scpm.json, not started")
            return None
        start_fn = lambda: start(cfg)  # noqa: E731
    restarts = 0
    u = None
    while True:
        try:
            u = start_fn()
            if u is None:
                print("scpm: no scpm.json, not started")
                return None
            u.restarts = restarts
            print("scpm: device %08x on udp port %d, %s%s" % (
                u.dev.addr, u.port, "enrolled" if u.dev.enrolled else "unenrolled",
                (", restart %d" % restarts) if restarts else ""))
            _serve(u)
            if not u.running:
                return u  # stopped on purpose (close())
            why = "loop ended"
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the supervisor: whatever ended it, start again
            why = type(e).__name__
        u = None
        gc.collect()
        if 0 <= max_restarts <= restarts:
            print("scpm: stopped after %d restarts (%s)" % (restarts, why))
            return None
        restarts += 1
        print("scpm: restart %d (%s)" % (restarts, why))
        time.sleep_ms(_RESTART_MS[min(restarts, 3) - 1]) if hasattr(time, "sleep_ms") else time.sleep(
            _RESTART_MS[min(restarts, 3) - 1] / 1000)
