"""Who holds a UDP port: the guard that keeps two virtual boards off one port.

The firmware sets SO_REUSEADDR on its UDP socket (a real board restarting its device must
rebind at once), so on one host Linux lets two virtual boards bind the same 127.0.0.1 port
and hands each datagram to only one of them: the other board silently stops hearing its
KSN. Before a virtual board boots with a port, the tooling therefore binds that port itself
WITHOUT SO_REUSEADDR (which fails while any socket holds it) and names the holder from
/proc/net/udp and the processes' open sockets where it can.
"""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


def port_free(port: int, bind: str = "127.0.0.1") -> bool:
    """Whether UDP `port` on `bind` can be bound exclusively right now."""
    fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        try:
            s.bind((bind, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _socket_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            try:
                if int(f[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f[9])
            except (IndexError, ValueError):
                continue
    return inodes


def holders(port: int) -> list[int]:
    """PIDs of the processes (visible to us) with a UDP socket on `port`."""
    inodes = _socket_inodes(port)
    if not inodes:
        return []
    wanted = {f"socket:[{i}]" for i in inodes}
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            for fd in os.scandir(d / "fd"):
                try:
                    if os.readlink(fd.path) in wanted:
                        pids.append(int(d.name))
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return sorted(pids)


def describe(pid: int) -> str:
    """'pid N (command line) in DIR' for an error message."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = "?"
    if len(cmd) > 120:
        cmd = cmd[:117] + "..."
    return f"pid {pid} ({cmd}) in {cwd}"
