# Runs inside MicroPython: throughput of the firmware crypto core against the bare
# cryptolib/hashlib calls on the same data, in the same run. Prints JSON lines.
import gc
import hashlib
import json
import sys
import time

sys.path.insert(0, sys.argv[1] + "/firmware")
try:
    import cryptolib
except ImportError:
    import ucryptolib as cryptolib
from tessera_fw.crypto import aes, dh, hmac

KEY = bytes(range(16))
IV = bytes(16)


def timeit(fn, n):
    gc.collect()
    t0 = time.ticks_us()
    for _ in range(n):
        fn()
    return time.ticks_diff(time.ticks_us(), t0) / n


def best(fn, n, rounds=5):
    return min(timeit(fn, n) for _ in range(rounds))


def emit(**kw):
    print(json.dumps(kw))


for size in (64, 256, 1024):
    data = bytes(size)
    out = bytearray(size)
    n = max(20, 40000 // size)
    # AES-CBC: wrapper (checks + object) vs one bare cryptolib object per message
    raw = best(lambda: cryptolib.aes(KEY, 2, IV).encrypt(data, out), n)
    ours = best(lambda: aes.cbc_encrypt(KEY, IV, data, out), n)
    emit(op="aes-cbc-encrypt", size=size, ours_us=ours, raw_us=raw)
    # CTR from ECB vs the ECB calls on the same number of blocks (the floor for CTR here)
    ctr = aes.CTR(KEY, bytes(16), chunk=16)
    ecb = cryptolib.aes(KEY, 1)
    raw = best(lambda: ecb.encrypt(data, out), n)
    ours = best(lambda: ctr.crypt(data, out), n)
    emit(op="aes-ctr-from-ecb", size=size, ours_us=ours, raw_us=raw)
    # HMAC-SHA-256: ours (no hash copy() on boards) vs the two bare hashlib passes it needs
    h = hmac.HMAC(KEY, "sha256")
    ipad = bytes(64)

    def bare():
        a = hashlib.sha256(ipad)
        a.update(data)
        b = hashlib.sha256(ipad)
        b.update(a.digest())
        return b.digest()

    raw = best(bare, n)
    ours = best(lambda: h.digest(data), n)
    emit(op="hmac-sha256", size=size, ours_us=ours, raw_us=raw)

for bits in (256, 2048):
    t0 = time.ticks_ms()
    d = dh.DH(exp_bits=bits)
    gen = time.ticks_diff(time.ticks_ms(), t0)
    peer = dh.DH()
    t0 = time.ticks_ms()
    d.shared(peer.public)
    agree = time.ticks_diff(time.ticks_ms(), t0)
    emit(op="dh-group14", exp_bits=bits, keygen_ms=gen, agree_ms=agree)

# Peak heap of the self-test: lowest gc.mem_free seen while it runs, relative to the start.
import tessera_fw.selftest as st

gc.collect()
free0 = gc.mem_free()
lines = []
ok = st.run(out=lines.append)
emit(op="selftest", ok=ok, summary=lines[-1], heap_total=gc.mem_free() + gc.mem_alloc(), free_before=free0)
