"""Every script in examples/ runs here as a user would run it (a subprocess), against
virtual boards (one per board profile, firmware deployed through the public API) and a KSN
on loopback, with ephemeral ports and a temporary directory; each test asserts on the
example's output, so an example that rots fails CI."""
from __future__ import annotations

import json
import re
import time
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tessera import Board, list_devices
from tessera.boards import profile
from tessera.boards.virtual import free_udp_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, timeout: float = 120.0, check: bool = True) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def boards(tessera_var):
    """One virtual board per profile, the firmware and boot application deployed through
    tessera.Board (its progress callback checked), idle at the REPL (no scpm.json yet)."""
    started = []
    try:
        for i, prof in enumerate(profile.load_all()):
            b = Board.virtual(f"api-{prof.name}", prof.name).start(fresh=True)
            started.append(b)
            if i == 0:
                seen: list[tuple[int, int]] = []
                res = b.deploy(with_main=True, progress=lambda i, n, path, size: seen.append((i, n)))
                assert seen and seen[-1][0] == seen[-1][1] == res.files and res.firmware
            else:  # no callback: deploy still checks that every file was copied
                res = b.deploy(with_main=True)
            assert res.files > 2 and res.firmware and res.total_bytes > 0
        yield started
    finally:
        for b in started:
            b.stop()


def test_selftest_all(boards):
    from tessera import virtual_boards

    # other tests' virtual boards may run in the same session: name ours
    assert {b.name for b in boards} <= {b.name for b in virtual_boards()}
    out = run_example("selftest_all.py", *(a for b in boards for a in ("--virtual", b.name)))
    for b in boards:
        assert f"api-{b.profile.name}" in out
    assert out.count("SELFTEST PASS") == len(boards)
    assert f"{len(boards)} of {len(boards)} boards passed" in out
    out = run_example("selftest_all.py", "--virtual", "no-such-board", check=False)
    assert "not running: no-such-board" in out


def test_check_vectors(boards):
    out = run_example("check_vectors.py", "--virtual", boards[0].name, "--profile", boards[0].profile.name)
    assert "FAIL" not in out and "DISAGREE" not in out, out
    assert "RFC 4231 case 1" in out and "FIPS-197 C.1 AES-128" in out
    assert "vectors agree on board and host" in out


@pytest.fixture(scope="module")
def fleet(boards, tmp_path_factory):
    """The boards become SCPM devices (scpm.json, then a reboot starts main.py's UDP loop);
    their setup keys are written to 0600 files, as labels a script reads."""
    d = tmp_path_factory.mktemp("fleet")
    ksn_port = free_udp_port()
    devices = []
    for i, b in enumerate(boards):
        addr, port, setup = 0x0A000201 + i, free_udp_port(), os.urandom(16)
        cfg = {"address": f"{addr:08x}", "setup_key": setup.hex(), "port": port, "bind": "127.0.0.1",
               "ksn_host": "127.0.0.1", "ksn_port": ksn_port}
        (b.files / "scpm.json").write_text(json.dumps(cfg))
        b.reset(wait_udp_port=port)
        keyf = d / f"{b.name}.key"
        keyf.write_text(setup.hex() + "\n")
        keyf.chmod(0o600)
        devices.append({"address": f"0x{addr:08X}", "endpoint": f"127.0.0.1:{port}",
                        "setup_key_file": keyf.name, "name": b.name})
    (d / "fleet.json").write_text(json.dumps(devices))
    return {"dir": d, "db": d / "ksn.sqlite", "ksn_port": ksn_port, "devices": devices}


def test_enrol_fleet(fleet):
    out = run_example("enrol_fleet.py", "--db", str(fleet["db"]), "--port", str(fleet["ksn_port"]),
                      str(fleet["dir"] / "fleet.json"))
    for d in fleet["devices"]:
        assert f"{d['address']}: enrolled, master key generation 1" in out, out
        assert f"{d['address']}: SP key 1 generation 1 installed" in out, out
        assert f"{d['address']}: master key generation 1 -> 2" in out, out
    devs = list_devices(fleet["db"])  # what the example left in the registry, read through the API
    assert sorted(d.address for d in devs) == sorted(d["address"] for d in fleet["devices"])
    assert all(d.master_gen == 2 and d.keys.get("sp[1]") == 1 for d in devs), devs


