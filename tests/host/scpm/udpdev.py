"""A firmware device engine (mpshim) behind a real loopback UDP socket, in a thread."""
import collections
import socket
import threading

from tessera.scpm.sim import device_class, memfs_store


class UdpDevice:
    def __init__(self, addr: int, setup_key: bytes, store=None, rand=None):
        self.dev = device_class()(addr, setup_key, store=store if store is not None else memfs_store(), rand=rand)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.lock = threading.Lock()
        self.sent: collections.deque[bytes] = collections.deque(maxlen=64)  # for replay attacks
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while self.running:
            try:
                data, peer = self.sock.recvfrom(2048)
            except (socket.timeout, OSError):
                continue
            with self.lock:
                out = self.dev.receive(data, 0)
            for f in out:
                self.sent.append(bytes(f))
                self.sock.sendto(bytes(f), peer)

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()


def start_serve(db, logf, *extra: str):
    """`tessera ksn serve` on `db` in a subprocess logging to `logf`: (process, UDP port)."""
    import os
    import re
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "tessera", "ksn", "serve", "--db", str(db), "--port", "0", *extra],
                            stdout=logf.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline, m = time.monotonic() + 15, None
    while m is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        m = re.search(r"serving on udp 127\.0\.0\.1:(\d+)", logf.read_text())
    if m is None:
        proc.kill()
        proc.wait()
        raise AssertionError(f"ksn serve did not start: {logf.read_text()}")
    return proc, int(m.group(1))
