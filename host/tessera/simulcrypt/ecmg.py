"""STKM generator: the ECMG role of TS 103 197 clause 5 as a TCP server (BCAST SP-4
14.1.1.3.1). Builds binary STKMs (stkm.py) from the TEKs in CW_provision with the
service / program key of the stream's ECM_id (stkmstream) from the key store."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from tessera.simulcrypt import stkm
from tessera.simulcrypt.aio import close_writer, flush, read_loop
from tessera.simulcrypt.engine import (
    CloseConnection, CwProvision, EcmgCaps, EcmgConnection, EcmgCore, Event, PeerError, UserMessage,
)
from tessera.simulcrypt.keystore import KeyStore
from tessera.simulcrypt.tables import EE, profile_of

log = logging.getLogger("tessera.simulcrypt.ecmg")

# Bench only: a user-defined message type (0x8000-0xFFFF, TS 103 197) the generator echoes
# unchanged when echo is enabled, as the bare-TLV baseline of bench_simulcrypt.py.
ECHO_TYPE = 0x8F01


@dataclass
class GeneratorStats:
    stkms: int = 0
    errors: int = 0
    reads: int = 0      # socket reads handled (for messages-per-read figures)
    messages: int = 0   # CW_provision + echo messages handled
    comp_times: list[float] = field(default_factory=list)  # seconds, CW_provision -> STKM built


class StkmGenerator:
    def __init__(self, keystore: KeyStore, super_cas_ids: set[int], caps: EcmgCaps | None = None, *,
                 host: str = "127.0.0.1", port: int = 0, echo: bool = False, max_channels: int = 64) -> None:
        self.keystore = keystore
        self.core = EcmgCore(super_cas_ids, caps, max_channels=max_channels,
                             ecm_id_known=lambda scid, ecm_id: keystore.traffic_key(scid, ecm_id) is not None)
        self.host, self.port = host, port
        self.user_types = frozenset({ECHO_TYPE}) if echo else frozenset()
        self.stats = GeneratorStats()
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    @property
    def caps(self) -> EcmgCaps:
        return self.core.caps

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("STKM generator listening on %s:%d for Super_CAS_id %s", self.host, self.port,
                 ", ".join(f"0x{s:08x}" for s in sorted(self.core.super_cas_ids)))
        return self.port

    async def close(self) -> None:
        if self._server:
            self._server.close()
        for w in list(self._conns):
            await close_writer(w)
        if self._server:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = EcmgConnection(self.core, self.user_types)
        self._conns.add(writer)
        peer = writer.get_extra_info("peername")

        def on_events(events: list[Event]) -> bool:
            stop = False
            self.stats.reads += 1
            for ev in events:
                if isinstance(ev, CwProvision):
                    self.stats.messages += 1
                    self._provision(conn, ev)
                elif isinstance(ev, UserMessage):
                    self.stats.messages += 1
                    conn.send(ev.msg.type, list(ev.msg.params))  # bench echo
                elif isinstance(ev, CloseConnection):
                    stop = True
                elif isinstance(ev, PeerError):
                    self.stats.errors += 1
            return stop

        try:
            await read_loop(conn, reader, writer, on_events)
        except (ConnectionError, OSError) as exc:
            log.warning("SCS %s lost: %s", peer, exc)
        finally:
            # the peer may vanish mid-crypto-period: free its ids, other channels go on
            conn.close("transport closed")
            self._conns.discard(writer)
            await close_writer(writer)

    def _provision(self, conn: EcmgConnection, ev: CwProvision) -> None:
        t0 = time.perf_counter()
        scid = conn.super_cas_id or 0
        try:
            datagram = self.build_stkm(scid, ev)
        except stkm.StkmError as exc:
            self.stats.errors += 1
            conn.send_stream_error(ev.stream_id, EE.INVALID_VALUE, str(exc).encode())
            return
        except LookupError as exc:
            self.stats.errors += 1
            conn.send_stream_error(ev.stream_id, EE.UNKNOWN_ECM_ID, str(exc).encode())
            return
        conn.ecm_response(ev.stream_id, ev.cp_number, datagram)
        self.stats.stkms += 1
        self.stats.comp_times.append(time.perf_counter() - t0)

    def build_stkm(self, scid: int, ev: CwProvision) -> bytes:
        key = self.keystore.traffic_key(scid, ev.ecm_id)
        if key is None:
            raise LookupError(f"no service or program key for ECM_id {ev.ecm_id}")
        cws = [cw for _, cw in ev.cws]
        if ev.cw_encryption is not None:
            key_id, counter = stkm.parse_cw_encryption(ev.cw_encryption)
            cwt = self.keystore.get("CWT", scid, key_id)
            if cwt is None:
                raise stkm.StkmError(f"unknown CW transport key id {key_id}")
            cws = stkm.crypt_cws(cwt.material, counter, cws)
        if ev.access_criteria is None:
            raise stkm.StkmError("no access_criteria received for this stream (protection type unknown)")
        ac = stkm.AccessCriteria.decode(ev.access_criteria)
        record = stkm.Stkm(profile=profile_of(scid), super_cas_id=scid, ecm_id=ev.ecm_id, cp_number=ev.cp_number,
                           key_kind=stkm.KeyKind.PEK if key.kind == "PEK" else stkm.KeyKind.SEK, key_id=key.key_id,
                           protection=ac.protection, traffic_params=ac.traffic_params, access_rule=ac.access_rule,
                           teks=[(cp, cw) for (cp, _), cw in zip(ev.cws, cws)])
        return stkm.build(record, key.material)


__all__ = ["ECHO_TYPE", "StkmGenerator", "flush"]
