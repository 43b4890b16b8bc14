"""The exceptions of the public API: every failure is a TesseraError (the CLI prints its
message and exits with status 2); the subclasses say which failure it was, so a script can
catch exactly what it can handle."""
from __future__ import annotations

from tessera.errors import TesseraError


class BoardError(TesseraError):
    """A board did not answer, refused a command, or the code run on it failed."""


class KsnError(TesseraError):
    """A failure of the SCPM key setting node. When a command went through a running
    `tessera ksn serve`, only the message of the server's failure is known and this base
    class is raised; in-process, one of the subclasses below."""


class NoDatabase(KsnError):
    """No KSN database at the path given (and `create=True` was not asked)."""


class KsnBusy(KsnError):
    """Another process owns the database (only one KSN process may use a database)."""


class InvalidKey(KsnError, ValueError):
    """A key given to the API is not 16 bytes. The value itself is never repeated."""


class UnknownDevice(KsnError):
    """The device address is not in the KSN's registry (enrol it first)."""

    def __init__(self, addr: int) -> None:
        self.addr = addr
        super().__init__(f"unknown device 0x{addr:08X} (enrol it first)")


class DeviceError(KsnError):
    """A transaction with one device failed: it timed out, its answer failed a check, or the
    device refused the request. `code` is the profile's error (docs/scpm-profile.md
    section 8), e.g. ErrorCode.AUTHORITY for a property write under too weak a key."""

    def __init__(self, addr: int, code: int | None, message: str) -> None:
        self.addr = addr
        self.code = code
        super().__init__(message)


class BatchFailed(KsnError):
    """An operation on several devices failed on some of them: `failed` holds the device
    addresses that failed (in-process; None through a running server), `results` the
    values of those that succeeded."""

    def __init__(self, message: str, failed: list[int] | None, results: list | None = None) -> None:
        self.failed = failed
        self.results = results or []
        super().__init__(message)


__all__ = ["TesseraError", "BoardError", "KsnError", "NoDatabase", "KsnBusy", "InvalidKey", "UnknownDevice",
           "DeviceError", "BatchFailed"]
