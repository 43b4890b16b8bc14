# Blocking stream adapter of the board's join client (join.py, sans-IO): drives a Join over a
# socket or a TLS socket until it is joined or refused, and reads the messages of the DMA's
# control link after it (board_tree.py). Kept apart so that join.py compiles in less heap;
# it does not import join.py, so that the board can release join.py after a join while
# keeping this module (docs/rmcp2.md "Part 2: tree join", "Board tree client").
from micropython import const

_ST_JOINED = const(4)  # join.ST_JOINED
_ST_REFUSED = const(5)  # join.ST_REFUSED


def run(j, s, buf=None):
    """Blocking adapter: drive `j` over stream `s` (a socket or TLS socket with write and
    readinto, its timeout set by the caller: T_ANNEXE on the board's side) until it is joined
    or refused. Messages are framed by their header Length (A.4); `buf` is the receive buffer
    (at least 1080 bytes, made here if not given). Returns j.state."""
    if buf is None:
        buf = bytearray(1080)
    mv = memoryview(buf)
    s.write(j.start())
    while j.state != _ST_JOINED and j.state != _ST_REFUSED:
        out = j.receive(read_frame(s, mv))
        if out is not None:
            s.write(out)
    return j.state


def read_frame(s, mv):
    """One message from stream `s` framed by its header Length (A.4), into memoryview `mv`;
    returns mv[:Length]. OSError when the peer closes, or the Length is below 20 or beyond mv."""
    _fill(s, mv, 0, 4)
    n = (mv[2] << 8) | mv[3]
    if n < 20 or n > len(mv):
        raise OSError("frame length %d" % n)
    _fill(s, mv, 4, n)
    return mv[:n]


def _fill(s, mv, a, b):
    while a < b:
        k = s.readinto(mv[a:b])
        if not k:
            raise OSError("the DMA closed the link")
        a += k
