"""Operator requests to a serving session manager (docs/rmcp2.md, "Operator requests";
defined by this project): a fresh Ks (figure 93, "something abnormal") and the truncation of
an SMA/DMA (10.1.2.1), asked for by another process through the store.

The requester writes a row (`SmStore.add_request`); the serving SM calls `handle()` on each
tick, acts through the engine (`SessionManager.rekey` / `truncate`, which journal the new Ks
before any message under it leaves) and writes the result back. Neither the request nor the
result holds key material: a rekey needs none, and the result says only the generation and
how many SMA/DMAs were sent the key. The store bounds the waiting rows (MAX_REQUESTS).
"""
from __future__ import annotations

import logging

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import sm as S

log = logging.getLogger("tessera.rmcp2.operator")


def _target(sm: S.SessionManager, arg: dict) -> bytes:
    """The SMA/DMA named by MAID (hex) or by the SHA-256 of its certificate (hex)."""
    if "maid" in arg:
        maid = bytes.fromhex(arg["maid"])
        if maid not in sm.members:
            raise ValueError(f"no member with MAID {maid.hex()} in the session")
        return maid
    h = bytes.fromhex(arg.get("cert_sha256", ""))
    found = [m.maid for m in sm.members.values() if m.cert_sha256 == h and m.nt != C.NodeType.RMA]
    if not found:
        raise ValueError("no SMA/DMA with that certificate in the session")
    return found[0]


def _sent(actions: list) -> int:
    """How many links a KEYDELIVER went out on."""
    return len({a.conn for a in actions if isinstance(a, S.Send)})


def handle(sm: S.SessionManager, store, now: float) -> list:
    """Carry out every pending request; return the engine's actions for the adapter."""
    out: list = []
    for rid, op, arg in store.pending_requests():
        try:
            if op == "rekey":
                acts = sm.rekey(now, "operator request")
                res = {"ks_gen": sm.ks.gen, "delivered": _sent(acts)}
            elif op == "truncate":
                maid = _target(sm, arg)
                nt = sm.members[maid].nt
                if nt == C.NodeType.RMA:
                    raise ValueError(f"{maid.hex()} is an RMA: only an SMA or a DMA is truncated (10.1.2.1)")
                gone = sm.members[maid].link  # its LEAVREQ is not a delivery of the new Ks
                acts = sm.truncate(maid, now)
                res = {"maid": maid.hex(), "role": nt.name, "ks_gen": sm.ks.gen,
                       "delivered": _sent([a for a in acts if a.conn != gone])}
            else:
                raise ValueError(f"unknown operator request {op!r}")
        except (ValueError, TypeError, KeyError) as e:  # e.g. no such member, a MAID that is not hex
            log.warning("rmcp2 sm: operator request %d (%s) refused: %s", rid, op, e)
            store.finish_request(rid, False, {"error": str(e)})
            continue
        log.info("rmcp2 sm: operator request %d (%s) done: %s", rid, op, res)
        store.finish_request(rid, True, res)
        out += acts
    return out
