# Content reception of the board RMA's tree client (docs/rmcp2.md "Board content
# reception"; B.17 and the CONTENT_ADDR contract of issue 13, defined by this project).
# board_tree.Tree makes one Content at its first join, once the SM's TLS link is closed and
# the join modules released (the join with the SM link open is the board's heap peak), and
# keeps it: after each join bind() opens a UDP socket and a TCP listening socket whose ports
# the HBs announce in CONTENT_ADDR and, for a multicast-enabled group (rmcp2.json "content"
# "mcast", B.17), a UDP socket on the group's port joined to the group; the control loop
# hands their poll events to handle(), and close() leaves the group and ends them with the
# control link. All of them feed the one Receiver: a packet that comes both by unicast and
# by multicast passes its Kc slot's replay window once (the second copy is ERR_REPLAY). Packets go to content.Receiver (the content
# layer's checks and decryption, as they are), the plaintext to a sink (sink.py). Every
# packet error is counted by its B.12/B.17 number and dropped; none ends the control link.
import select
import socket

from micropython import const

from tessera_fw.rmcp2.content import Receiver, _read_exact  # tcp_loop's frame reader

_PORT_LO = const(49152)  # a content port of 0: the board picks one of the IANA dynamic range
_PORT_TRIES = const(8)  # (MicroPython sockets have no getsockname), up to 8 tries if taken
_UDP_BURST = const(16)  # datagrams read per wake-up before the control link is looked at again
_KIND_BEGIN = const(2)  # content.KIND_*
_KIND_DATA = const(3)
_KIND_END = const(4)
_ERR_TRUNCATED = const(1)  # B.12 numbers counted in the Receiver's errors
_ERR_LENGTH = const(2)
_ERR_OBJECT = const(40)  # content.ERR_OBJECT, ERR_DIGEST (B.17)
_ERR_DIGEST = const(41)
_MIN_PACKET = const(60)  # content packet sizes (B.17)
_MAX_PACKET = const(1100)
_EV_UDP = const(1)  # which() bits
_EV_ACC = const(2)
_EV_TCP = const(4)
_EV_MC = const(8)
# counters (Content.counts), by index
_PKTS = const(0)  # content packets accepted (checked and decrypted)
_BYTES = const(1)  # plaintext bytes handed to the sink
_OBJS = const(2)  # objects verified
_LINKS = const(3)  # content TCP links accepted
_SINK_ERR = const(4)  # the sink failed (a file error): that data is lost, the links stay
_MC_IN = const(5)  # datagrams read from the multicast group's socket (accepted or not)
NAMES = ("c_pkts", "c_bytes", "c_objs", "c_links", "c_sink_err", "c_mc_in")


