# The board RMA's receiving application (docs/rmcp2.md "Board content reception"; the
# contract of issue 13, defined by this project): where the plaintext of content packets
# goes once content.Receiver has checked and decrypted them. board_tree.Tree calls
#   stream(mv)         a stream payload (mv valid only during the call)
#   begin(n, size)     object number n (1, 2, ... since the board started) of `size` bytes
#   data(mv)           the next chunk of the object (unconfirmed until end())
#   end(n)             OBJ_END's SHA-256 matched: the object is whole
#   abort()            the object in progress failed (digest, framing, its link lost)
#   close()            the control link ended (files closed)
# Any object with these methods can replace FileSink (Runner(sink=...), Tree(sink=...)).
import os

DIR = "rx"


class FileSink:
    """The default sink of the virtual boards: stream payloads appended to rx/stream.bin,
    each object written to rx/obj-<n>.part and renamed rx/obj-<n>.bin only after OBJ_END's
    digest verified (deleted on failure), so a .bin file is always a whole, verified object."""

    def __init__(self, d=DIR):
        self.d = d
        try:
            os.mkdir(d)
        except OSError:  # EEXIST: kept from an earlier run
            pass
        self.sf = None  # rx/stream.bin, opened at the first stream payload
        self.of = None  # the object being received
        self.part = None

    def stream(self, mv):
        f = self.sf
        if f is None:
            f = self.sf = open(self.d + "/stream.bin", "ab")
        f.write(mv)
        f.flush()

    def begin(self, n, size):
        self.abort()  # a BEGIN ends any object left open (content.Receiver starts anew)
        self.part = "%s/obj-%d.part" % (self.d, n)
        self.of = open(self.part, "wb")

    def data(self, mv):
        if self.of is not None:
            self.of.write(mv)

    def end(self, n):
        f = self.of
        if f is None:
            return False
        f.close()
        self.of = None
        os.rename(self.part, "%s/obj-%d.bin" % (self.d, n))
        self.part = None
        return True

    def abort(self):
        f = self.of
        if f is None:
            return
        self.of = None
        f.close()
        try:
            os.remove(self.part)
        except OSError:
            pass
        self.part = None

    def close(self):
        self.abort()
        if self.sf is not None:
            self.sf.close()
            self.sf = None
