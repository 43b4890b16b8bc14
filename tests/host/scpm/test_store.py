"""Key material at rest: encrypted, bound to its row, never shown."""
import os
import stat

import pytest

from tessera.scpm.store import ENV_KEY, Store, StoreError

SECRET = bytes.fromhex("0badc0de0badc0de0badc0de0badc0de")


def test_keys_are_encrypted_at_rest(tmp_path):
    db = tmp_path / "k.sqlite"
    s = Store(db)
    s.upsert_device(5, "127.0.0.1", 1234, "x")
    s.put_device_key(5, 4, 0, 1, "current", SECRET)
    s.put_home_key(2, 3, 1, SECRET)
    assert s.device_keys(5)[0].secret == SECRET and s.home_keys()[(2, 3, 1)] == SECRET
    assert SECRET.hex() not in repr(s.device_keys(5)) and "0badc0de" not in repr(s.device_keys(5))
    s.close()
    for f in tmp_path.iterdir():
        assert SECRET not in f.read_bytes() and SECRET.hex().encode() not in f.read_bytes(), f
    keyfile = tmp_path / "k.sqlite.key"
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    s = Store(db)  # the key file is found again
    assert s.device_keys(5)[0].secret == SECRET
    s.close()


def test_wrong_storage_key_is_refused(tmp_path, monkeypatch):
    db = tmp_path / "k.sqlite"
    Store(db, storage_key=bytes(32)).close()
    with pytest.raises(StoreError, match="wrong KSN storage key"):
        Store(db, storage_key=bytes([1]) * 32)
    monkeypatch.setenv(ENV_KEY, "00" * 32)
    Store(db).close()
    monkeypatch.setenv(ENV_KEY, "zz")
    with pytest.raises(StoreError):
        Store(db)


def test_world_readable_key_file_is_refused(tmp_path):
    db = tmp_path / "k.sqlite"
    Store(db).close()
    os.chmod(tmp_path / "k.sqlite.key", 0o644)
    with pytest.raises(StoreError, match="chmod 600"):
        Store(db)


def test_a_blob_cannot_move_to_another_row(tmp_path):
    s = Store(tmp_path / "k.sqlite", storage_key=bytes(32))
    s.put_device_key(5, 4, 0, 1, "current", SECRET)
    s._db.execute("UPDATE device_keys SET gen=2")
    with pytest.raises(StoreError):
        s.device_keys(5)
