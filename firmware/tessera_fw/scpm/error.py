# SCPMError and the error names of docs/scpm-profile.md section 8, apart from const.py: the
# device raises and counts errors by number only and loads neither const.py's public names
# nor a table of name strings (issue 9 #9: a public name costs a dict entry and a qstr on
# the board's heap). The names are built only where they are printed (str(e), udp's log).
_NAMES = ("TRUNCATED LENGTH OVERSIZE HEADER SHD ALGORITHM NOT_FOR_ME NO_KEY SNF REPLAY TOO_OLD "
          "MAC PADDING BCC AUTHORITY WRONG_KSN STATE MALFORMED DH CONFIRM SNF_EXHAUSTED "
          "UNKNOWN_OP PEERS_FULL")  # numbers 1-23 in order (const.py ERR_*)


def name(code):
    """"ERR_MAC" for 12, "OK" for 0, "ERR_99" for a number the profile does not define."""
    if code == 0:
        return "OK"
    names = _NAMES.split()
    return "ERR_" + (names[code - 1] if 0 < code <= len(names) else "%d" % code)


class SCPMError(Exception):
    """A protocol error: `code` is the section 8 number. Messages never carry key material."""

    def __init__(self, code, detail=0):
        super().__init__(code)
        self.code = code
        self.detail = detail

    def __str__(self):
        return name(self.code)