def test_property_all(fleet):
    db, port = str(fleet["db"]), str(fleet["ksn_port"])
    n = len(fleet["devices"])
    out = run_example("property_all.py", "--db", db, "--port", port, "--prop", "2", "--set", "0007", "--kind", "sp",
                      "--index", "1")
    assert out.count("property 2 0000 -> 0007") == n, out
    assert f"{n} of {n} devices OK" in out
    # under the user key the device refuses the tariff write: the example reports it, exits 1
    out = run_example("property_all.py", "--db", db, "--port", port, "--prop", "2", "--set", "0009", check=False)
    assert out.count("refused: the key has too little authority") == n, out
    out = run_example("property_all.py", "--db", db, "--port", port, "--prop", "2")
    assert out.count("property 2 = 0007") == n, out


@pytest.fixture(scope="module")
def asm_responder(tmp_path_factory):
    """A PKI (`tessera pki create`) and an ASM responder (tessera.AsmResponder) on its own
    event loop thread, on an ephemeral port."""
    import asyncio
    import threading

    from tessera import AsmResponder, pki_credentials
    from tessera.cli import main

    d = tmp_path_factory.mktemp("asm")
    assert main(["pki", "create", "--dir", str(d / "pki"), "--leaf", "SM:sm1", "--leaf", "LD:ld1"]) == 0
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    r = AsmResponder(pki_credentials(d / "pki", "ld1"), d / "spb.db", port=0)
    asyncio.run_coroutine_threadsafe(r.start(), loop).result(20)
    try:
        yield {"dir": d, "responder": r}
    finally:
        asyncio.run_coroutine_threadsafe(r.stop(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()


def test_asm_log(asm_responder):
    """Records made by key loads and an operator alert are collected, listed once, and a
    second run collects nothing new."""
    from tessera import Asm, LEKey, pki_credentials

    d, r = asm_responder["dir"], asm_responder["responder"]
    with Asm("127.0.0.1", r.port, creds=pki_credentials(d / "pki", "sm1")) as asm:
        assert asm.load_keys([LEKey(7, os.urandom(16), 3600, 1), LEKey(8, os.urandom(16), 3600, 2)]) == 0
        assert asm.key_ids() == [7, 8] and asm.purge_key(7) and not asm.purge_key(7)
    r.set_status("alert", "test")
    args = ["--port", str(r.port), "--pki", str(d / "pki"), "--name", "sm1", "--db", str(d / "sm.db")]
    time.sleep(1.1)  # the collector takes whole seconds up to the responder's last complete one
    out = run_example("asm_log.py", *args)
    assert "status security-alert" in out, out
    n = int(re.search(r"(\d+) record\(s\) held", out).group(1))
    assert n >= 1 and re.search(r"\d+ listed, (\d+) new", out).group(1) == str(n), out
    assert "SPBSecurityAlert" in out, out
    first = re.findall(r"event +(\d+) ", out)
    assert len(first) == n and "KeyTransfer" in out, out
    time.sleep(1.1)
    out = run_example("asm_log.py", *args)  # only what is new: the first run's own link records
    new = int(re.search(r"\d+ listed, (\d+) new", out).group(1))
    second = re.findall(r"event +(\d+) ", out)
    assert new >= 1 and len(second) == n + new == len(set(second)) and set(first) < set(second), out


def test_rmcp2_session(tmp_path):
    """An SM with a closed group on loopback: SMA, DMA and a host RMA admitted, a stranger
    refused with 0x41, the RMA's entry in the DMA's ACL (no boards needed)."""
    out = run_example("rmcp2_session.py", "--dir", str(tmp_path / "rm"), "--ident", "viewer-7")
    assert "identifier 'viewer-7' registered" in out, out
    assert "SMA admitted: ACCEPTED, policy OK, Ks generation 1" in out, out
    assert "DMA admitted: ACCEPTED, policy OK, Ks generation 1" in out, out
    assert "policy: closed group" in out and "RMA rma1 admitted: ACCEPTED, policy OK" in out, out
    assert "RMA rma2 refused: SERV_USER_ID_MISSING (0x41)" in out, out
    acl = re.findall(r"hashed MAID ([0-9a-f]{32})  hashed K_TLS \(secret, not shown\)(  <- rma1)?", out)
    assert len(acl) == 1 and acl[0][1], out
    assert "the DMA admits rma1: True" in out and "3 members (DMA, RMA, SMA), 1 ACL entries" in out, out
    assert "capabilities after the policy" not in out, out  # SMA and DMA agreed together
