"""The firmware must not use what stock ESP32/RP2040 MicroPython lacks
(shared/reference/micropython.md): no cryptolib CTR (mode 6), no unittest, no hash
hexdigest()/copy(), no int.bit_length, and no CPython-only modules at run time."""
import ast

import pytest

from tessera.boards.build import firmware_sources
from tessera.paths import firmware_dir

FORBIDDEN_IMPORTS = {"unittest", "typing", "dataclasses", "enum", "abc", "secrets", "hmac", "logging", "pathlib"}
FORBIDDEN_ATTRS = {"hexdigest", "bit_length", "MODE_CTR"}


def _sources():
    return [firmware_dir() / rel for rel in firmware_sources()] + [firmware_dir() / "main.py", firmware_dir() / "boot.py"]


def problems_in(source: str) -> list[str]:
    tree = ast.parse(source)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [a.name for a in node.names if a.name.split(".")[0] in FORBIDDEN_IMPORTS]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in FORBIDDEN_IMPORTS:
                problems.append(node.module)
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRS:
            problems.append("." + node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "aes":
            # cryptolib.aes(key, mode, ...): only ECB (1) and CBC (2) exist on boards
            if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value not in (1, 2):
                problems.append(f"cryptolib mode {node.args[1].value}")
        elif isinstance(node, ast.AnnAssign) or (isinstance(node, ast.FunctionDef) and (node.returns or any(a.annotation for a in node.args.args))):
            problems.append(f"annotation at line {node.lineno}")
    return problems


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(firmware_dir())))
def test_firmware_module_is_portable(path):
    problems = problems_in(path.read_text())
    assert not problems, f"{path.name} uses what stock boards lack: {problems}"


def test_checker_catches_violations():
    bad = (
        "import unittest\nfrom typing import List\nimport hashlib, cryptolib\n"
        "hashlib.sha256(b'').hexdigest()\ncryptolib.aes(b'k' * 16, 6, b'c' * 16)\n"
        "def f(x: int) -> int:\n    return x.bit_length()\n"
    )
    found = problems_in(bad)
    for expected in ("unittest", "typing", ".hexdigest", "cryptolib mode 6", ".bit_length"):
        assert expected in found
    assert any(p.startswith("annotation") for p in found)
