"""Gap 3: persisted LE keys are sealed with AES-GCM; the storage key lives apart from the DB."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import stat

import pytest

from tessera.asm.codec import LEKey
from tessera.asm.initiator import Initiator
from tessera.asm.store import STORE_KEY_ENV, KeyStore, KeyStoreError, storage_key_path


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def fresh(ids, expire=3600):
    return [LEKey(i, secrets.token_bytes(16), expire, int.from_bytes(secrets.token_bytes(8), "big")) for i in ids]


def disk_bytes(db) -> bytes:
    """The database and every side file SQLite may leave next to it."""
    return b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name) and p.suffix != ".key")


def secrets_of(k: LEKey) -> list[bytes]:
    return [k.key, k.attribute.to_bytes(8, "big"), k.key.hex().encode()]


def test_db_holds_no_key_bytes_and_restart_restores_unexpired(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    clk = FakeClock()
    db = tmp_path / "keys.db"
    env: dict[str, str] = {}
    ks = KeyStore(16, clock=clk, persist=db, env=env)
    short, long_ = fresh([1, 2], expire=10), fresh([3, 4, 5], expire=1000)
    assert ks.load(short) and ks.load(long_)
    assert ks.purge(5)
    ks.close()
    kf = storage_key_path(db)
    assert kf.exists() and stat.S_IMODE(kf.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.stat().st_mode) == 0o600  # issue 11 #13: sealed key material too
    on_disk = disk_bytes(db)
    for k in short + long_:
        for s in secrets_of(k):
            assert s not in on_disk
    storage_key = bytes.fromhex(kf.read_text())
    assert storage_key not in on_disk and kf.read_text().strip().encode() not in on_disk

    clk.t += 20  # keys 1 and 2 have expired while the responder was down
    again = KeyStore(16, clock=clk, persist=db, env=env)
    assert again.ids() == [3, 4]
    assert again.get(3) == long_[0] and again.get(4) == long_[1]  # key, expire and attribute restored
    rows = sqlite3.connect(db).execute("SELECT key_id FROM lekeys_sealed ORDER BY key_id").fetchall()
    assert rows == [(3,), (4,)]  # expired rows purged on load, not merely hidden
    assert "StorageKey" not in repr(again) and storage_key.hex() not in repr(again)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert storage_key.hex() not in logged
    for k in short + long_:
        assert k.key.hex() not in logged
    again.close()


def test_storage_key_sources_and_refusals(tmp_path):
    clk = FakeClock()
    db = tmp_path / "k.db"
    key_hex = secrets.token_bytes(32).hex()
    ks = KeyStore(16, clock=clk, persist=db, env={STORE_KEY_ENV: key_hex})
    ks.load(fresh([7]))
    ks.close()
    assert not storage_key_path(db).exists()  # the environment key is used, no file is made
    assert KeyStore(16, clock=clk, persist=db, env={STORE_KEY_ENV: key_hex}).ids() == [7]
    with pytest.raises(KeyStoreError, match="wrong storage key") as ei:  # another key cannot open it
        KeyStore(16, clock=clk, persist=db, env={STORE_KEY_ENV: secrets.token_bytes(32).hex()})
    assert key_hex not in str(ei.value)
    with pytest.raises(KeyStoreError, match="64 hex digits") as ei:
        KeyStore(16, clock=clk, persist=db, env={STORE_KEY_ENV: "secret-not-hex"})
    assert "secret-not-hex" not in str(ei.value)
    # a key file readable by others is refused
    db2 = tmp_path / "k2.db"
    KeyStore(16, clock=clk, persist=db2, env={}).close()
    os.chmod(storage_key_path(db2), 0o644)
    with pytest.raises(KeyStoreError, match="must be 0600"):
        KeyStore(16, clock=clk, persist=db2, env={})
    # a sealed row moved to another key ID does not open (ID and expiry are authenticated)
    db3 = tmp_path / "k3.db"
    KeyStore(16, clock=clk, persist=db3, env={}).load(fresh([1]))
    c = sqlite3.connect(db3)
    c.execute("UPDATE lekeys_sealed SET key_id = 2")
    c.commit()
    c.close()
    with pytest.raises(KeyStoreError, match="key\\(s\\) 2"):
        KeyStore(16, clock=clk, persist=db3, env={})


def test_legacy_unencrypted_table_is_wiped(tmp_path, caplog):
    db = tmp_path / "old.db"
    plain = secrets.token_bytes(16)
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE lekeys (key_id INTEGER PRIMARY KEY, key BLOB, expire INTEGER, attribute INTEGER, "
              "expires_at REAL)")
    c.execute("INSERT INTO lekeys VALUES (1, ?, 3600, 5, 9e12)", (plain,))
    c.commit()
    c.close()
    assert plain in db.read_bytes()
    with caplog.at_level(logging.WARNING):
        ks = KeyStore(16, persist=db, env={})
    assert ks.ids() == [] and plain not in disk_bytes(db)
    assert any("discarded 1 LE key" in r.getMessage() for r in caplog.records)
    ks.close()


def test_responder_persists_sealed_keys_over_asm(pki, start_responder, tmp_path):
    db = tmp_path / "persist.db"
    r = start_responder(persist_keys=db)
    ks = fresh(range(100, 104))

    async def go():
        async with Initiator("127.0.0.1", r.port, creds=pki.creds("initiator")) as ini:
            assert (await ini.le_key_load(ks)).response == 0

    asyncio.run(asyncio.wait_for(go(), 20))
    on_disk = disk_bytes(db)
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM lekeys_sealed").fetchone()[0] == 4
    for k in ks:
        for s in secrets_of(k):
            assert s not in on_disk


def test_existing_key_database_open_to_others_is_narrowed(tmp_path, caplog):
    db = tmp_path / "keys.db"
    db.touch(mode=0o644)
    db.chmod(0o644)
    KeyStore(16, persist=db, env={}).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert any("now mode 0600" in r.getMessage() for r in caplog.records)
