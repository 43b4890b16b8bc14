# rmcp2.json of the board RMA (board.py): read and checked once at start-up, then unloaded
# (tessera_fw.release) so that its code does not hold heap while the RMA runs.
from micropython import const

CONFIG = "rmcp2.json"
_MAX_S = const(3600)
_MAX_DMAS = const(8)  # candidate parent DMAs (bounded: the list lives for the board's life)


def _num(cfg, key, default, lo, hi):
    v = cfg.get(key, default)
    if not isinstance(v, (int, float)) or v < lo or v > hi:
        raise ValueError("%s: %s must be a number in %s..%s" % (CONFIG, key, lo, hi))
    return v


def _hex8(cfg, key):
    v = cfg.get(key)
    try:
        b = bytes.fromhex(v)
    except (TypeError, ValueError):
        b = b""
    if len(b) != 8:
        raise ValueError("%s: %s must be 16 hex digits" % (CONFIG, key))
    return b


def _ip4(cfg, key, default=None):
    """A dotted IPv4 address of `cfg` as 4 bytes (ValueError naming the key)."""
    v = cfg.get(key, default)
    parts = v.split(".") if isinstance(v, str) else ()
    b = bytearray()
    for x in parts:
        if x.isdigit() and len(x) <= 3 and int(x) <= 255:
            b.append(int(x))
    if len(parts) != 4 or len(b) != 4:
        raise ValueError("%s: content %s must be an IPv4 address A.B.C.D" % (CONFIG, key))
    return b


def load(path=CONFIG):
    """The validated settings of `path` (a dict; times in ms), or None without the file.
    A bad value raises ValueError naming the key (never a key file's contents)."""
    from tessera_fw import config

    cfg = config.load(path)
    if cfg is None:
        return None
    host = cfg.get("sm_host")
    if not isinstance(host, str) or not host:
        raise ValueError(CONFIG + ": needs \"sm_host\"")
    out = {"sm_host": host, "sm_port": int(_num(cfg, "sm_port", 26030, 1, 65535)),
           "session_id": _hex8(cfg, "session_id"), "maid": _hex8(cfg, "maid"),
           "hb_ms": int(1000 * _num(cfg, "hb_s", 30, 0.05, _MAX_S)),
           "timeout_s": _num(cfg, "timeout_s", 15, 1, 600)}
    for k, d in (("cert", "rma.der"), ("key", "rma.key.der"), ("ca", "ca.der"), ("sm_name", "sm")):
        v = cfg.get(k, d)
        if not isinstance(v, str) or not v:
            raise ValueError("%s: %s must be a file name" % (CONFIG, k))
        out[k] = v
    sui = cfg.get("service_user_id")
    if sui is not None and (not isinstance(sui, str) or not sui or len(sui) > 253):
        raise ValueError(CONFIG + ": service_user_id must be 1-253 characters")
    out["sui"] = sui.encode() if sui else None
    b = cfg.get("backoff_s", (1, 60))
    if not isinstance(b, (list, tuple)) or len(b) != 2:
        raise ValueError(CONFIG + ": backoff_s must be [first, most]")
    lo = _num({"b": b[0]}, "b", 1, 0.05, _MAX_S)
    hi = _num({"b": b[1]}, "b", 60, lo, _MAX_S)
    out["backoff_ms"] = (int(1000 * lo), int(1000 * hi))
    # content reception (board_tree.py): the ports the board binds after each join, 0 = one
    # the board picks (no getsockname on MicroPython), null = not over that transport;
    # "content": null = the board takes no content. Omitted: both 0.
    c = cfg.get("content", {})
    if c is None:
        out["content"] = None
        out["mcast"] = None
    elif not isinstance(c, dict):
        raise ValueError(CONFIG + ": content must be {\"udp\": port, \"tcp\": port} or null")
    else:
        # "mcast": "A.B.C.D" (B.17 multicast-enabled group): the board also joins that group
        # on "mcast_port" (B.10's content port) through the interface "mcast_if" (its own
        # address; 0.0.0.0: the system's choice), and announces no UDP port unless "udp" is
        # given: the relay then sends streams only to the group
        mc = c.get("mcast")
        out["mcast"] = None
        if mc is not None:
            g = _ip4(c, "mcast")
            if g[0] & 0xF0 != 0xE0:
                raise ValueError(CONFIG + ": content mcast must be an IPv4 multicast address (224.0.0.0/4)")
            out["mcast"] = (g, int(_num(c, "mcast_port", 26033, 1, 65535)), _ip4(c, "mcast_if", "0.0.0.0"))
        ports = []
        for k in ("udp", "tcp"):
            v = c.get(k, None if (mc is not None and k == "udp") else 0)
            ports.append(None if v is None else int(_num(c, k, 0, 0, 65535)))
        out["content"] = tuple(ports)
    # the candidate parent DMAs in order of preference (B.15 re-graft): "dmas": [[host, port,
    # maid-hex], ...]; the older "dma": [host, port] with "dma_maid" is a list of one. With
    # them the board joins the first after admission (board.py "tree"); without them it is
    # an RMA of the SM only
    dmas = cfg.get("dmas")
    dma = cfg.get("dma")
    if dmas is None and dma is None:
        out["dmas"] = ()
        out["dma"] = None
        return out
    if dmas is None:
        if not isinstance(dma, (list, tuple)) or len(dma) != 2:
            raise ValueError(CONFIG + ": dma must be [host, port]")
        dmas = [[dma[0], dma[1], cfg.get("dma_maid")]]
        what = "dma"
    else:
        what = "dmas"
        if not isinstance(dmas, (list, tuple)) or not 1 <= len(dmas) <= _MAX_DMAS:
            raise ValueError("%s: dmas must be a list of 1..%d [host, port, maid-hex]" % (CONFIG, _MAX_DMAS))
    cands = []
    for d in dmas:
        if not isinstance(d, (list, tuple)) or len(d) != 3 or not isinstance(d[0], str) or not d[0]:
            raise ValueError(CONFIG + ": %s entries must be [host, port, maid-hex]" % what)
        port = int(_num({what: d[1]}, what, 0, 1, 65535))
        cands.append((d[0], port, _hex8({what + "_maid" if what == "dma" else what: d[2]},
                                        what + "_maid" if what == "dma" else what)))
    out["dmas"] = tuple(cands)
    out["dma"] = cands[0][:2]  # the first candidate, as before (board.py, tests)
    out["dma_maid"] = cands[0][2]
    return out
