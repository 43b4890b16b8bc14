"""Demo scenario: boot a virtual board of each profile, deploy, self-test, read status."""
from __future__ import annotations

from tessera.boards import ops, profile
from tessera.boards.virtual import VirtualBoard
from tessera.demo import DemoContext

TITLE = "Virtual boards: deploy firmware and run the self-test"
ORDER = 0


def run(ctx: DemoContext) -> None:
    for prof in profile.load_all():
        vb = VirtualBoard(f"demo-{prof.name}", prof.name)
        vb.stop()
        port = vb.start(fresh=True)
        ctx.cleanups.append(vb.stop)
        ctx.step(f"virtual {prof.name} on {port} with a {prof.heap_bytes}-byte heap")
        target = ops.Target(prof, port, virtual=True)
        res = ops.deploy(target)
        st = ops.selftest(target)
        if not st.passed:
            raise RuntimeError(f"{prof.name} self-test failed: {st.summary}")
        info = ops.status(target)
        ctx.boards[prof.name] = target
        ctx.fact(f"{prof.name}: {len(res.files)} modules deployed, {st.summary}, mem_free {info['mem_free']}")
