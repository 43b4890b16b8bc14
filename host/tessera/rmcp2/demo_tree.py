"""Demo scenario: the whole secure RMCP-2 tree, content from the SMA to boards (issue 13).

One session on loopback: an SM, an SMA whose content source makes and rotates Kc, and two
DMAs linked upstream to it: `dma1` in this process (the public API) and `dma2` a separate
`tessera dma` process, so that it can be killed. Three virtual boards boot the firmware
from main.py with an rmcp2.json: each is admitted by the SM over TLS, joins its first
candidate DMA (Annex E, K_MAS, Kg) and announces its content ports (CONTENT_ADDR). Then:

1. a file (a reliable object over TCP) and a stream (UDP) sent by the SMA reach every board
   through the two DMAs, which relay the ciphertext unchanged; each board decrypts and
   writes them to its filesystem, compared here byte for byte;
2. a board leaves (interrupted: LEAVREQ under K_MAS); its DMA re-keys the group (BACKWARD:
   a fresh Kg to the remaining member) and asks the SMA for a fresh Kc (KCREQ), and the next
   file, under that Kc, reaches the others;
3. dma2 is killed (SIGKILL, no goodbye): its board re-grafts to its next candidate, dma1,
   with a fresh Annex E and no new admission, and content reaches it there.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from tessera.api.boards import Board
from tessera.api.rmcp2 import AsyncMaAgent, AsyncSessionManager, SmSettings, make_sm_pki
from tessera.demo import DemoContext
from tessera.rmcp2 import codec as C
from tessera.rmcp2.demo import DIR, _install_identity

TITLE = ("Secure RMCP-2 whole tree: a file and a stream from the SMA through two DMAs to three boards; "
         "a board leaves and the group re-keys; a DMA is killed and its board re-grafts")
ORDER = 55
STREAM_PACKETS = 20


def run(ctx: DemoContext) -> None:
    if not ctx.boards:
        raise RuntimeError("no virtual boards (the board scenario must run first)")
    asyncio.run(_run(ctx))  # every wait in it has its own deadline; the clean-up is never cut short


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Dma2:
    """`tessera dma` in its own process, its log read line by line."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._task: asyncio.Task | None = None

    async def start(self, ep, sid: int, pki: Path, tree_port: int, sma_port: int) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tessera", "dma", "--sm", f"{ep.host}:{ep.tls_port}", "--plain-port",
            str(ep.plain_port), "--session-id", f"{sid:016x}", "--pki-dir", str(pki), "--name", "dma2",
            "--instance", "3", "--tree-port", str(tree_port), "--sma", f"127.0.0.1:{sma_port}", "--hrs-refresh", "0.5",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip())

    def saw(self, text: str) -> bool:
        return any(text in ln for ln in self.lines)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)


