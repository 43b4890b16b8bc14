"""Clean one-line errors, exit status 2, no traceback: missing and malformed files, bad
ports, unreachable peers, bad hex."""
from __future__ import annotations

import json
import logging

import pytest

from tessera.cli import main
from tessera.pki import certs


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    certs.write_chain(certs.create_chain("Tessera", [("SM", "initiator"), ("LD", "responder")]), d)
    return d


def _fails_cleanly(argv, caplog, *expect: str) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tessera"):
        assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert all(r.exc_info is None for r in caplog.records)
    for e in expect:
        assert e in errors[0]
    return errors[0]


def _usage_error(argv, capsys, expect: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert expect in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["asm", "get-time", "--port", "70000"],
    ["asm", "responder", "--port", "-1"],
    ["simulcrypt", "stkm-generator", "--super-cas-id", "0x00010001", "--port", "65536"],
    ["simulcrypt", "mux", "--port", "99999"],
    ["simulcrypt", "ltkm-generator", "--mux", "127.0.0.1:1", "--client-id", "0x00010007", "--key-owner", "1",
     "--key-scope", "1", "--udp", "--udp-port", "70000"],
])
def test_bad_port_is_a_usage_error(argv, capsys):
    _usage_error(argv, capsys, "port")


def test_bad_port_inside_host_port(tmp_path, caplog):
    db = str(tmp_path / "k.sqlite")
    _fails_cleanly(["simulcrypt", "--db", db, "ltkm-generator", "--mux", "127.0.0.1:99999", "--client-id",
                    "0x00010007", "--key-owner", "0x00010001", "--key-scope", "1"], caplog, "--mux", "port")
    _fails_cleanly(["simulcrypt", "--db", db, "scs", "--service", "x", "--generator",
                    "127.0.0.1:99999:0x00010001:1"], caplog, "--generator")


def test_unreachable_peer(pki_dir, caplog):
    _fails_cleanly(["asm", "get-time", "--pki", str(pki_dir), "--port", "1", "--timeout", "1"], caplog,
                   "cannot talk to 127.0.0.1:1")


def test_missing_and_malformed_certificate_files(pki_dir, tmp_path, caplog):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    _fails_cleanly(["pki", "show", str(tmp_path / "missing.pem")], caplog, "missing.pem")
    _fails_cleanly(["pki", "show", str(bad)], caplog, "bad.pem")
    _fails_cleanly(["pki", "validate", str(pki_dir / "initiator.pem"), "--trust", str(tmp_path / "missing.pem")],
                   caplog, "missing.pem")
    _fails_cleanly(["pki", "validate", str(pki_dir / "initiator.pem"), "--trust", str(bad)], caplog, "bad.pem")


def test_unusable_databases(tmp_path, caplog):
    notdb = tmp_path / "not.db"
    notdb.write_bytes(b"this is not an SQLite database" * 10)
    nodir = str(tmp_path / "no" / "such" / "dir" / "x.db")
    _fails_cleanly(["asm", "status", "--db", nodir], caplog, "x.db")
    _fails_cleanly(["asm", "status", "--db", str(notdb)], caplog, "not.db")
    _fails_cleanly(["simulcrypt", "--db", nodir, "keys", "list"], caplog, "x.db")
    _fails_cleanly(["simulcrypt", "--db", str(notdb), "keys", "list"], caplog, "not.db")


@pytest.mark.parametrize("content", [
    "not json",
    json.dumps([{"id": 1, "key": "zz" * 16}]),          # bad hex
    json.dumps([{"id": 1, "key": "00" * 15}]),          # 15 bytes
    json.dumps({"id": 1}),                               # not a list
])
def test_bad_keys_file_is_reported_before_connecting(pki_dir, tmp_path, caplog, content):
    f = tmp_path / "keys.json"
    f.write_text(content)
    # port 1 is closed: the error must be about the file, found before any connection attempt
    msg = _fails_cleanly(["asm", "key-load", "--pki", str(pki_dir), "--port", "1", "--keys-file", str(f)], caplog,
                         "bad keys file")
    assert "cannot talk" not in msg
    _fails_cleanly(["asm", "key-load", "--pki", str(pki_dir), "--port", "1", "--keys-file",
                    str(tmp_path / "missing.json")], caplog, "missing.json")


def test_unexpected_os_error_is_clean(monkeypatch, caplog):
    import tessera.pki.cli as pki_cli

    def boom(args):
        raise PermissionError(13, "Permission denied", "/some/file")

    monkeypatch.setattr(pki_cli, "cmd_show", boom)
    _fails_cleanly(["pki", "show", "x.pem"], caplog, "Permission denied")
