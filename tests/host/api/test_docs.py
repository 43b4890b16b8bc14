"""docs/scripting.md stays true: every Python block compiles and imports only public names;
the blocks that need no outside device (boards on a virtual board, the SimulCrypt head end
on loopback) run as written, in a temporary directory."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tessera.api
import tessera.api.simulcrypt

ROOT = Path(__file__).resolve().parents[3]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "scripting.md").read_text(), re.S)


def test_blocks_compile_and_use_public_names():
    assert len(BLOCKS) >= 6
    for code in BLOCKS:
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tessera"):
                public = {"tessera": tessera.api.__all__, "tessera.api": tessera.api.__all__,
                          "tessera.api.simulcrypt": tessera.api.simulcrypt.__all__}.get(node.module)
                assert public is not None, f"docs import the internal module {node.module}"
                for alias in node.names:
                    assert alias.name in public, f"{alias.name} is not public in {node.module}"


def _run(code: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_boards_block_runs(tessera_var, tmp_path):
    code = next(b for b in BLOCKS if "Board.virtual(" in b).replace('"bench-1"', '"docs-bench"')
    out = _run(code, tmp_path)
    assert "deployed" in out and "SELFTEST PASS" in out and "micropython" in out and "{'x': 2}" in out


@pytest.mark.slow
def test_board_speed_block_runs(tessera_var, tmp_path):
    out = _run(next(b for b in BLOCKS if "set_speed(" in b).replace('"slow-1"', '"docs-slow"'), tmp_path)
    lines = out.splitlines()
    assert lines[0].startswith("board ") and float(lines[0].split()[1]) > 1, out
    ms = int(lines[1].split()[4])  # the board's clock: far slower than this machine (fast: ~30 ms)
    assert ms > 500, out
    assert "BridgeStatus(speed='board'" in lines[2] and "BridgeStatus(speed='fast', slowdown=None" in lines[3], out


def test_simulcrypt_block_runs(tmp_path):
    out = _run(next(b for b in BLOCKS if "send_ltkms(" in b), tmp_path)
    assert "3 periods;" in out and "errors=0" in out, out


def test_rmcp2_block_runs(tessera_var, tmp_path):
    """The secure RMCP-2 block as written: an SM serving in a thread, SMA, DMA, RMAs, a fresh
    Ks and a truncation, on loopback in a temporary directory."""
    out = _run(next(b for b in BLOCKS if "SessionManager.open(" in b), tmp_path)
    assert out.count("result=<Result.ACCEPTED: 1>") == 2, out
    assert "1 ACL entry; the DMA admits rma1: True" in out, out
    assert "rma2 refused: SERV_USER_ID_MISSING 0x41" in out, out
    assert "group='closed'" in out and "Ks generation 1 ['SMA', 'DMA', 'RMA']" in out, out
    assert "Rekeyed(ks_gen=2, delivered=2)" in out and "role='DMA', ks_gen=3, delivered=1)" in out, out
