# The board RMA's tree client (docs/rmcp2.md "Board tree client"; profile B.15 "Control
# link", defined by this project): after the admission to the SM, the board joins its parent
# DMA (join.py over TCP: PPROBREQ, Annex E, K_MAS, the first Kg) and keeps that TCP link as
# its control link. Every message on it after the join is under K_MAS and names this RMA,
# except the group KEYDELIVERs under Kg (they name the DMA): KEYDELIVER of Kg (under K_MAS or
# the previous Kg) and Kc (under Kg) go to keys.py; HB both ways every T_HB (nothing
# authentic from the DMA for 3 T_HB: it is gone); LEAVREQ/LEAVANS either way. A dropped link
# is joined again with a fresh Annex E after a bounded, jittered backoff. Loaded by board.py
# only when rmcp2.json names a DMA.
#
# Content (B.17; the CONTENT_ADDR contract of issue 13, defined by this project): after each
# join the board binds a UDP socket and a TCP listening socket (rmcp2.json "content"),
# announces their ports in CONTENT_ADDR inside its first HB (Seq 1 under the new K_MAS) and
# every HB after it, and its control loop polls the control link, the UDP socket, the
# listener, at most one accepted content TCP link (a newer one replaces it) and, with
# "content" "mcast", a UDP socket joined to the group's multicast address, feeding one
# content.Receiver (board_rx.py); plaintext goes to a sink (sink.py). A content packet's error is counted
# and dropped; it never ends the control link. The content sockets close with it.
#
# Re-graft (B.15): rmcp2.json "dmas" lists candidate parent DMAs. A lost DMA (closed, 3 T_HB
# silent, no connect, a refused or failed join) or a LEAVREQ LEAVE_NORMAL from it: the next
# candidate (wrapping) is joined after the jittered backoff, without a new admission at the
# SM (every DMA of the session holds the RMA in its ACL, B.14); LEAVREQ EXPELLED (and any
# other result) sends the board back to the SM.
#
# The SM's TLS link is kept until the join succeeds (10.1.1.1: an RMA's TLS session is kept
# until it has authenticated to its parent DMA), then closed: the SM keeps the member and its
# ACL entry after the link closes (sm.py disconnect), and the board's heap is spared the TLS
# session while the control link runs. After _JOIN_TRIES failed joins in a row (a link that
# drops within 3 T_HB of its join counts as one) or a LEAVREQ from the DMA, the board goes
# back to the SM for a new admission (a fresh K_TLS, B.13).
import select
import socket
import time

from micropython import const

from tessera_fw import acquire, release
from tessera_fw.rmcp2 import msg as M
from tessera_fw.rmcp2 import join_net
from tessera_fw.rmcp2.keys import Keys

# failed joins in a row before the board re-admits at the SM: with the default backoff
# (1 s doubling to 60 s) they span 1+2+4+8+16+32 = 63 s, past the DMA's HRS_REFRESH (60 s,
# B.10) after which a freshly admitted RMA is in its ACL
_JOIN_TRIES = const(6)
# NOT_IN_ACL refusals in a row from one candidate before the next is tried: the DMAs learn a
# new admission only at their next HRSREQ (B.14, HRS_REFRESH), all with the same lag, so a
# fresh member waits for its preferred DMA instead of moving down the list (defined by this
# project)
_ACL_WAITS = const(3)
_F_NOT_IN_ACL = const(2)  # annexe.F_NOT_IN_ACL
# loaded for each join and released after it (from .mpy), so that the control link does not
# hold their code: join imports annexe and tree (docs/rmcp2.md)
_JOIN_MODS = ("tessera_fw.rmcp2.join", "tessera_fw.rmcp2.annexe", "tessera_fw.rmcp2.tree")
_ST_JOINED = const(4)  # join.ST_JOINED
_T_ANNEXE_S = const(20)  # B.10: the board's socket timeout during the join
_MISSED = const(3)  # T_HB periods without a message from the DMA: it is gone (B.10)
_HB = const(0xAD)
_LEAVREQ = const(0xAB)
_LEAVANS = const(0xAC)
_LEAVE_NORMAL = const(0x20)  # B.9
_ACCEPTED = const(0x01)
_KT_KG = const(2)
_KT_KC = const(3)
# control() outcomes
DROPPED = const(0)
EXPELLED = const(1)
LEFT = const(2)  # LEAVREQ LEAVE_NORMAL from the DMA: it stops; the board re-grafts

