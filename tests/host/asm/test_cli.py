"""`tessera pki` and `tessera asm` command lines."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tessera.cli import main
from tessera.pki import certs


def test_pki_create_and_validate(tmp_path, capsys):
    d = tmp_path / "pki"
    assert main(["pki", "create", "--dir", str(d), "--leaf", "SM:sm1", "--leaf", "LD:ldb1"]) == 0
    out = capsys.readouterr().out
    assert "CN=SM.sm1" in out and "CN=LD.ldb1" in out
    assert main(["pki", "validate", str(d / "sm1.pem"), "--trust", str(d / "root.pem")]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["pki", "validate", str(d / "sm1.pem")]) == 1  # no root: reported
    assert "does not end in a self-signed root" in capsys.readouterr().out
    assert main(["pki", "create", "--dir", str(d)]) == 2  # refuses to overwrite


def test_pki_validate_lists_violations(pki, tmp_path, capsys):
    bad = certs.issue("nocn", org="Other", ca=False, parent=pki.chain.intermediate, key_size=1024)
    p = tmp_path / "bad.pem"
    p.write_bytes(bad.cert_pem())
    assert main(["pki", "validate", str(p), "--trust", str(pki.paths["root"])]) == 1
    out = capsys.readouterr().out
    assert "1024 bits" in out and "subject O differs from issuer O" in out and "ROLE.name" in out


def test_asm_client_commands(pki, responder, capsys, tmp_path):
    common = ["--pki", str(pki.dir), "--port", str(responder.port)]
    assert main(["asm", "get-time", *common]) == 0
    assert re.search(r"time \d+ response successful", capsys.readouterr().out)
    assert main(["asm", "key-load", "--random", "3", "--first-id", "10", *common]) == 0
    assert "overflow 0" in capsys.readouterr().out
    assert main(["asm", "key-query-all", *common]) == 0
    assert "3 key(s): 10 11 12" in capsys.readouterr().out
    assert main(["asm", "key-purge", "11", *common]) == 0
    assert "purged" in capsys.readouterr().out
    assert main(["asm", "key-query", "11", *common]) == 0
    assert "absent" in capsys.readouterr().out
    assert main(["asm", "clock-offset", *common]) == 0
    assert "offset" in capsys.readouterr().out
    db = tmp_path / "ini.db"
    assert main(["asm", "collect", "--db", str(db), *common]) == 0
    assert "stored" in capsys.readouterr().out
    assert main(["asm", "status", "alert", "--db", str(responder.responder.cfg.db)]) == 0
    assert main(["asm", "query-spb", *common]) == 0
    assert "security-alert" in capsys.readouterr().out
    # a rogue initiator gets a clean error, not a traceback
    assert main(["asm", "get-time", "--pki", str(pki.dir), "--name", "badqualifier", "--port", str(responder.port)]) == 2


def test_responder_process(pki, tmp_path):
    env = dict(os.environ, TESSERA_VAR=str(tmp_path))
    exe = [sys.executable, "-m", "tessera"]
    proc = subprocess.Popen([*exe, "asm", "responder", "--pki", str(pki.dir), "--port", "0", "--db", str(tmp_path / "r.db")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        port = re.search(r":(\d+),", line).group(1)
        out = subprocess.run([*exe, "asm", "query-spb", "--pki", str(pki.dir), "--port", port],
                             capture_output=True, text=True, timeout=20, env=env)
        assert out.returncode == 0 and "not-playing" in out.stdout
    finally:
        proc.terminate()
        proc.wait(10)


def test_keys_file_open_to_others_is_warned_about(pki, responder, tmp_path, caplog):
    """Issue 11 #13: LE keys reach the CLI from a file, never argv; a world-readable one is flagged."""
    import json
    kf = tmp_path / "keys.json"
    kf.write_text(json.dumps([{"id": 77, "key": "00" * 16}]))
    kf.chmod(0o644)
    common = ["--pki", str(pki.dir), "--port", str(responder.port)]
    assert main(["asm", "key-load", "--keys-file", str(kf), *common]) == 0
    assert any("readable by group or others" in r.getMessage() for r in caplog.records)
    caplog.clear()
    kf.chmod(0o600)
    assert main(["asm", "key-load", "--keys-file", str(kf), *common]) == 0
    assert not any("readable by group or others" in r.getMessage() for r in caplog.records)
