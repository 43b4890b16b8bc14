"""OMA BCAST SP-4 over DVB SimulCrypt (ETSI TS 103 197): the roles at the level a head-end
script or a test harness needs.

- servers, asyncio-native, `port = await x.start()` ... `await x.close()`:
  `StkmGenerator(store, {super_cas_id})` (ECMG role) and `Multiplexer(kbps)` (MUX);
- clients, one call each: `run_scs(...)` scrambles crypto-periods against STKM generators,
  `send_ltkms(...)` delivers LTKMs to a MUX (EMMG role);
- the key store: `open_key_store`, `add_key`, `list_keys` (material is never shown).

Layouts of STKM and LTKM are Tessera's own (docs/bcast-profile.md).
"""
from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from ssl import SSLContext

from tessera.errors import TesseraError
from tessera.simulcrypt.aio import Limits, tls_context
from tessera.simulcrypt.ecmg import StkmGenerator
from tessera.simulcrypt.engine import EcmgCaps
from tessera.simulcrypt.keystore import KeyStore
from tessera.simulcrypt.mux import Multiplexer
from tessera.simulcrypt.scs import CryptoPeriod
from tessera.simulcrypt.stkm import Protection
from tessera.simulcrypt.tables import ErrorInfo


class SimulcryptError(TesseraError):
    """A SimulCrypt role failed: a peer refused, did not answer, or the key store is wrong."""


@dataclass(frozen=True)
class KeyInfo:
    """A key of the store, without its material."""

    kind: str  # SEK, PEK, CWT, LTK
    owner: int  # Super_CAS_id (SEK/PEK/CWT) or client_id (LTK)
    scope: int  # ECM_id (SEK/PEK) or terminal group (LTK)
    key_id: int
    bits: int


@dataclass(frozen=True)
class Generator:
    """An STKM generator for `run_scs`: where it listens and the ids the SCS uses there."""

    host: str
    port: int
    super_cas_id: int
    ecm_id: int


@dataclass(frozen=True)
class LtkmReport:
    sent: int  # LTKMs
    bytes: int
    kbps: int  # bandwidth the MUX granted
    errors: int  # error messages the MUX sent back


def open_key_store(path: str | Path | None = None) -> KeyStore:
    """The key store (SQLite; default $TESSERA_VAR/simulcrypt-keys.sqlite), its material
    sealed under <path>.key or $TESSERA_SIMULCRYPT_STORE_KEY. Close it with `.close()`."""
    from tessera.paths import var_dir
    from tessera.simulcrypt.keystore import KeyStoreError

    p = Path(path) if path else var_dir() / "simulcrypt-keys.sqlite"
    try:
        return KeyStore(p)
    except (sqlite3.Error, KeyStoreError, OSError) as e:
        raise SimulcryptError(f"cannot open the key store {p}: {e}") from None


def add_key(store: KeyStore, kind: str, owner: int, scope: int = 0, size: int = 16) -> KeyInfo:
    """Add a random key: SEK/PEK/CWT owned by a Super_CAS_id (DRM 0x0001xxxx or Smartcard
    0x0002xxxx profile), LTK by a DRM client_id."""
    from tessera.simulcrypt.tables import PROFILE_DRM, PROFILE_SMARTCARD, profile_of

    allowed = (PROFILE_DRM,) if kind == "LTK" else (PROFILE_DRM, PROFILE_SMARTCARD)
    if profile_of(owner) not in allowed:
        raise SimulcryptError(f"owner 0x{owner:08x} is not a {'DRM' if kind == 'LTK' else 'DRM or Smartcard'}"
                              " profile id (0x0001xxxx" + ("" if kind == "LTK" else " / 0x0002xxxx") + ")")
    try:
        k = store.add(kind, owner, scope, size=size)
    except ValueError as e:
        raise SimulcryptError(str(e)) from None
    return KeyInfo(k.kind, k.owner, k.scope, k.key_id, 8 * size)


def list_keys(store: KeyStore) -> list[KeyInfo]:
    return [KeyInfo(kind, owner, scope, key_id, bits) for kind, owner, scope, key_id, bits in store.list()]


async def run_scs(service: str, generators: list[Generator], periods: int = 5, *, cp_duration: int = 10,
                  protection: Protection | str = Protection.SRTP, first_channel_id: int = 1,
                  on_period: Callable[[CryptoPeriod], None] | None = None,
                  ssl: SSLContext | None = None) -> list[CryptoPeriod]:
    """Scramble `periods` crypto-periods of `service` (each `cp_duration` x 100 ms) against
    the STKM generators: connect, set up one channel and stream per generator, provision a
    fresh TEK per period and collect the STKMs. `on_period` sees each period as it ends;
    a period's `missing` names generators whose STKM did not come."""
    from tessera.simulcrypt.scs import GeneratorSpec, Scs, ScsError

    prot = Protection[protection.upper()] if isinstance(protection, str) else protection
    specs = [GeneratorSpec(g.host, g.port, g.super_cas_id, first_channel_id + i, 1, g.ecm_id)
             for i, g in enumerate(generators)]
    try:
        scs = Scs(service, specs, cp_duration=cp_duration, protection=prot, sink=on_period, ssl=ssl)
    except ValueError as e:
        raise SimulcryptError(str(e)) from None
    try:
        await scs.start()
        return await scs.run(periods)
    except (ScsError, OSError) as e:
        raise SimulcryptError(str(e)) from None
    finally:
        await scs.close()


async def send_ltkms(mux_host: str, mux_port: int, store: KeyStore, client_id: int, key_owner: int, key_scope: int,
                     *, count: int = 10, group: int = 1, data_id: int = 1, channel_id: int = 1, kbps: int = 16,
                     udp_port: int | None = None, ssl: SSLContext | None = None) -> LtkmReport:
    """Deliver the current service key (key_owner, key_scope) to terminal `group` in `count`
    LTKMs through the MUX (EMMG role, DRM profile): channel and stream set-up, bandwidth
    request, data_provision over TCP (or UDP to `udp_port`), paced to the granted rate."""
    from tessera.simulcrypt.emmg import EmmgError, LtkmGenerator, make_ltkms

    try:
        g = LtkmGenerator(client_id, channel_id, 1, data_id, ssl=ssl)
    except ValueError as e:
        raise SimulcryptError(str(e)) from None
    try:
        await g.connect(mux_host, mux_port)
        granted = await g.request_bandwidth(kbps)
        ltkms = make_ltkms(store, client_id, data_id, group, key_owner, key_scope, count)
        if udp_port:
            await g.open_udp(mux_host, udp_port)
        await g.send(ltkms, via="udp" if udp_port else "tcp")
        errors = await g.sync()  # the MUX's answers to everything sent are in before counting
        return LtkmReport(len(ltkms), g.sent_bytes, granted, errors)
    except (EmmgError, OSError, asyncio.TimeoutError) as e:
        raise SimulcryptError(f"LTKM generator: {e or type(e).__name__}") from None
    finally:
        await g.close()


__all__ = ["CryptoPeriod", "EcmgCaps", "ErrorInfo", "Generator", "KeyInfo", "KeyStore", "Limits", "LtkmReport",
           "Multiplexer", "Protection", "SimulcryptError", "StkmGenerator", "add_key", "list_keys", "open_key_store",
           "run_scs", "send_ltkms", "tls_context"]
