# The RMA's main loop on a board (docs/rmcp2.md "Board RMA"): admission over TLS
# (rma_net.admit), then the link is kept: HB every T_HB on the board's ticks, what the SM
# sends is answered, and a dropped link (or a restarted SM) is reconnected with a bounded,
# jittered backoff and a new subscription (B.13 re-subscription). Everything is bounded:
# one link, one receive buffer for the board's life, one engine, counters instead of
# stored events, a log line per link event (no more often than the backoff allows).
#
# Configured by rmcp2.json on the board's filesystem (main.py starts it when the file is
# there and scpm.json is not), e.g.
#   {"sm_host": "10.0.0.2", "sm_port": 26030, "session_id": "0123456789abcdef",
#    "maid": "0a0000020ab20001", "cert": "rma.der", "key": "rma.key.der", "ca": "ca.der",
#    "sm_name": "sm", "service_user_id": "viewer-1", "hb_s": 30, "timeout_s": 15,
#    "backoff_s": [1, 60], "dmas": [["10.0.0.3", 26032, "0a00000365980d01"]],
#    "content": {"udp": 0, "tcp": 0}}
# With "dmas" (candidate parent DMAs; or the older "dma" + "dma_maid") the board joins the
# first after admission, keeps the join link as its control link, takes content on the
# ports of "content" and re-grafts to the next candidate when its DMA is lost
# (board_tree.py, loaded only then; docs/rmcp2.md).
# The key file stays on the board's filesystem; it never appears in a log line or error.
import os
import time

from micropython import const

# rma.py's states, inlined: board.py loads rma.py only after rmcp2.json is read, so that
# the config's garbage is gone before the RMA's modules take their place in the heap
_ST_READY = const(4)
_ST_REFUSED = const(5)
_ST_FAILED = const(6)
_ST_TERMINATED = const(7)

CONFIG = "rmcp2.json"
_RMA_POOL = const(2480)  # rma.POOL: the envelope's and the Writer's buffers
_POOL = const(3560)  # and rma_net's 1080-byte receive buffer
# contiguous heap the TLS handshake needs (mbedTLS allocates on the GC heap on the unix
# port and the RP2040): measured 7-8 KB on the unix port, docs/benchmarks.md
_TLS_ROOM = const(8192)
# counters (Runner.counts), by index
_LINKS = const(0)  # TLS connections attempted
_ADMITTED = const(1)  # admissions that reached READY
_REFUSED = const(2)  # SUBSANS other than ACCEPTED (0x41, 0x42, ...)
_POLICY_FAILED = const(3)  # SECAGANS FAILED CONFIGURATION sent
_CONNECT_ERRORS = const(4)  # no TCP/TLS link, or the admission broke off
_DROPS = const(5)  # an admitted link lost (the SM closed it, restarted, or a read failed)
_HB_SENT = const(6)
_MSGS_IN = const(7)  # messages received on admitted links
_TERMINATED = const(8)  # TERMREQ from the SM
COUNT_NAMES = ("links", "admitted", "refused", "policy_failed", "connect_errors", "drops", "hb_sent",
               "msgs_in", "terminated")


def _read(name):
    with open(name, "rb") as f:
        return f.read()