class Content:
    """The content sockets, Receiver and sink of one board's tree client (`tree`: its
    board_tree.Tree, for the runner, the Kc ring and the log); `sink`: sink.py's interface
    (None: sink.FileSink, files under rx/)."""

    def __init__(self, tree, ports, sink=None, mem=None, mcast=None):
        self.r = tree.r
        self.ring = tree.ring
        self.ports = ports  # rmcp2.json "content": (udp, tcp), 0 = picked, None = not over it
        self.mcast = mcast  # rmcp2.json "content" "mcast": (group 4 bytes, port, interface 4 bytes)
        self.cm = None  # the UDP socket joined to the group
        self.rx = Receiver(self.r.rma.sid, self.ring, self._on_data)
        if sink is None:
            from tessera_fw.rmcp2.sink import FileSink

            sink = FileSink()
        self.sink = sink
        self.counts = [0] * len(NAMES)
        self.cu = self.cl = self.ct = None  # UDP socket, TCP listener, the accepted TCP link
        self.uport = self.tport = 0  # the bound ports, announced in CONTENT_ADDR (0: none)
        self.obj_n = 0  # objects begun since start (the sink's file numbers)
        self.obj_size = 0
        self.kc_use = 0  # the Kc Gen the last accepted packet used
        if mem is not None:  # an earlier join's Content (memory()): numbers and counters go on
            self.obj_n, self.counts, self.rx.errors, self.kc_use = mem

    def memory(self):
        """What the next join's Content takes over (the tree client lets this one go between
        joins): the object number, so that no rx/obj-<n>.bin is overwritten, and the counters."""
        return self.obj_n, self.counts, self.rx.errors, self.kc_use

    def status(self):
        e = self.rx.errors
        line = " ".join("%s=%d" % (n, v) for n, v in zip(NAMES, self.counts))
        line += " kc_gen=%d c_errors=%d c_udp=%d c_tcp=%d" % (self.kc_use, sum(e), self.uport, self.tport)
        for code in range(len(e)):  # the content errors by B.12/B.17 number, those that occurred
            if e[code]:
                line += " cerr%d=%d" % (code, e[code])
        return line

    def which(self, o):
        """The handle() bit of a polled object (0: not a content socket)."""
        if o is self.cu:
            return _EV_UDP
        if o is self.cl:
            return _EV_ACC
        if o is self.ct:
            return _EV_TCP
        if o is self.cm:
            return _EV_MC
        return 0

    def handle(self, got, p):
        """What the poll said readable (which() bits): after the poll's iteration, since
        accepting or closing a link changes the poll's registrations."""
        if got & _EV_UDP:
            self._udp(self.cu)
        if got & _EV_MC:
            self._udp(self.cm)
        if got & _EV_TCP:
            self._tcp(p)
        if got & _EV_ACC:
            self._accept(p)

    def bind(self, p):
        """The content sockets of this join: UDP and a TCP listener on the configured ports
        (0: one picked at random from 49152-65535, retried if taken; None: not over that
        transport). A port that cannot be bound is announced as 0 and said once."""
        want_u, want_t = self.ports
        self.cu, self.uport = self._sock(socket.SOCK_DGRAM, want_u)
        self.cl, self.tport = self._sock(socket.SOCK_STREAM, want_t)
        if self.cu is not None:
            self.cu.settimeout(0)  # drained without blocking (_udp)
            p.register(self.cu, select.POLLIN)
        if self.cl is not None:
            p.register(self.cl, select.POLLIN)
        mc = ""
        if self.mcast is not None:  # board_mc.py: loaded only for a board that names a group
            from tessera_fw.rmcp2.board_mc import join

            self.cm = join(self.mcast, self.r.log)
            if self.cm is not None:
                p.register(self.cm, select.POLLIN)
                g = self.mcast[0]
                mc = " multicast %d.%d.%d.%d:%d" % (g[0], g[1], g[2], g[3], self.mcast[1])
        self.r.log("rmcp2: content on UDP %d TCP %d%s" % (self.uport, self.tport, mc))

    def _sock(self, kind, want):
        if want is None:
            return None, 0
        err = None
        for _ in range(_PORT_TRIES if not want else 1):
            port = want
            if not port:
                b = self.r.rand(2)
                port = _PORT_LO + (((b[0] << 8) | b[1]) % (65536 - _PORT_LO))
            so = None
            try:
                so = socket.socket(socket.AF_INET, kind)
                so.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                so.bind(socket.getaddrinfo("0.0.0.0", port)[0][-1])
                if kind == socket.SOCK_STREAM:
                    so.listen(1)
                return so, port
            except OSError as e:  # EADDRINUSE: another port (EMFILE: the same answer 8 times)
                if so is not None:
                    so.close()
                err = e
        self.r.log("rmcp2: no content %s port (%s)" % ("TCP" if kind == socket.SOCK_STREAM else "UDP",
                                                      type(err).__name__))
        return None, 0

    def _udp(self, cu):
        """Up to _UDP_BURST datagrams of `cu` (the unicast socket or the group's), each to
        the Receiver; a rejected one is counted (its B.12/B.17 number) and dropped. MicroPython has no recv_into for datagrams: recv()
        allocates each one (content.udp_loop says the same); MemoryError drops it."""
        for _ in range(_UDP_BURST):
            try:
                data = cu.recv(_MAX_PACKET + 1)  # one more: an oversized datagram is seen as such
            except MemoryError:
                continue
            except OSError:  # EAGAIN: drained
                return
            if cu is self.cm:
                self.counts[_MC_IN] += 1
            self._feed(data)
            data = None

    def _accept(self, p):
        """A content TCP link from the relay: it replaces the one held (at most one; the
        relay opens a new link per object after a failure)."""
        try:
            so, _addr = self.cl.accept()
        except OSError:
            return
        if self.ct is not None:
            self._tcp_close(p)
        so.settimeout(self._frame_s())
        p.register(so, select.POLLIN)
        self.ct = so
        self.counts[_LINKS] += 1

    def _frame_s(self):
        """The timeout of one TCP frame's read (the control link waits meanwhile): half a
        T_HB, at least 50 ms, at most timeout_s."""
        cfg = self.r.cfg
        return min(cfg["timeout_s"], max(50, cfg["hb_ms"] // 2) / 1000)

    def _tcp(self, p):
        """One content packet from the TCP link, framed by its Length (B.17), read within
        _frame_s(). The peer closing is the link's end; a Length outside 60..1100, a frame
        cut short or a rejected packet is counted and ends the link (the object cannot go
        on); the relay reopens one for the next object."""
        rx = self.rx
        mv = rx.bmv
        ct = self.ct
        try:
            if not _read_exact(ct, mv, 0, 4):
                self._tcp_close(p)
                return
            n = (mv[2] << 8) | mv[3]
            if n < _MIN_PACKET or n > _MAX_PACKET:
                rx.errors[_ERR_LENGTH] += 1
                self._tcp_close(p)
                return
            if not _read_exact(ct, mv, 4, n):
                rx.errors[_ERR_TRUNCATED] += 1
                self._tcp_close(p)
                return
        except OSError:  # a timeout, a reset
            rx.errors[_ERR_TRUNCATED] += 1
            self._tcp_close(p)
            return
        if not self._feed(mv[:n]):
            self._tcp_close(p)

    def _tcp_close(self, p):
        ct = self.ct
        if ct is None:
            return
        self.ct = None
        try:
            p.unregister(ct)
        except Exception:
            pass
        ct.close()
        self._sink_abort()  # an object in progress on that link is lost

    def _feed(self, data):
        """One content packet to the Receiver; False if it was rejected (counted in
        rx.errors by number) or the sink failed (counted c_sink_err)."""
        rx = self.rx
        try:
            rx.receive(data)
        except Exception as e:  # noqa: BLE001 - Rmcp2Error counted by rx; a sink's OSError here
            code = getattr(e, "code", 0)
            if not code:
                self.counts[_SINK_ERR] += 1
            if code == _ERR_OBJECT or code == _ERR_DIGEST or not code:
                self._sink_abort()
            return False
        self.counts[_PKTS] += 1
        g = self.ring.cur.gen
        if g != self.kc_use:
            self.kc_use = g
            self.r.log("rmcp2: content under Kc gen %d" % g)
        return True

    def _on_data(self, kind, mv):
        """content.Receiver's callback: the plaintext to the sink (mv valid during the call)."""
        sink = self.sink
        if kind == _KIND_DATA:
            self.counts[_BYTES] += len(mv)
            sink.data(mv)
        elif kind == _KIND_BEGIN:
            self.obj_n += 1
            self.obj_size = (mv[0] << 24) | (mv[1] << 16) | (mv[2] << 8) | mv[3]
            sink.begin(self.obj_n, self.obj_size)
        elif kind == _KIND_END:
            if sink.end(self.obj_n):
                self.counts[_OBJS] += 1
                self.r.log("rmcp2: object %d %d B verified" % (self.obj_n, self.obj_size))
        else:  # KIND_STREAM
            self.counts[_BYTES] += len(mv)
            sink.stream(mv)

    def _sink_abort(self):
        try:
            self.sink.abort()
        except Exception:  # noqa: BLE001 - a file error: counted, the link stays
            self.counts[_SINK_ERR] += 1

    def close(self):
        if self.cm is not None:
            from tessera_fw.rmcp2.board_mc import leave

            leave(self.cm, self.mcast)
        for so in (self.cu, self.cl):
            if so is not None:
                so.close()
        self.cu = self.cl = self.cm = None
        self.uport = self.tport = 0
        if self.ct is not None:
            self.ct.close()
            self.ct = None
        if self.sink is not None:
            try:
                self.sink.close()
            except Exception:  # noqa: BLE001
                self.counts[_SINK_ERR] += 1
