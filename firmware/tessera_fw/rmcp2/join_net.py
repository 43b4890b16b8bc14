# Blocking stream adapter of the board's join client (join.py, sans-IO): drives a Join over a
# socket or a TLS socket until it is joined or refused. Kept apart so that join.py compiles in
# less heap; boards load it only to join (docs/rmcp2.md "Part 2: tree join").
from tessera_fw.rmcp2.join import ST_JOINED, ST_REFUSED
from tessera_fw.rmcp2.msg import read_frame


def run(j, s, buf=None):
    """Blocking adapter: drive `j` over stream `s` (a socket or TLS socket with write and
    readinto, its timeout set by the caller: T_ANNEXE on the board's side) until it is joined
    or refused. Messages are framed by their header Length (A.4); `buf` is the receive buffer
    (at least 1080 bytes, made here if not given). Returns j.state."""
    if buf is None:
        buf = bytearray(1080)
    mv = memoryview(buf)
    s.write(j.start())
    while j.state != ST_JOINED and j.state != ST_REFUSED:
        out = j.receive(read_frame(s, mv))
        if out is not None:
            s.write(out)
    return j.state