async def _until(cond, timeout: float, what: str, boards: list[Board] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            got = "; ".join(f"{b.name}: " + ", ".join(f"{p.name} {p.stat().st_size} B" for p in sorted((b.files / "rx").glob("*")))
                            for b in boards or [] if (b.files / "rx").is_dir())
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (received: {got})" if got else ""))
        await asyncio.sleep(0.1)


def _rx(board: Board, name: str) -> bytes:
    p = board.files / "rx" / name
    return p.read_bytes() if p.exists() else b""


def _board_config(board: Board, sid: int, maid: bytes, sm_port: int, dmas: list[tuple[int, bytes]]) -> None:
    shutil.rmtree(board.files / "rx", ignore_errors=True)
    conf = {"sm_host": "127.0.0.1", "sm_port": sm_port, "session_id": f"{sid:016x}", "maid": maid.hex(),
            "cert": f"{DIR}/rma.der", "key": f"{DIR}/rma.key.der", "ca": f"{DIR}/ca.der",
            "timeout_s": 20, "backoff_s": [0.2, 2],
            "dmas": [["127.0.0.1", port, m.hex()] for port, m in dmas], "content": {"udp": 0, "tcp": 0}}
    (board.files / "rmcp2.json").write_text(json.dumps(conf))


async def _run(ctx: DemoContext) -> None:
    t0 = time.monotonic()
    boards = [Board.virtual(f"demo-{name}", name) for name in sorted(ctx.boards)]
    extra = Board.virtual("demo-tree-esp32", "esp32")  # a third board, made for this scenario
    boards.append(extra)
    names = [f"rma-tree-{i}" for i in range(len(boards))]
    pki = ctx.workdir / DIR / "tree-pki"
    make_sm_pki(pki, ["sm", "sma", "dma1", "dma2"] + names)
    sid = secrets.randbits(63) | 1
    sm = AsyncSessionManager.open(ctx.workdir / DIR / "sm-tree.sqlite", SmSettings(sid, agree_time=3.0))
    agents: list[AsyncMaAgent] = []
    dma2 = _Dma2()
    try:
        await asyncio.to_thread(extra.start, True)
        await asyncio.to_thread(extra.deploy, True)
        ep = await sm.serve(pki, tick=0.1)
        kw = dict(tick=0.1, retry=0.2, hrs_refresh=0.5)
        sma = AsyncMaAgent("sma", ep, sid, pki, "sma", group="open", gk_mecha=int(C.GkMecha.BACKWARD), instance=1, **kw)
        dma1 = AsyncMaAgent("dma", ep, sid, pki, "dma1", instance=2, **kw)
        agents = [sma, dma1]
        for a in agents:
            await a.begin()
        for a in agents:
            await a.start(timeout=30)
        source = await sma.start_source(port=0, urgent_lead=1.0, urgent_gap=0.5)
        dma1_port = await dma1.start_tree(port=0, sma=f"127.0.0.1:{source.port}", tick=0.1)
        dma2_port = _free_port()
        await dma2.start(ep, sid, pki, dma2_port, source.port)  # admitted after the policy is set (B.13)
        await source.wait_for_dmas(2, 30)
        dma1_maid, dma2_maid = dma1.maid, C.make_maid("127.0.0.1", 26032, 3)  # MAIDs differ by instance (B.1)
        ctx.step(f"session {sid:#018x}: SM on {ep.address}; SMA content source on tree port {source.port} "
                 f"(Kc gen {source.status().kc_gen}); dma1 (this process, tree port {dma1_port}) and dma2 "
                 f"(`tessera dma` pid {dma2.proc.pid}, tree port {dma2_port}) linked upstream (PPROBREQ + "
                 "CONTENT_ADDR under Ks), GK_MECHA BACKWARD")

        maids = [C.make_maid("127.0.0.1", 26032, 0x300 + i) for i in range(len(boards))]
        first = [dma2, dma1, dma1]  # board 0 starts under dma2, the others under dma1
        for i, b in enumerate(boards):
            _install_identity(b, pki, names[i])
            cands = [(dma2_port, dma2_maid), (dma1_port, dma1_maid)] if first[i] is dma2 else \
                [(dma1_port, dma1_maid), (dma2_port, dma2_maid)]
            _board_config(b, sid, maids[i], ep.tls_port, cands)
            if b is not extra:
                await asyncio.to_thread(b.deploy, True)
        for b in boards:  # boots main.py: self-test, then the RMA of rmcp2.json
            await asyncio.to_thread(b.power_cut)

        def on_dma1(i: int) -> bool:
            st = dma1.tree_status()
            return st is not None and maids[i] in st.subscribers

        await _until(lambda: dma2.saw(f"member {maids[0].hex()} takes content"), 60, "board 0 on dma2")
        await _until(lambda: on_dma1(1) and on_dma1(2), 60, "boards 1 and 2 on dma1")
        for i, b in enumerate(boards):
            ctx.step(f"{b.profile.name} board {b.name}: booted, admitted over TLS, joined "
                     f"{'dma2' if first[i] is dma2 else 'dma1'} (Annex E), content ports announced")

        # 1. a file and a stream through both DMAs
        sent_stream = b""
        file1 = os.urandom(40_000)
        await source.send_object(file1)
        for n in range(STREAM_PACKETS):
            p = f"stream packet {n:03d} ".encode() + os.urandom(900)
            source.stream(p)
            sent_stream += p
            await asyncio.sleep(0.01)
        await _until(lambda: all(_rx(b, "obj-1.bin") == file1 and _rx(b, "stream.bin") == sent_stream for b in boards),
                     30, "the file and the stream at every board", boards)
        kc1 = source.status().kc_gen
        ctx.fact(f"a {len(file1)} B file (SHA-256 {hashlib.sha256(file1).hexdigest()[:16]}...) and "
                 f"{STREAM_PACKETS} stream packets arrived byte-exact at all {len(boards)} boards through two DMAs "
                 f"(Kc gen {kc1}; the DMAs relay the ciphertext unchanged, decrypting nothing)")

        # 2. board 2 leaves; its DMA re-keys and asks for a fresh Kc
        kg_before = dma1.tree_status().kg_gen
        urgent_before = source.status().urgent_rotations
        leaver = boards[2]
        await asyncio.to_thread(leaver.run, "print('interrupted')")  # Ctrl-C: LEAVREQ under K_MAS
        await _until(lambda: maids[2] not in dma1.tree_status().members, 30, "the leave at dma1")
        await _until(lambda: source.status().kc_gen > kc1, 30, "the fresh Kc in use at the SMA")
        st = dma1.tree_status()
        kc2 = source.status().kc_gen
        ctx.step(f"board {leaver.name} left dma1 ({st.left}); Kg gen {kg_before} -> {st.kg_gen} "
                 f"(BACKWARD re-keys {st.rotations.get('backward', 0)}), KCREQ -> urgent Kc rotations "
                 f"{urgent_before} -> {source.status().urgent_rotations}, Kc gen {kc1} -> {kc2}")
        file2 = os.urandom(30_000)
        await source.send_object(file2)
        stay = boards[:2]
        await _until(lambda: all(_rx(b, "obj-2.bin") == file2 for b in stay), 30, "the second file", boards)
        if _rx(leaver, "obj-2.bin"):
            raise RuntimeError("the board that left received content sent after its leave")
        ctx.fact(f"after {leaver.name} left: Kg re-keyed (gen {kg_before} -> {st.kg_gen}), Kc gen {kc2} in use; "
                 f"the next file reached the {len(stay)} remaining boards, not the one that left")

        # 3. dma2 killed: its board re-grafts to dma1
        await dma2.kill()
        ctx.step(f"dma2 (pid {dma2.proc.pid}) killed with SIGKILL")
        t_kill = time.monotonic()
        await _until(lambda: on_dma1(0), 60, "board 0 re-grafted to dma1")
        ctx.step(f"board {boards[0].name} re-grafted to dma1 in {time.monotonic() - t_kill:.1f} s "
                 "(fresh Annex E, no new admission)")
        file3 = os.urandom(20_000)
        packets = [f"after the re-graft {n:03d} ".encode() + os.urandom(500) for n in range(5)]
        tail = b"".join(packets)
        await source.send_object(file3)
        for p in packets:
            source.stream(p)
            await asyncio.sleep(0.01)
        await _until(lambda: all(_rx(b, "obj-3.bin") == file3 for b in stay)
                     and all(_rx(b, "stream.bin") == sent_stream + tail for b in stay), 30,
                     "content after the re-graft", boards)
        ctx.fact(f"dma2 killed: {boards[0].name} re-grafted to dma1 and the next file and stream arrived "
                 f"byte-exact at both remaining boards ({time.monotonic() - t0:.1f} s in all)")
    finally:
        await dma2.kill()
        for a in agents:
            with contextlib.suppress(Exception):
                await a.close()
        await sm.close()
        for b in boards:
            await asyncio.to_thread(_cleanup, b, b is extra)


def _cleanup(board: Board, stop: bool) -> None:
    """The board back as the board scenario left it: no rmcp2.json (its main.py no longer
    runs the RMA), no key file, no received content."""
    from tessera.rmcp2.demo import _cleanup as remove_identity

    (board.files / "rmcp2.json").unlink(missing_ok=True)
    shutil.rmtree(board.files / "rx", ignore_errors=True)
    remove_identity(board)
    with contextlib.suppress(Exception):
        if stop:
            board.stop()
        else:
            board.power_cut()