class Runner:
    """One RMA with its link. run() keeps it admitted; `counts` (COUNT_NAMES) and the
    engine's `rma.errors` (per B.12 error number) say what happened."""

    def __init__(self, cfg, log=None, rand=os.urandom, sleep_ms=None, pool=None, ring=None, sink=None):
        self.cfg = cfg
        self.log = log or self._log
        self.rand = rand
        self.sleep_ms = sleep_ms or time.sleep_ms
        from tessera_fw.rmcp2 import rma_net
        from tessera_fw.rmcp2.rma import Rma

        self.net = rma_net
        self.cert = _read(cfg["cert"])
        if pool is None:
            pool = new_pool()
        mv = memoryview(pool)
        self.rma = Rma(cfg["session_id"], cfg["maid"], self.cert, rand, sui=cfg["sui"], pool=mv[:_RMA_POOL])
        self.buf = mv[_RMA_POOL:_POOL]  # rma_net's receive buffer, kept across reconnects
        self.counts = [0] * len(COUNT_NAMES)
        self.backoff = cfg["backoff_ms"][0]
        self.link = None
        self.room = None  # _TLS_ROOM held between links (reserve())
        self.tree = None  # board_tree.Tree once a DMA is joined (rmcp2.json "dma")
        self.ring = ring  # where Kc goes (the content layer's KcRing; board_tree picks one if None)
        self.sink = sink  # the receiving application (sink.py's interface; None: sink.FileSink)

    def run(self, links=0):
        """Admit and keep the link; after a drop, wait (bounded backoff) and start again.
        With a DMA in rmcp2.json the admitted board joins it and keeps the control link
        (board_tree.py) instead of the SM link. `links`: stop after that many connection
        attempts to the SM (0: never, as on a board)."""
        lo, hi = self.cfg["backoff_ms"]
        while not links or self.counts[_LINKS] < links:
            state = self.once()
            if state == _ST_READY:
                if self.cfg.get("dmas"):
                    expelled = self.tree_run()
                    wait = hi if expelled or self.rma.state == _ST_TERMINATED else lo
                else:
                    self.serve()
                    wait = hi if self.rma.state == _ST_TERMINATED else lo
                self.backoff = lo  # it was admitted: the next drop starts short again
            elif state in (_ST_REFUSED, _ST_FAILED):
                wait = hi  # a configuration matter (identifier, policy) or the session ended
            else:
                wait = self.backoff
                self.backoff = min(2 * self.backoff, hi)
            if links and self.counts[_LINKS] >= links:
                break
            self.reserve()
            self.sleep_ms(self.jitter(wait))

    def reserve(self):
        """Hold _TLS_ROOM bytes in one piece between links: the ended link's TLS buffers
        have just left a hole that size, and the small objects of the wait (log lines, a
        failed connect's socket and exception) would otherwise be scattered into it, so that
        the next handshake finds no room (MemoryError at 56 KB after an SM restart)."""
        import gc

        self.room = None
        gc.collect()
        try:
            self.room = bytearray(_TLS_ROOM)
        except MemoryError:
            pass  # the handshake will try anyway

    def jitter(self, wait):
        """Half the wait plus up to the other half, so that boards do not come back together."""
        r = self.rand(2)
        return wait // 2 + ((r[0] << 8) | r[1]) % (wait // 2 + 1)

    def tree_run(self):
        """Join the DMA of rmcp2.json and keep the control link (board_tree.py, loaded
        only when a DMA is configured); True when the DMA ended the membership."""
        if self.tree is None:
            try:
                from tessera_fw.rmcp2.board_tree import Tree

                self.tree = Tree(self, self.ring, self.sink)
            except MemoryError:  # a heap too small for the tree client: said, then the longest wait
                self.link.close()
                self.link = None
                self.log("rmcp2: no heap for the tree client (MemoryError)")
                return True
        return self.tree.run() == 1  # board_tree.EXPELLED

    def pause(self, ms):
        """Wait `ms`, keeping the SM link served (HB, TERMREQ) while it is open. False if
        the SM link was lost (or the session terminated) meanwhile."""
        if self.link is None:
            self.sleep_ms(ms)
            return True
        return self.serve(time.ticks_add(time.ticks_ms(), ms))

    def once(self):
        """One connection: TLS and admission. Returns the engine's state (_ST_READY: the
        link is open in self.link), or -1 when the link or the admission failed."""
        cfg = self.cfg
        rma = self.rma
        rma.reset()
        self.counts[_LINKS] += 1
        import gc

        self.room = None  # the room held since the last link (reserve()), freed in one piece
        gc.collect()  # with the last link's garbage, so the handshake finds room in one piece
        try:
            link = self.net.admit(rma, cfg["sm_host"], cfg["sm_port"], self.cert, _read(cfg["key"]),
                                 _read(cfg["ca"]), cfg["timeout_s"], cfg["sm_name"], self.buf)
        except Exception as e:  # OSError, the TLS stack's errors, MemoryError: counted, retried
            self.counts[_CONNECT_ERRORS] += 1
            self.log("rmcp2: no link to %s:%d (%s)" % (cfg["sm_host"], cfg["sm_port"], type(e).__name__))
            return -1
        from tessera_fw.rmcp2.rma import STATE_NAMES

        st = rma.state
        self.counts[_ADMITTED if st == _ST_READY else _REFUSED if st == _ST_REFUSED else _POLICY_FAILED] += 1
        self.log("rmcp2: %s (result 0x%02x, SEC_RETURN 0x%02x) handshake %d ms, admission %d ms" % (
            STATE_NAMES[st], rma.result, rma.sec_return, link.handshake_ms, link.admit_ms))
        if st == _ST_READY:
            self.link = link
        else:
            link.close()
        return st

    def serve(self, until=None):
        """Keep the admitted link until it drops: HB every hb_ms (ticks_add/ticks_diff),
        each message from the SM to the engine, its answer sent. With `until` (a ticks_ms
        value) return True at that time if the link is still up; False when it dropped or
        the session was terminated (the link is then closed)."""
        link = self.link
        rma = self.rma
        c = self.counts
        hb = self.cfg["hb_ms"]
        due = time.ticks_add(time.ticks_ms(), hb)
        try:
            while True:
                if until is not None and time.ticks_diff(until, time.ticks_ms()) <= 0:
                    return True
                left = time.ticks_diff(due, time.ticks_ms())
                if left <= 0:
                    link.send(rma.hb())
                    c[_HB_SENT] += 1
                    due = time.ticks_add(due, hb)
                    if time.ticks_diff(due, time.ticks_ms()) <= 0:  # far behind: no burst of HBs
                        due = time.ticks_add(time.ticks_ms(), hb)
                    continue
                if until is not None:
                    left = max(0, min(left, time.ticks_diff(until, time.ticks_ms())))
                if not link.wait(left):
                    continue
                out = rma.receive(link.recv())
                c[_MSGS_IN] += 1
                if out is not None:
                    link.send(out)
                if rma.state != _ST_READY:  # TERMREQ answered
                    c[_TERMINATED] += 1
                    self.log("rmcp2: session terminated by the SM (0x%02x)" % rma.result)
                    break
        except Exception as e:  # the SM closed the link, restarted, or a read/write failed
            c[_DROPS] += 1
            self.log("rmcp2: link lost (%s)" % type(e).__name__)
        link.close()
        self.link = None
        return False

    def _log(self, s):
        # a log line never ends the RMA: on a heap this full the status line is left out
        # (a MemoryError here, inside an except clause, would otherwise escape run())
        try:
            st = self.status()
        except MemoryError:
            st = "no heap for the status line"
        try:
            print(s, "|", st)
        except MemoryError:
            pass

    def status(self):
        """One line: the counters, the engine's errors and the heap in use after a
        collection (for the log and `tessera board` sessions)."""
        import gc

        gc.collect()
        line = " ".join("%s=%d" % (n, v) for n, v in zip(COUNT_NAMES, self.counts))
        errors = sum(self.rma.errors)
        if self.tree is not None:
            line += " " + self.tree.status()
            errors += sum(self.tree.keys.errors)
        return line + " errors=%d heap=%d" % (errors, gc.mem_alloc())


