"""Gap 2: `tessera pki create` keeps the CA keys (0600, optionally encrypted) and
`tessera pki issue` extends the chain with a leaf that validates and works in ASM."""
from __future__ import annotations

import asyncio
import logging
import stat
import time

import pytest

from tessera.asm.initiator import Initiator
from tessera.asm.responder import Responder, ResponderConfig
from tessera.asm.tls import Credentials
from tessera.cli import main
from tessera.pki import certs

SECRET = "correct horse battery staple 7"


def errors(caplog) -> str:
    """The last error logged (the CLI reports TesseraError through logging)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR][-1]


def mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_create_keeps_encrypted_ca_keys_and_issue_extends(tmp_path, monkeypatch, capsys, caplog):
    d = tmp_path / "pki"
    monkeypatch.setenv("TESSERA_TEST_PKI_PASS", SECRET)
    caplog.set_level(logging.DEBUG)
    assert main(["pki", "create", "--dir", str(d), "--passphrase-env", "TESSERA_TEST_PKI_PASS"]) == 0
    out = capsys.readouterr().out
    for name in ("root", "intermediate"):
        key = d / f"{name}.key"
        assert mode(key) == 0o600
        assert key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert mode(d / "initiator.key") == mode(d / "responder.key") == 0o600
    assert "CA keys (encrypted" in out

    # the encrypted intermediate key is refused without / with a wrong passphrase, cleanly
    assert main(["pki", "issue", "--dir", str(d), "--leaf", "SM:second"]) == 2
    assert "is encrypted" in errors(caplog)
    monkeypatch.setenv("WRONG_PASS", "not it")
    assert main(["pki", "issue", "--dir", str(d), "--leaf", "SM:second", "--passphrase-env", "WRONG_PASS"]) == 2
    err = errors(caplog)
    assert "wrong passphrase" in err and "not it" not in err
    assert not (d / "second.pem").exists()

    assert main(["pki", "issue", "--dir", str(d), "--leaf", "SM:second", "--passphrase-env", "TESSERA_TEST_PKI_PASS"]) == 0
    out = capsys.readouterr().out
    assert "CN=SM.second" in out and mode(d / "second.key") == 0o600
    assert main(["pki", "issue", "--dir", str(d), "--leaf", "SM:second", "--passphrase-env", "TESSERA_TEST_PKI_PASS"]) == 2
    capsys.readouterr()

    # the new leaf: signed by the existing intermediate, and conformant to the 430-2 profile
    chain = certs.load_pems(d / "second.pem", d / "root.pem")
    assert certs.validate_chain(chain) == []
    leaf = chain[0]
    inter = certs.load_pems(d / "intermediate.pem")[0]
    assert leaf.issuer == inter.subject and certs.leaf_roles(leaf) == {"SM"}
    assert main(["pki", "validate", str(d / "second.pem"), "--trust", str(d / "root.pem")]) == 0
    assert "OK" in capsys.readouterr().out

    # the passphrase never reaches output or logs
    assert SECRET not in out and all(SECRET not in r.getMessage() for r in caplog.records)

    # and the new leaf works in a real ASM session, recorded under its own thumbprint
    new_creds = Credentials(d / "second.pem", d / "second.key", d / "root.pem")

    async def go():
        resp = Responder(ResponderConfig(Credentials(d / "responder.pem", d / "responder.key", d / "root.pem"),
                                         tmp_path / "r.db", port=0))
        port = await resp.start()
        try:
            async with Initiator("127.0.0.1", port, creds=new_creds) as ini:
                t = await ini.get_time()
            await asyncio.sleep(0.1)
            return t, resp.log.events()
        finally:
            await resp.stop()

    t, events = asyncio.run(asyncio.wait_for(go(), 20))
    assert t.response == 0 and abs(t.time - time.time()) < 3
    assert any(e[3] == "LinkOpened" and e[4] == certs.thumbprint(leaf) for e in events)


def test_issue_unencrypted_and_prompt(pki, monkeypatch, capsys, caplog):
    # the session PKI was written with unencrypted CA keys: issue needs no passphrase
    assert certs.key_is_encrypted(pki.paths["intermediate.key"]) is False
    assert main(["pki", "issue", "--dir", str(pki.dir), "--leaf", "LD:extra", "--days", "30"]) == 0
    assert "CN=LD.extra" in capsys.readouterr().out
    assert certs.validate_chain(certs.load_pems(pki.dir / "extra.pem", pki.paths["root"])) == []
    # names that would overwrite CA files are refused by the parser
    with pytest.raises(SystemExit):
        main(["pki", "issue", "--dir", str(pki.dir), "--leaf", "SM:intermediate"])
    # a prompt that is mistyped the second time creates nothing
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    d = pki.dir.parent / "prompted"
    assert main(["pki", "create", "--dir", str(d), "--passphrase-prompt"]) == 2
    assert "differ" in errors(caplog) and not d.exists()
    # a key that does not match its certificate is refused
    bad = pki.dir.parent / "mismatch"
    bad.mkdir()
    (bad / "intermediate.pem").write_bytes(pki.paths["intermediate"].read_bytes())
    (bad / "intermediate.key").write_bytes(pki.paths["root.key"].read_bytes())
    with pytest.raises(certs.PKIError, match="does not belong"):
        certs.issue_leaf(bad, "SM", "x")
