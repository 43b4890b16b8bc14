import pytest

from tessera.scpm.ksn import KsnEngine
from tessera.scpm.sim import Clock, DetRng, Fleet
from tessera.scpm.store import Store

SKEY = bytes(range(32))


def setup_key(addr: int) -> bytes:
    return DetRng(f"setup:{addr}")(16)


class World:
    """A KSN engine on a SQLite store in tmp_path and firmware device engines (mpshim)."""

    def __init__(self, tmp_path, label="w"):
        self.tmp = tmp_path
        self.clock = Clock()
        self.label = label
        self.restarts = 0
        self.engine = self._engine()
        self.fleet = Fleet(self.engine, self.clock)

    def _engine(self):
        self.store = Store(self.tmp / "ksn.sqlite", storage_key=SKEY, durable=False)
        return KsnEngine(self.store, rng=DetRng(f"ksn:{self.label}:{self.restarts}"), clock=self.clock, timeout=1.0, retries=3)

    def restart_ksn(self):
        """The KSN process dies (in-memory state lost) and restarts from SQLite."""
        self.store.close()
        self.restarts += 1
        self.engine = self._engine()
        self.fleet.engine = self.engine

    def add(self, addr):
        return self.fleet.add(addr, setup_key(addr), rand=DetRng(f"dev:{self.label}:{addr}"))

    def run(self, started):
        return self.fleet.run(started)

    def enrolled(self, addr):
        dev = self.add(addr)
        t = self.run(self.engine.enrol(addr, setup_key(addr)))
        assert t.status == "done", t.error
        return dev


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)
