# Socket adapter of the board RMA (rma.py): mutual TLS to the SM with MicroPython's `tls`
# (mbedTLS; ECDSA P-256 client certificate and key in DER), blocking reads with a deadline,
# one preallocated receive buffer. docs/rmcp2.md. Not imported by the self-test: boards load
# it only when an RMA is configured.
import select
import socket
import time

try:
    import tls
except ImportError:  # MicroPython before v1.23 has only `ssl`
    import ssl as tls
from micropython import const

from tessera_fw.rmcp2.rma import ST_KTLS, ST_POLICY, ST_SUBS

_MAX = const(1080)  # the envelope's largest sealed message (seal.py)
_ADMIT_MSGS = const(16)  # messages the SM may send during an admission (it needs 3-4)


class TlsLink:
    def __init__(self, host, port, cert_der, key_der, ca_der, timeout=15, sm_name="sm", buf=None):
        ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(cert_der, key_der)
        ctx.load_verify_locations(ca_der)
        ctx.verify_mode = tls.CERT_REQUIRED  # the SM must chain to the session's CA
        s = socket.socket()
        try:
            s.settimeout(timeout)  # T_TLS on the board's side (profile B.10)
            s.connect(socket.getaddrinfo(host, port)[0][-1])
            t0 = time.ticks_ms()
            # mbedTLS verifies the SM's certificate name: the name it was issued under (certs.py
            # puts it in the SAN), not a host name, since MAIDs are addresses (B.1)
            self.s = ctx.wrap_socket(s, server_hostname=sm_name)
        except BaseException:
            s.close()  # a refused handshake leaves no socket behind (the board reconnects)
            raise
        self.handshake_ms = time.ticks_diff(time.ticks_ms(), t0)
        self.admit_ms = 0  # set by admit(): TLS up to the policy agreed (or refused)
        # one receive buffer for the board's life when the caller passes it (reconnects
        # then allocate nothing large)
        self.buf = buf if buf is not None else bytearray(_MAX)
        self.mv = memoryview(self.buf)
        # poll() on the TLS object itself: it also reports bytes mbedTLS already decrypted
        self._poll = select.poll()
        self._poll.register(self.s, select.POLLIN)

    def wait(self, ms):
        """Whether something arrives within `ms` (then recv() reads the whole message,
        bounded by the socket's timeout); a closed or failed link also counts as readable,
        and recv() raises for it."""
        return bool(self._poll.poll(ms))

    def send(self, data):
        self.s.write(data)

    def _fill(self, a, b):
        mv = self.mv
        while a < b:
            n = self.s.readinto(mv[a:b])
            if not n:
                raise OSError("SM closed the link")
            a += n

    def recv(self):
        """One whole message (header Length), as a memoryview into the receive buffer."""
        self._fill(0, 4)
        n = (self.buf[2] << 8) | self.buf[3]
        if n < 20 or n > _MAX:
            raise OSError("frame length %d" % n)
        self._fill(4, n)
        return self.mv[:n]

    def close(self):
        self.s.close()


def admit(rma, host, port, cert_der, key_der, ca_der, timeout=15, sm_name="sm", buf=None):
    """TLS, subscription and policy agreement. Returns the open link (the TLS session stays
    up after admission: 10.1.1.1) with rma.state READY, REFUSED or FAILED. `timeout` bounds
    the handshake and each message wait (the board's T_TLS / T_ADMIT side, B.10)."""
    link = TlsLink(host, port, cert_der, key_der, ca_der, timeout, sm_name, buf)
    t0 = time.ticks_ms()
    try:
        link.send(rma.start())
        n = 0
        while rma.state in (ST_KTLS, ST_SUBS, ST_POLICY):
            n += 1
            if n > _ADMIT_MSGS or time.ticks_diff(time.ticks_ms(), t0) > timeout * 1000:
                raise OSError("admission not done after %d messages" % (n - 1))
            out = rma.receive(link.recv())
            if out is not None:
                link.send(out)
    except Exception:
        link.close()
        raise
    link.admit_ms = time.ticks_diff(time.ticks_ms(), t0)
    return link