def load(path=CONFIG):
    """rma_cfg.load(): the checked settings of rmcp2.json or None; the checking code is
    unloaded again (from .mpy; tessera_fw.acquire)."""
    import tessera_fw

    m, fresh = tessera_fw.acquire("tessera_fw.rmcp2.rma_cfg")
    try:
        return m.load(path)
    finally:
        m = None
        if fresh:
            tessera_fw.release("tessera_fw.rmcp2.rma_cfg")
            tessera_fw.release("tessera_fw.config")


def new_pool():
    """The RMA's large buffers in one piece (3560 B)."""
    return bytearray(_POOL)


def main(path=CONFIG, links=0):
    """Board entry (main.py): run the RMA configured in rmcp2.json (forever, or for
    `links` connection attempts). False when there is no rmcp2.json. The buffers are
    allocated first, while the heap is still in one piece: loading the modules leaves it
    in small fragments (docs/benchmarks.md)."""
    import gc

    pool = new_pool()
    room = bytearray(_TLS_ROOM)
    cfg = load(path)
    if cfg is None:
        return False
    r = Runner(cfg, pool=pool)
    room = None  # freed in one piece, for the TLS handshake
    gc.collect()
    try:
        r.run(links)
    except KeyboardInterrupt:  # a clean stop (board_tree has sent LEAVREQ if it was joined)
        r.log("rmcp2: stopped")
    return True