# counters (Tree.counts), by index
_JOINS = const(0)  # join attempts (TCP to the DMA + Annex E)
_JOINED = const(1)
_JOIN_REFUSED = const(2)  # PPROBANS / RELANS refusal, or a DMA that is not dma_maid
_JOIN_ERRORS = const(3)  # no TCP link, a timeout, the link closed during the join
_DMA_DROPS = const(4)  # the control link lost (closed, read failed, 3 T_HB silent)
_DMA_HB_SENT = const(5)
_DMA_HB_IN = const(6)
_DMA_MSGS = const(7)  # messages received on the control link
_KG = const(8)  # Kg installed after the join (re-keys)
_KC = const(9)  # Kc installed
_LEFT = const(10)  # LEAVREQ sent (clean stop)
_EXPELLED = const(11)  # LEAVREQ from the DMA answered (other than LEAVE_NORMAL)
_DMA_LEFT = const(12)  # LEAVREQ LEAVE_NORMAL from the DMA answered: re-graft
_REGRAFTS = const(13)  # joins to another candidate DMA than the last one joined
TREE_NAMES = ("joins", "joined", "join_refused", "join_errors", "dma_drops", "dma_hb_sent", "dma_hb_in",
              "dma_msgs", "kg", "kc", "left", "expelled", "dma_left", "regrafts")


def new_ring(rma):
    """The content layer's KcRing for the agreed CON_EN_DEC / AUTH_ID (content.py is part of
    every board package)."""
    from tessera_fw.rmcp2.content import KcRing

    return KcRing(rma.policy[2], rma.policy[4])


# what the tree client loads after a join and lets go when the board goes back to the SM
# (the admission and the join with the SM link open are the board's heap peak): the content
# layer (with const.py, 11.6 KB of code on the unix port), the content reception, sink and
# multicast group (board_mc: loaded only with "mcast"; its mcast_join keeps content.py's
# globals alive, so it goes with the reception)
_CONTENT_MODS = ("tessera_fw.rmcp2.board_rx", "tessera_fw.rmcp2.sink", "tessera_fw.rmcp2.board_mc",
                 "tessera_fw.rmcp2.content", "tessera_fw.rmcp2.const")


