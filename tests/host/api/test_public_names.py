"""Stability of the public API: the committed list of public names (public_names.txt) and
the modules' `__all__` must agree, and every name must resolve."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tessera
import tessera.api

import tessera.api.rmcp2
import tessera.api.simulcrypt

LINES = [ln.strip() for ln in (Path(__file__).with_name("public_names.txt")).read_text().splitlines()
         if ln.strip() and not ln.startswith("#")]
LISTED = [n for n in LINES if "." not in n]
SIMULCRYPT = [n.split(".", 1)[1] for n in LINES if n.startswith("simulcrypt.")]


def test_no_public_name_disappears():
    missing = sorted(set(LISTED) - set(tessera.api.__all__))
    assert not missing, f"public names removed from tessera.api.__all__: {missing}"
    for name in LISTED:
        assert getattr(tessera, name) is getattr(tessera.api, name), name


def test_simulcrypt_submodule_names():
    assert sorted(SIMULCRYPT) == sorted(tessera.api.simulcrypt.__all__)
    for name in SIMULCRYPT:
        getattr(tessera.api.simulcrypt, name)


def test_rmcp2_submodule_names_are_all_re_exported():
    assert set(tessera.api.rmcp2.__all__) <= set(LISTED)
    for name in tessera.api.rmcp2.__all__:
        assert getattr(tessera.api.rmcp2, name) is getattr(tessera, name), name


def test_new_names_are_listed_deliberately():
    extra = sorted(set(tessera.api.__all__) - set(LISTED))
    assert not extra, f"add these to tests/host/api/public_names.txt (and docs/scripting.md): {extra}"
    assert len(tessera.api.__all__) == len(set(tessera.api.__all__))


def test_tessera_all_is_the_api():
    assert sorted(tessera.__all__) == sorted(["__version__", *tessera.api.__all__])
    assert set(tessera.api.__all__) <= set(dir(tessera))


def test_star_import_and_no_private_leak():
    code = "from tessera import *; print(sorted(k for k in dir() if not k.startswith('__')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names = eval(out)  # a list literal printed by the child
    assert set(names) == set(tessera.api.__all__)
    assert not [n for n in tessera.api.__all__ if n.startswith("_")]


def test_cli_does_not_import_the_api():
    """`import tessera` stays light: the API loads on first use of one of its names."""
    code = "import sys, tessera; print('tessera.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
