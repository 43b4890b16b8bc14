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