class Tree:
    """The tree client of one board Runner (board.py): run() after each admission. `sink`
    receives the content's plaintext (sink.py's interface; None: sink.FileSink)."""

    def __init__(self, runner, ring=None, sink=None):
        self.r = runner
        cfg = runner.cfg
        rma = runner.rma
        self.cands = cfg.get("dmas") or ((cfg["dma"][0], cfg["dma"][1], cfg["dma_maid"]),)
        self.ci = 0  # the candidate in use
        self.host, self.port, self.dma_maid = self.cands[0]
        self.joined_ci = -1  # the candidate last joined (a join elsewhere is a re-graft)
        self.hdma = None  # the DMA's HASHED_MAID: IDs it must prove in Annex E (set at each join)
        # the Kc ring: the caller's, or one made after the first join (content.py is not in
        # the heap during the join with the SM link open) and kept across re-joins and
        # re-grafts (the same session), forgotten when the board goes back to the SM
        self.ring = ring
        self.own_ring = ring is None
        self.kept = None  # the Kc of the ring between joins (_unload)
        self.keys = Keys(rma.sid, rma.maid, ring, env=rma.env, dec=rma.dec)
        self.counts = [0] * len(TREE_NAMES)
        self.s = None  # the control link (a TCP socket)
        self.seq = 0  # Seq of this RMA's messages under the current K_MAS (B.7)
        self.w = b""
        self.fail = 0  # the last refusal's annexe.F_* reason
        # content (B.17): the ports of rmcp2.json "content" (None: no content at all); the
        # board_rx.Content is made at the first join (_content)
        self.cports = cfg.get("content")
        self.sink = sink
        self.cx = None
        self.cmem = None  # board_rx.Content.memory() of the last join's reception

    def status(self):
        line = " ".join("%s=%d" % (n, v) for n, v in zip(TREE_NAMES, self.counts)) + " kg_gen=%d" % self.keys.kg_gen()
        line += " dma_i=%d" % self.ci
        return line if self.cx is None else line + " " + self.cx.status()

    def run(self):
        """With the SM link admitted (runner.link): join, keep the control link, re-join
        after drops, re-graft to the next candidate DMA when the DMA is lost or leaves.
        Returns EXPELLED after a LEAVREQ from the DMA other than LEAVE_NORMAL, DROPPED after
        _JOIN_TRIES failed joins in a row or when the SM link is lost before a join
        succeeded; the SM link is closed either way (the caller admits again)."""
        r = self.r
        rma = r.rma
        self.w = rma.hashed_ktls()  # W of Annex E (B.11): what the DMA's ACL holds for us
        enc, auth = rma.enc, rma.mac  # the agreed GK_EN_DEC_ID / AUTH_ID (SECLIST)
        lo, hi = r.cfg["backoff_ms"]
        short = _MISSED * r.cfg["hb_ms"]
        wait = lo
        fails = 0
        acl_waits = 0
        try:
            while fails < _JOIN_TRIES:
                if self.join(enc, auth):
                    if r.link is not None:  # 10.1.1.1: authenticated to the parent DMA now
                        r.link.close()
                        r.link = None
                    t = time.ticks_ms()
                    how = self.control()
                    self._unload(False)  # the content reception is made again after the next join
                    if how == EXPELLED:
                        return EXPELLED
                    if time.ticks_diff(time.ticks_ms(), t) >= short:
                        fails = 0  # the link served a while: the backoff starts short again
                        wait = lo
                    else:
                        fails += 1  # dropped soon after the join: a DMA that takes and drops
                        # members is not joined again at the shortest wait for ever
                else:
                    fails += 1
                if self.fail == _F_NOT_IN_ACL and acl_waits < _ACL_WAITS:
                    acl_waits += 1  # its ACL has not caught up with our admission yet: the same DMA again
                else:
                    acl_waits = 0
                    self.next_dma()  # the DMA is lost, left or refused: the next candidate (B.15)
                if fails >= _JOIN_TRIES:
                    break
                if not r.pause(r.jitter(wait)):
                    break  # the SM link was lost before a join: admit again
                if fails:
                    wait = min(2 * wait, hi)
            return DROPPED
        finally:
            if r.link is not None:
                r.link.close()
                r.link = None
            self._unload(True)

    def _unload(self, out):
        """Between joins the content code and buffers are let go, so that the join (its
        modules and the DH key pair) finds room: the reception (board_rx, sink, the
        Receiver: 10.6 KB on the unix port) and, when the tree client made the Kc ring, the
        ring and the content layer (content.py with const.py, 11.6 KB), the ring's Kc kept
        as plain values (`kept`: Gen, key, stream window, object Seq of the current and
        next Kc) and put back into a new ring after the join: the same session, the same
        keys, no replay window reopened (B.15 re-graft). Back to the SM (`out`: expelled,
        or no join) nothing is kept: a member out of the group keeps no Kc, and the DMA
        hands a joining member the current Kc (B.16)."""
        if self.cx is not None:
            self.cmem = self.cx.memory()
            self.cx = None
        n = 3
        if self.own_ring:
            self.kept = None
            ring = self.ring
            if ring is not None:
                if not out:
                    self.kept = [(x.gen, bytes(x.key), x.win.high, list(x.win.slot), x.obj_high)
                                 for x in (ring.cur, ring.nxt) if x is not None]
                ring.forget()
                self.ring = self.keys.ring = None
            n = 5
        for i in range(n):
            release(_CONTENT_MODS[i])

    def _ring_back(self, ring):
        """Put the Kc kept by _unload back into a new ring (windows and object Seq too)."""
        for gen, key, high, slots, obj_high in self.kept or ():
            ring.install(gen, key)
            x = ring.cur if ring.cur.gen == gen else ring.nxt
            x.win.high = high
            x.win.slot[:] = slots
            x.obj_high = obj_high
        self.kept = None
        return ring

    def next_dma(self):
        """The next candidate parent DMA of rmcp2.json "dmas", wrapping (one: the same)."""
        self.ci = (self.ci + 1) % len(self.cands)
        self.host, self.port, self.dma_maid = self.cands[self.ci]
        self.hdma = None

    def join(self, enc, auth):
        """One join: TCP, PPROBREQ, Annex E; True with the control link open in self.s.
        The join modules are loaded for it and released after it (when from .mpy)."""
        import gc
        import sys

        r = self.r
        rma = r.rma
        c = self.counts
        c[_JOINS] += 1
        self.fail = 0
        ok = False
        J = None
        # the join modules loaded by this call are released after it, also when the import
        # itself failed (a MemoryError half-way leaves annexe or tree in sys.modules, whose
        # 7-9 KB of code the control link would then hold for good)
        fresh = _JOIN_MODS[0] not in sys.modules
        s = socket.socket()
        try:
            J, fresh = acquire(_JOIN_MODS[0])  # join, which loads annexe and tree
            if self.hdma is None:
                self.hdma = sys.modules[_JOIN_MODS[2]].hashed_maid(rma.sid, self.dma_maid)
            j = J.Join(rma.sid, rma.maid, self.w, enc, auth, r.rand)
            t0 = time.ticks_ms()
            j.precompute()  # the key pair before the link opens: the DMA's T_ANNEXE runs from pass 1
            s.settimeout(_T_ANNEXE_S)
            s.connect(socket.getaddrinfo(self.host, self.port)[0][-1])
            join_net.run(j, s, r.buf)
            ms = time.ticks_diff(time.ticks_ms(), t0)
            if j.state != _ST_JOINED or j.parent != self.hdma:
                c[_JOIN_REFUSED] += 1
                self.fail = j.fail if j.state != _ST_JOINED else 3  # IDENTITY: not the configured DMA
                r.log("rmcp2: join refused by DMA %s:%d (reason %d) after %d ms" % (self.host, self.port, self.fail, ms))
            else:
                k = self.keys
                k.enc = enc
                k.auth = auth
                k.joined(self.dma_maid, j.kmas, j.kg_gen, j.kg)
                j = J = None  # the join's objects go before the ring's are made
                self.seq = 0
                self.s = s
                ok = True
        except Exception as e:  # OSError, a timeout, MemoryError: counted, retried
            c[_JOIN_ERRORS] += 1
            r.log("rmcp2: no join with DMA %s:%d (%s)" % (self.host, self.port, type(e).__name__))
        finally:
            if not ok:
                s.close()
            j = J = None
            if fresh:
                for name in _JOIN_MODS:
                    release(name)
            gc.collect()
        if ok and self.ring is None:  # after the join modules are released: see __init__
            try:
                self.ring = self.keys.ring = self._ring_back(new_ring(rma))
            except MemoryError:
                ok = False
                c[_JOIN_ERRORS] += 1
                self._close()
                r.log("rmcp2: no heap for the Kc ring (MemoryError)")
        if ok:
            c[_JOINED] += 1
            if self.joined_ci >= 0 and self.joined_ci != self.ci:
                c[_REGRAFTS] += 1
            self.joined_ci = self.ci
            r.log("rmcp2: joined DMA %s:%d (Kg gen %d) in %d ms" % (self.host, self.port, self.keys.kg_gen(), ms))
        return ok

    def control(self):
        """Keep the control link until it drops (DROPPED), the DMA expels this RMA
        (EXPELLED) or leaves (LEFT: LEAVREQ LEAVE_NORMAL). HB every hb_ms on the board's
        ticks, with CONTENT_ADDR, the first at once; silence for 3 of them: gone. Content
        sockets are polled beside the link. KeyboardInterrupt (a clean stop) sends LEAVREQ
        first."""
        r = self.r
        rma = r.rma
        k = self.keys
        c = self.counts
        s = self.s
        hb = r.cfg["hb_ms"]
        lost = _MISSED * hb
        mv = memoryview(r.buf)
        p = select.poll()
        p.register(s, select.POLLIN)
        s.settimeout(r.cfg["timeout_s"])  # a message that started must finish within it
        cx = self._content()
        if cx is not None:
            try:
                cx.bind(p)
            except Exception as e:  # MemoryError, no socket left: this link runs without content
                cx.close()
                cx = None
                r.log("rmcp2: no content sockets (%s)" % type(e).__name__)
        content = cx is not None
        now = time.ticks_ms()
        due = now if content else time.ticks_add(now, hb)  # CONTENT_ADDR at once
        last = now
        how = DROPPED
        try:
            while True:
                now = time.ticks_ms()
                quiet = time.ticks_diff(now, last)
                if quiet >= lost:
                    raise OSError("%d T_HB without a message" % _MISSED)
                left = time.ticks_diff(due, now)
                if left <= 0:
                    if content:
                        hbm = M.hb_addr(rma.w, rma.sid, rma.maid, cx.uport, cx.tport)
                    else:
                        hbm = M.empty(rma.w, _HB, rma.sid, rma.maid)
                    s.write(self._kmas(hbm))
                    c[_DMA_HB_SENT] += 1
                    due = time.ticks_add(due, hb)
                    if time.ticks_diff(due, now) <= 0:  # far behind: no burst of HBs
                        due = time.ticks_add(now, hb)
                    continue
                ctl = False
                got = 0
                for ev in p.ipoll(min(left, lost - quiet)):
                    o = ev[0]
                    if o is s:
                        ctl = True
                    elif content:
                        got |= cx.which(o)
                if got:  # content first: a datagram waits in a bounded socket buffer
                    cx.handle(got, p)
                if not ctl:
                    continue
                data = join_net.read_frame(s, mv)
                now = time.ticks_ms()
                c[_DMA_MSGS] += 1
                kt = k.receive(data, now)
                if kt or k.mtype:
                    last = now  # only what authenticates under the group's keys counts as the DMA alive
                if k.mtype == _HB:
                    c[_DMA_HB_IN] += 1
                elif kt == _KT_KG:
                    c[_KG] += 1
                    r.log("rmcp2: Kg gen %d from the DMA" % k.kg_gen())
                elif kt == _KT_KC:
                    c[_KC] += 1
                    r.log("rmcp2: Kc gen %d from the DMA" % k.kc_gen)
                elif k.mtype == _LEAVREQ:
                    try:  # the DMA may close the link right after its LEAVREQ
                        s.write(self._kmas(M.result(rma.w, _LEAVANS, rma.sid, rma.maid, _ACCEPTED)))
                    except OSError:
                        pass
                    if k.result == _LEAVE_NORMAL:  # B.15: the DMA stops; the board re-grafts
                        c[_DMA_LEFT] += 1
                        r.log("rmcp2: the DMA left (LEAVREQ 0x%02x): re-graft" % k.result)
                        how = LEFT
                    else:
                        c[_EXPELLED] += 1
                        r.log("rmcp2: the DMA ended the membership (LEAVREQ 0x%02x)" % k.result)
                        how = EXPELLED
                    break
        except KeyboardInterrupt:  # a clean stop: LEAVREQ under K_MAS, then the link closes
            self.leave()
            raise
        except Exception as e:  # closed by the DMA, a read/write failed, 3 T_HB silent
            c[_DMA_DROPS] += 1
            r.log("rmcp2: DMA link lost (%s)" % type(e).__name__)
        self._close()
        return how

    def _content(self):
        """The board_rx.Content of this join's control link (None: rmcp2.json "content":
        null, or no heap for it: said, that link runs without content)."""
        if self.cx is None and self.cports is not None:
            try:
                from tessera_fw.rmcp2.board_rx import Content

                self.cx = Content(self, self.cports, self.sink, self.cmem, self.r.cfg.get("mcast"))
            except MemoryError:  # this link runs without content; the next join tries again
                self.r.log("rmcp2: no heap for content reception (MemoryError)")
        return self.cx

    def leave(self):
        """LEAVREQ (LEAVE_NORMAL) under K_MAS and LEAVANS awaited for timeout_s (at most 8
        messages read); the keys are forgotten and the link closed either way."""
        s = self.s
        if s is None:
            return
        r = self.r
        rma = r.rma
        k = self.keys
        ans = False
        try:
            s.write(self._kmas(M.result(rma.w, _LEAVREQ, rma.sid, rma.maid, _LEAVE_NORMAL)))
            self.counts[_LEFT] += 1
            mv = memoryview(r.buf)
            for _ in range(8):
                k.receive(join_net.read_frame(s, mv), time.ticks_ms())
                if k.mtype == _LEAVANS:
                    ans = True
                    break
        except Exception:
            pass
        r.log("rmcp2: left the DMA (LEAVREQ sent, LEAVANS %s)" % ("received" if ans else "not received"))
        self._close()

    def _close(self):
        if self.s is not None:
            self.s.close()
            self.s = None
        if self.cx is not None:
            self.cx.close()
        self.keys.leave()  # no longer a member: K_MAS and Kg are forgotten (a re-join brings new ones)

    def _kmas(self, plain):
        self.seq += 1
        k = self.keys
        return k.env.seal(plain, k.kmas, k.enc, k.auth, self.seq, self.r.rand(16))
