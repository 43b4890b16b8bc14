# rmcp2.json of the board RMA (board.py): read and checked once at start-up, then unloaded
# (tessera_fw.release) so that its code does not hold heap while the RMA runs.
from micropython import const

CONFIG = "rmcp2.json"
_MAX_S = const(3600)


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
    # the parent DMA's tree-control address (B.10, 26032) and MAID: with them the board joins
    # it after admission (board.py "tree"); without them it is an RMA of the SM only
    dma = cfg.get("dma")
    if dma is None:
        out["dma"] = None
        return out
    if not isinstance(dma, (list, tuple)) or len(dma) != 2 or not isinstance(dma[0], str) or not dma[0]:
        raise ValueError(CONFIG + ": dma must be [host, port]")
    out["dma"] = (dma[0], int(_num({"dma": dma[1]}, "dma", 0, 1, 65535)))
    out["dma_maid"] = _hex8(cfg, "dma_maid")
    return out
