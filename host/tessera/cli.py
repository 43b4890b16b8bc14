"""The `tessera` command.

Subcommands are discovered: every subpackage `tessera.<name>` with a `cli` module that
defines `register(subparsers)` adds its own command group, so a protocol lands without
touching this file.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import pkgutil
import sys

import tessera
from tessera.errors import TesseraError

log = logging.getLogger("tessera")


def _command_modules():
    names = sorted(m.name for m in pkgutil.iter_modules(tessera.__path__) if m.ispkg)
    for name in names:
        spec = importlib.util.find_spec(f"tessera.{name}.cli")
        if spec is not None:
            yield importlib.import_module(f"tessera.{name}.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera",
        description="Tessera: SCPM key setting node, ASM peer, "
        "BCAST SP-4 over SimulCrypt, and MicroPython board tooling (secure RMCP-2: the session manager, agents and the board RMA's control plane; no tree join or content yet).",
    )
    parser.add_argument("--version", action="version", version=f"tessera {tessera.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from tessera import demo

    demo.register(sub)
    for mod in _command_modules():
        mod.register(sub)
    return parser


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(message)s" if verbose == 0 else "%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        rc = args.func(args)
    except TesseraError as exc:
        log.error("error: %s", exc)
        return 2
    except OSError as exc:  # a file or socket problem a command did not foresee: still one clean line
        log.debug("unexpected OSError", exc_info=True)
        log.error("error: %s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    return int(rc or 0)
