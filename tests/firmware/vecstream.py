# Streaming reads of the JSON vector files (tests/vectors/) inside MicroPython, for the
# firmware tests: the files do not fit a board heap. Kept apart from the SCPM helpers so that
# a test can use it without importing the SCPM stack (fwtest_rmcp2_join.py at 112 KB).
import io


class _Slice(io.IOBase):
    """A stream over the next n bytes of a file, read in small pieces into one buffer.
    json.load reads a byte at a time: a slice per byte would churn the heap while the
    parser grows a long string (a 4 KB hex frame), and a board heap that fragmented
    cannot find the 4 KB in one piece."""

    def __init__(self, f, n):
        self.f = f
        self.n = n
        self.buf = bytearray(256)
        self.len = self.pos = 0

    def readinto(self, out):
        if self.pos >= self.len:
            if self.n <= 0:
                return 0
            self.len = self.f.readinto(memoryview(self.buf)[:min(256, self.n)])
            self.n -= self.len
            self.pos = 0
        if len(out) == 1:
            out[0] = self.buf[self.pos]
            self.pos += 1
            return 1
        k = min(len(out), self.len - self.pos)
        out[:k] = memoryview(self.buf)[self.pos:self.pos + k]
        self.pos += k
        return k

    def read(self, n=-1):  # CPython's json.load reads the whole stream
        rest = bytes(self.buf[self.pos:self.len]) + self.f.read(self.n)
        self.n = 0
        self.pos = self.len
        return rest.decode()


def iter_array(rel, member):
    """Yield the elements (objects) of the top-level array `member` of a JSON file under
    tests/vectors/, parsed one at a time: the whole file does not fit a board heap. Each
    element is located by a byte scan, then read back in one piece (no growing buffers)."""
    import gc
    import json

    import mpytest

    depth = 0
    in_str = esc = False
    key = bytearray()
    last_key = b""
    want = member.encode()
    inside = False  # in the wanted array
    start = -1
    base = 0
    with open(mpytest.ROOT + "/tests/vectors/" + rel, "rb") as f:
        chunk = bytearray(1024)  # reused: no allocation per read
        while True:
            got = f.readinto(chunk)
            if not got:
                break
            for i in range(got):
                c = chunk[i]
                if in_str:
                    if esc:
                        esc = False
                    elif c == 0x5C:  # backslash
                        esc = True
                    elif c == 0x22:
                        in_str = False
                    elif depth == 1:
                        key.append(c)
                    continue
                if c == 0x22:
                    in_str = True
                    if depth == 1:
                        key = bytearray()
                elif c == 0x3A and depth == 1:  # ':'
                    last_key = bytes(key)
                elif c == 0x7B or c == 0x5B:  # { [
                    depth += 1
                    if depth == 2 and c == 0x5B and last_key == want:
                        inside = True
                    elif depth == 3 and inside and c == 0x7B:
                        start = base + i
                elif c == 0x7D or c == 0x5D:  # } ]
                    depth -= 1
                    if depth == 2 and start >= 0:
                        here = f.tell()
                        gc.collect()
                        f.seek(start)
                        obj = json.load(_Slice(f, base + i + 1 - start))  # streamed parse
                        f.seek(here)
                        start = -1
                        yield obj
                    elif depth == 1 and inside:
                        return
            base += got
