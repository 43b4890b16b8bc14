"""Demo scenario: an ASM responder and initiator on loopback with a PKI made on the spot."""
from __future__ import annotations

import asyncio
import secrets
import time

from tessera.asm.codec import LEKey, SPBStatus
from tessera.asm.initiator import Initiator, LogCollector
from tessera.asm.net import PeerRejected
from tessera.asm.responder import Responder, ResponderConfig
from tessera.asm.tls import Credentials, TLSProfileError
from tessera.demo import DemoContext
from tessera.pki import certs

TITLE = "ASM (SMPTE 430-6): TLS 1.0 profile, LE keys, clock offset, security log, rogue certificates, roles"
ORDER = 30
SKEW = 7.0  # simulated: the responder's clock runs this many seconds ahead


def run(ctx: DemoContext) -> None:
    asyncio.run(asyncio.wait_for(_run(ctx), 120))


async def _run(ctx: DemoContext) -> None:
    base = ctx.workdir / "asm"
    ctx.step("creating a SMPTE 430-2 style PKI: root, intermediate, SM.initiator, LD.responder")
    chain = certs.create_chain("TesseraDemo", [("SM", "initiator"), ("LD", "responder")])
    paths = certs.write_chain(chain, base / "pki")
    for name in ("initiator", "responder"):
        v = certs.validate_chain(certs.load_pems(paths[name], paths["root"]))
        if v:
            raise RuntimeError(f"fresh {name} chain fails the profile: {v}")
    rogue = certs.create_chain("Rogue", [("SM", "mallory")])
    rp = certs.write_chain(rogue, base / "rogue")
    forged = certs.issue("SM.forged", org="TesseraDemo", ca=False, parent=chain.intermediate,
                         dnq_override="AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    (base / "pki" / "forged.pem").write_bytes(forged.cert_pem() + chain.intermediate.cert_pem())
    (base / "pki" / "forged.key").write_bytes(forged.key_pem())

    def creds(name: str, d=base / "pki", trust=paths["root"]) -> Credentials:
        return Credentials(d / f"{name}.pem", d / f"{name}.key", trust)

    resp = Responder(ResponderConfig(creds("responder"), base / "responder.db", port=0,
                                     clock=lambda: time.time() + SKEW))
    port = await resp.start()
    try:
        ctx.step(f"responder on 127.0.0.1:{port} (TLS 1.0, AES128-SHA, 512-byte records, mutual auth)")
        async with Initiator("127.0.0.1", port, creds=creds("initiator")) as ini:
            obj = ini._stream.chan.obj if ini._stream else None
            if obj is None or obj.version() != "TLSv1" or obj.cipher()[0] != "AES128-SHA":
                raise RuntimeError("session outside the ASM TLS profile")
            ctx.fact(f"session: {obj.version()} {obj.cipher()[0]} (TLS_RSA_WITH_AES_128_CBC_SHA), "
                     f"initiator and responder chains both passed the 430-2 check")
            off = await ini.clock_offset()
            ctx.fact(f"clock offset of the responder: {off.offset:+.1f} s (+/- {off.uncertainty:.1f} s; {SKEW:+.0f} s simulated)")
            keys = [LEKey(4000 + i, secrets.token_bytes(16), 600, int.from_bytes(secrets.token_bytes(8), "big"))
                    for i in range(16)]
            t0 = time.perf_counter()
            r = await ini.le_key_load(keys)
            dt_ms = (time.perf_counter() - t0) * 1000
            if r.response != 0 or r.overflow:
                raise RuntimeError(f"LEKeyLoad failed: {r}")
            over = await ini.le_key_load([LEKey(9999, secrets.token_bytes(16), 600, 1)])
            if not over.overflow:
                raise RuntimeError("17th key was accepted; overflow expected")
            ctx.fact(f"16 LE keys loaded in {dt_ms:.1f} ms; a 17th refused with overflow={over.overflow}")
            q = await ini.le_key_query_id(4003)
            allk = await ini.le_key_query_all()
            p = await ini.le_key_purge_id(4003)
            q2 = await ini.le_key_query_id(4003)
            if not (q.present and not q2.present and len(allk.key_ids) == 16 and p.no_key_id == 0):
                raise RuntimeError("query/purge results are wrong")
            pa = await ini.le_key_purge_all()
            left = await ini.le_key_query_all()
            if pa.response or left.key_ids:
                raise RuntimeError("purge all left keys behind")
            ctx.fact("key 4003 queried present, purged, queried absent; purge-all left 0 keys")
            s1 = (await ini.query_spb()).status
            resp.set_status(SPBStatus.SECURITY_ALERT, "demo: enclosure opened")
            s2 = (await ini.query_spb()).status
            ctx.fact(f"QuerySPB: {SPBStatus(s1).name} -> {SPBStatus(s2).name} after the alert was raised")

            ctx.step("extending the chain: issuing SM.backup under the kept intermediate key")
            backup, _ = certs.issue_leaf(base / "pki", "SM", "backup")
            if certs.validate_chain(certs.load_pems(base / "pki" / "backup.pem", paths["root"])):
                raise RuntimeError("the issued leaf fails the 430-2 profile")
            async with Initiator("127.0.0.1", port, creds=creds("backup")) as ini2:
                if (await ini2.get_time()).response != 0:
                    raise RuntimeError("the issued leaf could not talk to the responder")
            ctx.fact(f"SM.backup (thumbprint {certs.thumbprint(backup.cert)}) passes the 430-2 check "
                     f"and ran a GetTime session")

            ctx.step("rogue initiators: a foreign root, a forged dnQualifier under our own intermediate, "
                     "and a valid LD leaf posing as a Security Manager (role check)")
            refused = []
            for label, c in (("foreign root", Credentials(rp["mallory"], rp["mallory.key"], paths["root"])),
                             ("forged dnQualifier", creds("forged")),
                             ("LD role as initiator", creds("responder"))):
                try:
                    async with Initiator("127.0.0.1", port, creds=c, connect_timeout=3) as bad:
                        await bad.get_time()
                except (TLSProfileError, ConnectionError, PeerRejected, Exception) as exc:
                    refused.append(f"{label}: {type(exc).__name__}")
                else:
                    raise RuntimeError(f"rogue certificate ({label}) was accepted")
            await asyncio.sleep(1.1)  # collection windows end one second before the responder's now
            col = LogCollector(base / "initiator.db", f"127.0.0.1:{port}")
            try:
                res = await col.collect(ini)
                await asyncio.sleep(1.1)
                res2 = await col.collect(ini)
                recs = col.records()
                col_timed = col.timed_records()
            finally:
                col.close()
            if res2.window and res.window and res2.window[0] != res.window[1] + 1:
                raise RuntimeError("collection windows have a gap")
            cert_refusals = sum(1 for _, x in recs if b"<Name>CertificateRefused</Name>" in x or b"<Name>TLS</Name>" in x
                                or b"<Name>RoleRefused</Name>" in x)
            if not any(b"<Name>RoleRefused</Name>" in x for _, x in recs):
                raise RuntimeError("the LD leaf posing as an initiator was not logged as RoleRefused")
            ctx.fact(f"rogue certificates refused ({'; '.join(refused)}); responder logged {cert_refusals} link exceptions")
            ctx.fact(f"security log collected: {len(recs)} XML records over windows {res.window} and "
                     f"{res2.window} (book-ended, no gap)")
            timed = col_timed
            if not timed or any(t.ts_raw is None or t.ts_corrected is None for t in timed):
                raise RuntimeError("collected records lack raw/corrected times")
            worst = max(abs(t.ts_raw - t.ts_corrected - SKEW) for t in timed)
            ctx.fact(f"collected records stored with raw and clock-corrected times "
                     f"(offset {res.clock_offset.offset:+.1f} s removed; within {worst:.1f} s of the simulated skew)")
    finally:
        await resp.stop()
