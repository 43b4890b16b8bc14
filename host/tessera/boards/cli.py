"""`tessera board`: build, deploy to, test and inspect boards, real or virtual.

A thin layer over the public API (tessera.api.boards.Board), so that the command and a
script behave alike; only `build`, the profile list and `repl` are not board operations of
the API."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from tessera.api.boards import Board, BoardError, BridgeStatus, virtual_boards
from tessera.boards import build, profile
from tessera.boards.remote import Remote
from tessera.errors import TesseraError

log = logging.getLogger("tessera.board")


def _add_target(p: argparse.ArgumentParser, need_board: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--port", help="serial port of a real board, e.g. /dev/ttyACM0")
    g.add_argument("--virtual", metavar="BOARD", help="a virtual board of this profile (started if needed)")
    p.add_argument("--board", help="board profile of the real board on --port" + (" (required)" if need_board else ""))


def resolve_board(args: argparse.Namespace, need_board: bool = False) -> Board:
    if args.virtual:
        b = Board.virtual(args.virtual, args.virtual)
        was = b.is_running()
        b.start()
        if not was:
            log.info("started virtual %s on %s (heap %d bytes)", b.profile.name, b.port, b.profile.heap_bytes)
        return b
    if need_board and not args.board:
        raise TesseraError("--board is required with --port (it selects the mpy-cross arch and budgets)")
    return Board.serial(args.port, args.board or "esp32")


def _running() -> list[tuple[Board, BridgeStatus]]:
    out = []
    for b in virtual_boards():
        try:
            br = b.bridge()
        except BoardError:  # stopped since it was listed
            continue
        if br is not None:
            out.append((b, br))
    return out


def cmd_list(args: argparse.Namespace) -> int:
    for p in profile.load_all():
        print(f"{p.name:8} {p.mpy_arch:9} heap {p.heap_bytes:7d} B  flash budget {p.flash_budget_bytes:7d} B  {p.description}")
    for b, br in _running():
        print(f"virtual {b.name}: {_describe(b, br)}")
    return 0


def _describe(b: Board, br: BridgeStatus) -> str:
    speed = f"board speed ({br.slowdown}x slower than this machine)" if br.slowdown else "fast"
    udp = f", udp {br.udp_port}" if br.udp_port else ""
    return (f"board {b.profile.name} on {br.pty}, {speed}, heap {b.profile.heap_bytes}, boots {br.boots}{udp}, "
            f"console dropped {br.console_dropped} B, fs {br.fs}")


def cmd_build(args: argparse.Namespace) -> int:
    profs = profile.load_all() if args.all or not args.board else [profile.load(args.board)]
    failed = False
    for p in profs:
        res = build.compile_firmware(p.mpy_arch)
        pct = 100.0 * res.total / p.flash_budget_bytes
        print(f"{p.name}: {len(res.files)} modules, {res.total} bytes of .mpy ({p.mpy_arch}) = "
              f"{pct:.1f}% of the {p.flash_budget_bytes}-byte budget -> {res.out_dir}")
        if args.verbose_sizes:
            for rel, size in res.files:
                print(f"    {size:6d}  {rel}")
        try:
            build.check_budget(p, res)
        except TesseraError as exc:
            log.error("%s", exc)
            failed = True
        path = build.write_package_json(p)
        log.debug("wrote %s", path)
    return 1 if failed else 0


def cmd_virtual(args: argparse.Namespace) -> int:
    if args.action == "list":
        for b, br in _running():
            print(f"{b.name}: {_describe(b, br)}")
        return 0
    if not args.board:
        raise TesseraError(f"virtual {args.action} needs a BOARD ({', '.join(profile.board_names())})")
    b = Board.virtual(args.name or args.board, args.board)
    if args.action == "start":
        print(b.start(fresh=args.fresh, speed=args.speed).port)
    elif args.action == "stop":
        print("stopped" if b.stop() else "not running")
    elif args.action == "power-cut":
        if args.speed is not None:  # the speed the board boots again at
            b.set_speed(args.speed)
        b.power_cut(args.wait_udp, args.timeout)
        br = b.bridge()
        print(f"booted again (boot {br.boots}, {br.speed})" if br else "booted again")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    # progress: Board.deploy logs each file (INFO) when given no callback of its own
    resolve_board(args, need_board=True).deploy(with_main=args.main)
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    res = resolve_board(args).selftest(on_line=print)  # each line as the board prints it
    return 0 if res.passed else 1


def cmd_status(args: argparse.Namespace) -> int:
    st = resolve_board(args).status().raw
    if args.json:
        print(json.dumps(st))
    else:
        for k, v in st.items():
            print(f"{k:15} {v}")
    return 0


def cmd_repl(args: argparse.Namespace) -> int:
    board = resolve_board(args)  # the API has no interactive REPL: mpremote's own terminal
    if not sys.stdin.isatty():
        raise TesseraError("repl needs an interactive terminal")
    return Remote(board.port).repl()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("board", help="build, deploy, self-test and inspect boards (real or virtual)",
                       description="Work with MicroPython boards. A real board is reached with --port; "
                       "--virtual BOARD uses (and starts if needed) a virtual board of that profile.")
    s = p.add_subparsers(dest="board_cmd", metavar="ACTION", required=True)

    q = s.add_parser("list", help="board profiles and running virtual boards")
    q.set_defaults(func=cmd_list)

    q = s.add_parser("build", help="mpy-cross the firmware per board arch and check flash budgets")
    q.add_argument("--board", help="one board profile (default: all)")
    q.add_argument("--all", action="store_true", help="every board profile")
    q.add_argument("--sizes", dest="verbose_sizes", action="store_true", help="list every module's size")
    q.set_defaults(func=cmd_build)

    q = s.add_parser("virtual", help="start, stop, power-cut or list virtual boards (pty + MicroPython unix port)")
    q.add_argument("action", choices=["start", "stop", "list", "power-cut"],
                   help="start or stop a virtual board, cut its power (kill its interpreter with no clean-up and "
                   "wait until it has booted again), or list the running ones")
    q.add_argument("board", nargs="?", help="board profile: heap limit and name")
    q.add_argument("--name", help="instance name (default: the board name); several can run at once")
    q.add_argument("--fresh", action="store_true", help="wipe the board's filesystem first")
    q.add_argument("--speed", choices=["fast", "board"], default=None,
                   help="fast: this machine's speed (default for a new board); board: throttled so that the "
                   "firmware's DH takes as long as on the real board (also switches a running board; with "
                   "power-cut, the speed it boots again at)")
    q.add_argument("--wait-udp", type=int, metavar="PORT",
                   help="power-cut: also wait until the firmware holds this UDP port on 127.0.0.1 again")
    q.add_argument("--timeout", type=float, default=15.0,
                   help="power-cut: seconds to wait for the reboot (default 15; more at board speed)")
    q.set_defaults(func=cmd_virtual)

    q = s.add_parser("deploy", help="compile and copy the firmware to a board, with progress")
    _add_target(q, need_board=True)
    q.add_argument("--main", action="store_true", help="also install firmware/boot.py (WLAN from wlan.json) and main.py (self-test, then SCPM when scpm.json exists)")
    q.set_defaults(func=cmd_deploy)

    q = s.add_parser("selftest", help="run the firmware self-test on the board")
    _add_target(q)
    q.set_defaults(func=cmd_selftest)

    q = s.add_parser("status", help="firmware version, memory and files on the board")
    _add_target(q)
    q.add_argument("--json", action="store_true", help="print the raw JSON status")
    q.set_defaults(func=cmd_status)

    q = s.add_parser("repl", help="open the board's REPL (Ctrl-] to leave)")
    _add_target(q)
    q.set_defaults(func=cmd_repl)
