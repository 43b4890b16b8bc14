import os

import pytest

from tessera.boards import ops, profile
from tessera.boards.virtual import VirtualBoard


@pytest.fixture(scope="session")
def tessera_var(tmp_path_factory):
    """A private TESSERA_VAR for the whole run, so tests never touch ./var."""
    d = tmp_path_factory.mktemp("var")
    old = os.environ.get("TESSERA_VAR")
    os.environ["TESSERA_VAR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("TESSERA_VAR", None)
    else:
        os.environ["TESSERA_VAR"] = old


@pytest.fixture(scope="session")
def deployed_boards(tessera_var):
    """One running virtual board per profile with the firmware deployed: {name: Target}."""
    targets = {}
    started = []
    try:
        for prof in profile.load_all():
            vb = VirtualBoard(f"test-{prof.name}", prof.name)
            port = vb.start(fresh=True)
            started.append(vb)
            t = ops.Target(prof, port, virtual=True)
            ops.deploy(t)
            targets[prof.name] = t
        yield targets
    finally:
        for vb in started:
            vb.stop()


@pytest.fixture
def virtual_board(tessera_var):
    """Factory for virtual boards stopped after the test:
    virtual_board(name, board, speed="fast", main=False) -> ops.Target (with .vboard).
    The firmware is deployed at this machine's speed (a deploy at board speed takes ~25 s
    on an rp2040, docs/boards.md); the board then runs at `speed` ("board": throttled to the
    real board's speed, tessera.boards.throttle)."""
    started = []

    def start(name: str, board: str, speed: str = "fast", main: bool = False) -> ops.Target:
        vb = VirtualBoard(name, board)
        started.append(vb)
        t = ops.Target(profile.load(board), vb.start(fresh=True), virtual=True, vboard=vb)
        ops.deploy(t, with_main=main)
        if speed != "fast":
            vb.set_speed(speed)
        return t

    yield start
    for vb in started:
        vb.stop()
