"""The SimulCrypt key store keeps key material sealed (AES-256-GCM) in SQLite, never in clear."""
from __future__ import annotations

import sqlite3
import stat

import pytest

from tessera.simulcrypt.keystore import STORE_KEY_ENV, KeyStore, KeyStoreError

SEK = bytes(range(0x40, 0x50))
LTK = bytes(range(0x60, 0x80))


def _file_bytes(db) -> bytes:
    data = db.read_bytes()
    for extra in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-journal")):
        if extra.exists():
            data += extra.read_bytes()
    return data


def test_material_is_sealed_on_disk_and_restored(tmp_path):
    db = tmp_path / "keys.sqlite"
    ks = KeyStore(db, env={})
    a = ks.add("SEK", 0x00010001, 0x101, SEK)
    b = ks.add("LTK", 0x00010007, 1, LTK)
    ks.close()
    raw = _file_bytes(db)
    assert SEK not in raw and LTK not in raw
    cols = {r[1] for t in ("keys_sealed",) for r in sqlite3.connect(db).execute(f"PRAGMA table_info({t})")}
    assert "material" not in cols
    keyfile = db.with_name(db.name + ".key")
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    ks = KeyStore(db, env={})
    assert ks.traffic_key(0x00010001, 0x101).material == SEK
    assert ks.get("LTK", 0x00010007, b.key_id).material == LTK
    assert a.key_id == 1 and [r[:4] for r in ks.list()] == [("LTK", 0x00010007, 1, 1), ("SEK", 0x00010001, 0x101, 1)]
    assert ks.list()[1][4] == 128
    ks.close()


def test_wrong_storage_key_is_refused(tmp_path):
    db = tmp_path / "keys.sqlite"
    ks = KeyStore(db, env={STORE_KEY_ENV: "11" * 32})
    ks.add("SEK", 0x00010001, 0x101, SEK)
    ks.close()
    with pytest.raises(KeyStoreError) as exc:
        KeyStore(db, env={STORE_KEY_ENV: "22" * 32}).traffic_key(0x00010001, 0x101)
    assert "22" * 32 not in str(exc.value) and SEK.hex() not in str(exc.value)


def test_rows_cannot_be_swapped(tmp_path):
    db = tmp_path / "keys.sqlite"
    ks = KeyStore(db, env={})
    ks.add("SEK", 0x00010001, 0x101, SEK)
    ks.add("SEK", 0x00010001, 0x102, LTK[:16])
    ks.close()
    con = sqlite3.connect(db)
    rows = con.execute("SELECT nonce, sealed FROM keys_sealed ORDER BY key_id").fetchall()
    con.execute("UPDATE keys_sealed SET nonce=?, sealed=? WHERE key_id=1", rows[1])
    con.commit()
    con.close()
    with pytest.raises(KeyStoreError):
        KeyStore(db, env={}).traffic_key(0x00010001, 0x101)


def test_legacy_clear_table_is_sealed_and_dropped(tmp_path):
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE keys (kind TEXT NOT NULL, owner INTEGER NOT NULL, scope INTEGER NOT NULL,"
                " key_id INTEGER NOT NULL, material BLOB NOT NULL, PRIMARY KEY (kind, owner, key_id))")
    con.execute("INSERT INTO keys VALUES ('SEK', 65537, 257, 3, ?)", (SEK,))
    con.commit()
    con.close()
    ks = KeyStore(db, env={})
    assert ks.traffic_key(0x00010001, 0x101).material == SEK
    assert ks.traffic_key(0x00010001, 0x101).key_id == 3
    ks.close()
    assert SEK not in _file_bytes(db)
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "keys" not in tables


def test_memory_store_needs_no_key_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ks = KeyStore(":memory:")
    k = ks.add("CWT", 0x00010001, 0)
    assert ks.get("CWT", 0x00010001, k.key_id).material == k.material
    assert list(tmp_path.iterdir()) == []
