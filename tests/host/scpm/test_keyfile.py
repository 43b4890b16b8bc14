"""Issue 11 #11: every store's storage-key file (SCPM KSN, ASM, SimulCrypt) is checked and
written the same way, through tessera.keyfile: a corrupt, foreign or group-readable key file
is one clean error (exit 2 from the CLI), a new key file is written atomically with fsync,
and the databases holding sealed key material are created 0600."""
import os
import stat

import pytest

from tessera import keyfile
from tessera.cli import main

GOOD = "ab" * 32
CORRUPT = ["zz" * 32, "", "\n", "ab" * 31, "ab" * 33, GOOD[:-1] + "g", "\xff\xfe" * 40, "ab " * 32]


def _stores():
    """(name, open(db) -> store, close(store), error class) for each store with a key file."""
    from tessera.asm.store import KeyStore as AsmStore
    from tessera.asm.store import KeyStoreError as AsmErr
    from tessera.scpm.store import Store, StoreError
    from tessera.simulcrypt.keystore import KeyStore as ScStore
    from tessera.simulcrypt.keystore import KeyStoreError as ScErr

    return [
        ("scpm", lambda db: Store(db, durable=False), lambda s: s.close(), StoreError),
        ("asm", lambda db: AsmStore(persist=db, env={}), lambda s: s._db.close(), AsmErr),
        ("simulcrypt", lambda db: ScStore(db, env={}), lambda s: s._db.close(), ScErr),
    ]


@pytest.fixture(autouse=True)
def _no_env_keys(monkeypatch):
    for var in ("TESSERA_KSN_KEY", "TESSERA_ASM_STORE_KEY", "TESSERA_SIMULCRYPT_STORE_KEY"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("content", CORRUPT, ids=range(len(CORRUPT)))
def test_corrupt_ksn_key_file_is_one_line_and_exit_2(tmp_path, content, caplog, capsys):
    db = tmp_path / "k.sqlite"
    assert main(["ksn", "list", "--db", str(db)]) == 2  # no database yet: clean error
    from tessera.scpm.store import Store

    Store(db, durable=False).close()
    kf = keyfile.key_file_path(db)
    kf.write_bytes(content.encode("utf-8", "surrogateescape"))
    caplog.clear()
    assert main(["ksn", "list", "--db", str(db)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "does not hold a 32-byte key" in errors[0] and str(kf) in errors[0]
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["scpm", "asm", "simulcrypt"])
def test_every_store_checks_its_key_file_the_same_way(tmp_path, name):
    _, opener, close, err = next(s for s in _stores() if s[0] == name)
    db = tmp_path / f"{name}.sqlite"
    old = os.umask(0o022)  # what a default shell gives: the store must not rely on it
    try:
        st = opener(db)
        for f in tmp_path.glob(db.name + "*"):  # the database, its key, WAL and shared memory
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        close(st)
    finally:
        os.umask(old)
    kf = keyfile.key_file_path(db)
    assert stat.S_IMODE(kf.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.stat().st_mode) == 0o600  # sealed key material: created 0600
    key = kf.read_text()
    assert len(key.strip()) == 64
    close(opener(db))  # reopens with the same key
    for content in ("zz" * 32, "ab" * 31, ""):
        kf.write_text(content)
        with pytest.raises(err, match="does not hold a 32-byte key") as ei:
            opener(db)
        assert content not in str(ei.value) or not content
    kf.write_text(key)
    os.chmod(kf, 0o640)
    with pytest.raises(err, match="must be 0600"):
        opener(db)
    os.chmod(kf, 0o600)
    if os.getuid() == 0:  # a key file planted by another user is refused
        os.chown(kf, 65534, 65534)
        with pytest.raises(err, match="not owned by this user"):
            opener(db)
        os.chown(kf, 0, 0)
    kf.unlink()
    kf.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_text(key)
    os.chmod(tmp_path / "elsewhere", 0o600)
    with pytest.raises(err):
        opener(db)


def test_key_file_written_atomically_with_fsync(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.append("dir" if stat.S_ISDIR(st.st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    from tessera.scpm.store import Store

    db = tmp_path / "k.sqlite"
    Store(db, durable=False).close()
    kf = keyfile.key_file_path(db)
    assert synced[:2] == ["file", "dir"]  # the key's bytes, then the directory entry
    assert stat.S_IMODE(kf.stat().st_mode) == 0o600 and len(kf.read_text()) == 65
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_crash_while_writing_leaves_no_half_key(tmp_path, monkeypatch):
    kf = tmp_path / "x.key"

    def cut(*a):
        raise OSError(5, "power cut")

    monkeypatch.setattr(os, "link", cut)
    with pytest.raises(OSError):
        keyfile.write_key_file(kf, bytes(32))
    assert not kf.exists() and list(tmp_path.iterdir()) == []  # nothing half-written, no temp left
    monkeypatch.undo()
    assert keyfile.write_key_file(kf, bytes(32))
    assert not keyfile.write_key_file(kf, b"\x01" * 32)  # never replaces an existing key
    assert keyfile.read_key_file(kf) == bytes(32)


def test_env_key_checked_the_same_way(tmp_path, monkeypatch):
    from tessera.scpm.store import Store, StoreError

    monkeypatch.setenv("TESSERA_KSN_KEY", "secret-not-hex")
    with pytest.raises(StoreError, match="TESSERA_KSN_KEY does not hold a 32-byte key") as ei:
        Store(tmp_path / "k.sqlite", durable=False)
    assert "secret-not-hex" not in str(ei.value)
    monkeypatch.setenv("TESSERA_KSN_KEY", GOOD)
    Store(tmp_path / "k.sqlite", durable=False).close()
    assert not keyfile.key_file_path(tmp_path / "k.sqlite").exists()
