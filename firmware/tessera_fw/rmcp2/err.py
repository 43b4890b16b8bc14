# The firmware codec's one exception, apart from const.py so that the RMA path does not
# load const.py's ~100 public names (5.4 KB of heap on the unix port, docs/benchmarks.md).


class Rmcp2Error(Exception):
    """One error number of profile B.12 in `code`; no key material in it."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code
