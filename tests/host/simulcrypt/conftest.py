import asyncio
import os
import shutil

import pytest

from tessera.simulcrypt.engine import EcmgCaps
from tessera.simulcrypt.keystore import KeyStore

DRM, SC = 0x00010001, 0x00020001


@pytest.fixture
def keystore():
    ks = KeyStore(":memory:")
    for scid in (DRM, SC):
        for ecm_id in (0x101, 0x102):
            ks.add("SEK", scid, ecm_id)
        ks.add("CWT", scid, 0)
    ks.add("PEK", DRM, 0x102)  # a program key overrides the service key for 0x102
    yield ks
    ks.close()


FAST = EcmgCaps(delay_start=-50, delay_stop=20, ecm_rep_period=50, max_streams=128, min_cp_duration=1,
                lead_cw=1, cw_per_msg=2, max_comp_time=50)


def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(cond, timeout=2.0):
    """Polls cond() until true (the peer's side of a close is asynchronous)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


TSHARK_HINT = ("tshark not installed: `sudo apt-get install tshark` (or run .ci/run) "
               "enables the SimulCrypt dissector check")


def in_ci() -> bool:
    """CI=true (set by CI services and by .ci/run's callers): the tshark check is mandatory."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def tshark_or_skip() -> str:
    """Path of tshark. Missing: a failure in CI (.ci/run installs it), a one-line skip elsewhere."""
    path = shutil.which("tshark")
    if path:
        return path
    if in_ci():
        pytest.fail("CI=true but tshark is missing: .ci/run must install it (apt-get install tshark)")
    pytest.skip(TSHARK_HINT)
