#!/usr/bin/env python3
"""Run a secure RMCP-2 session on loopback: an SM with a closed group, a service user
identifier registered, an SMA, a DMA and a host RMA admitted, and the DMA's ACL printed.

    python examples/rmcp2_session.py --dir rmcp2-demo          # PKI, store and keys made there
    python examples/rmcp2_session.py --dir rmcp2-demo --ident viewer-7

Everything listens on free loopback ports. An RMA without the identifier is refused with
0x41 (SERV_USER_ID_MISSING). Exits 1 when a step does not come out as expected.
"""
from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from tessera import MaAgent, SessionManager, SmSettings, SubscriptionRefused, TesseraError, make_sm_pki


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="working directory (created): PKI, SM store and its key")
    ap.add_argument("--ident", default="viewer-1", help="the service user identifier to register")
    args = ap.parse_args()

    work = Path(args.dir)
    pki = work / "pki"
    if not (pki / "ca.pem").exists():
        make_sm_pki(pki, ["sm", "sma", "dma1", "rma1", "rma2"])
    session_id = secrets.randbits(63) | 1
    db = work / f"sm-{session_id:016x}.sqlite"
    # a short Security Agree.time: this session's SMA and DMA are up within a second
    with SessionManager.open(db, SmSettings(session_id, agree_time=1.0)) as sm:
        sm.add_service_user(args.ident)
        print(f"session {session_id:#018x}: store {db}, identifier {args.ident!r} registered")
        with sm.serve(pki) as ep:
            print(f"SM: TLS admission on {ep.address}, Ks link on port {ep.plain_port}")
            with MaAgent("sma", ep, session_id, pki, group="closed", instance=1) as sma, \
                    MaAgent("dma", ep, session_id, pki, "dma1", instance=2, hrs_refresh=1.0) as dma:
                sma.begin()  # both at once: the DMA's capabilities count in the agreement (10.1.4.1)
                dma.begin()
                for agent in (sma, dma):
                    a = agent.start()
                    print(f"{a.role.upper()} admitted: {a.result.name}, policy {a.policy_result.name}, "
                          f"Ks generation {a.ks_gen}")
                p = sm.status().policy
                print(f"policy: {p.group} group, content {p.content_alg}, messages {p.gk_alg} + {p.auth}")

                with MaAgent("rma", ep, session_id, pki, "rma1", instance=10, service_user_id=args.ident) as rma:
                    a = rma.start()
                    print(f"RMA rma1 admitted: {a.result.name}, policy {a.policy_result.name}")
                    entry = rma.acl_entry
                    with MaAgent("rma", ep, session_id, pki, "rma2", instance=11) as stranger:
                        try:
                            stranger.start()
                            print("RMA rma2 was admitted without an identifier: WRONG")
                            return 1
                        except SubscriptionRefused as e:
                            print(f"RMA rma2 refused: {e.code.name} ({int(e.code):#04x})")
                    st = dma.wait_for(lambda s: entry in s.acl, 20, "the RMA in the DMA's ACL")
                    print(f"DMA ACL ({len(st.acl)} entries, {st.acl_updates} HRSANS so far):")
                    for e in st.acl:
                        # the hashed K_TLS is the RMA's Annex E secret (profile B.11): never printed
                        print(f"  hashed MAID {e.hashed_maid.hex()}  hashed K_TLS (secret, not shown)"
                              + ("  <- rma1" if e == entry else ""))
                    print(f"the DMA admits rma1: {dma.acl_allows(entry)}")
        st = sm.status()
        print(f"store: {len(st.members)} members ({', '.join(sorted(m.role for m in st.members))}), "
              f"{len(st.acl)} ACL entries, Ks generation {st.ks_gen}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TesseraError as e:
        print(f"error: {e}")
        sys.exit(2)
