"""Shared fixtures: one D-cinema PKI per session, responders on their own event loop thread."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tessera.asm.responder import Responder, ResponderConfig
from tessera.asm.tls import Credentials
from tessera.pki import certs


@dataclass
class PKI:
    dir: Path
    paths: dict
    chain: certs.Chain

    def creds(self, name: str) -> Credentials:
        return Credentials(self.paths[name], self.paths[name + ".key"], self.paths["root"])


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ch = certs.create_chain("Tessera", [("SM", "initiator"), ("LD", "responder"), ("SM", "other")])
    paths = certs.write_chain(ch, d)
    # Trusted by OpenSSL (signed by our intermediate) but outside the 430-2 profile.
    bad = certs.issue("SM.badqualifier", org="Tessera", ca=False, parent=ch.intermediate, dnq_override="AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    for name, leaf in (("badqualifier", bad),):
        (d / f"{name}.pem").write_bytes(leaf.cert_pem() + ch.intermediate.cert_pem())
        (d / f"{name}.key").write_bytes(leaf.key_pem())
        paths[name], paths[name + ".key"] = d / f"{name}.pem", d / f"{name}.key"
    # A complete, profile-conformant chain from a root nobody trusts.
    rogue = certs.create_chain("Rogue", [("SM", "rogue"), ("LD", "rogueresp")])
    rp = certs.write_chain(rogue, d / "rogue")
    for n in ("rogue", "rogueresp"):
        paths[n], paths[n + ".key"] = rp[n], rp[n + ".key"]
    return PKI(d, paths, ch)


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.t = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.t.start()

    def run(self, coro, timeout: float = 20.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.t.join(5)
        self.loop.close()


@dataclass
class Running:
    responder: Responder
    port: int
    lt: LoopThread

    def call(self, fn, *a):
        async def _c():
            return fn(*a)
        return self.lt.run(_c())


@pytest.fixture
def start_responder(pki, tmp_path):
    started: list[Running] = []
    lt = LoopThread()

    def _start(name: str = "responder", **kw) -> Running:
        cfg = ResponderConfig(pki.creds(name), tmp_path / f"resp{len(started)}.db", port=0, **kw)

        async def mk():
            r = Responder(cfg)
            return r, await r.start()

        r, port = lt.run(mk())
        run = Running(r, port, lt)
        started.append(run)
        return run

    yield _start
    for run in started:
        lt.run(run.responder.stop())
    lt.stop()


@pytest.fixture
def responder(start_responder) -> Running:
    return start_responder(request_timeout=0.5, handshake_timeout=0.8)
