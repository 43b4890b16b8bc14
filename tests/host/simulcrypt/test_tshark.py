"""Interoperability: traffic of every ECMG<->SCS and EMMG<->MUX message type, recorded by a
loopback proxy in this test, written to a pcap and dissected by tshark's SimulCrypt
dissector (an independent implementation): every message and parameter appears as sent
(type and length, in order) and nothing is flagged malformed. CI installs tshark
(.ci/run, CI=true) and there a missing tshark fails the test; elsewhere the traffic is still
recorded and checked with our own decoder, and only the dissection is skipped with a
one-line hint on how to enable it (conftest.tshark_or_skip)."""
import asyncio
import subprocess
import xml.etree.ElementTree as ET

from .conftest import DRM, FAST, eventually, run, tshark_or_skip
from .pcapwrite import Flow, PcapWriter

from tessera.simulcrypt.codec import Framer, parse
from tessera.simulcrypt.ecmg import StkmGenerator
from tessera.simulcrypt.emmg import LtkmGenerator, make_ltkms
from tessera.simulcrypt.engine import State
from tessera.simulcrypt.mux import Multiplexer
from tessera.simulcrypt.scs import GeneratorSpec, Scs
from tessera.simulcrypt.tables import EM, EP, MESSAGES, MM, MP, Interface

CLIENT = 0x00010007
# Fixed ports in the synthetic pcap (the live test used ephemeral ones).
ECMG_PORT, MUX_PORT, MUX_UDP = 2001, 2002, 2003


class RecordingProxy:
    """Forwards one upstream service and records (connection, from_client, bytes) in order."""

    def __init__(self, host, port, log):
        self.up = (host, port)
        self.log = log
        self.n = 0
        self.server = None
        self.port = None

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, r, w):
        conn = (self.up[1], self.n)
        self.n += 1
        ur, uw = await asyncio.open_connection(*self.up)
        self.log.append((conn, "open", b""))

        async def pump(src, dst, from_client):
            try:
                while data := await src.read(65536):
                    self.log.append((conn, from_client, data))
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                if not dst.is_closing():
                    dst.close()

        await asyncio.gather(pump(r, uw, True), pump(ur, w, False))

    async def close(self):
        self.server.close()
        await self.server.wait_closed()


def test_tshark_decodes_every_message(tmp_path, keystore):
    log = []
    udp_sent = []

    async def main():
        gen = StkmGenerator(keystore, {DRM}, FAST)
        mux = Multiplexer(total_kbps=16)
        await gen.start(), await mux.start()
        p1, p2 = RecordingProxy("127.0.0.1", gen.port, log), RecordingProxy("127.0.0.1", mux.port, log)
        await p1.start(), await p2.start()
        # ECMG <-> SCS: setup, two crypto-periods with CW_encryption, tests, errors, close
        scs = Scs("svc", [GeneratorSpec("127.0.0.1", p1.port, DRM, 7, 3, 0x101,
                                        cw_key=keystore.current("CWT", DRM, 0))], cp_duration=2)
        await scs.start()
        await scs.run(2)
        assert await scs.test_channels() == {DRM: True}
        link = scs.links[0]
        link.conn.send(EM.CHANNEL_TEST, [(EP.ECM_CHANNEL_ID, 99)])          # -> channel_error
        link.conn.send(EM.STREAM_TEST, [(EP.ECM_CHANNEL_ID, 7), (EP.ECM_STREAM_ID, 42)])  # -> stream_error
        link.writer.write(link.conn.data_to_send())
        await eventually(lambda: len(link.conn.framer._buf) == 0 and sum(1 for c, d, b in log if c[0] == gen.port
                                                                          and d is False) >= 6)
        await asyncio.sleep(0.1)
        await scs.close()
        # EMMG <-> MUX
        g = LtkmGenerator(CLIENT, 3, 4, 0x21)
        await g.connect("127.0.0.1", p2.port)
        await g.request_bandwidth(8)
        ltkms = make_ltkms(keystore, CLIENT, 0x21, 1, DRM, 0x101, count=3)
        await g.send(ltkms[:2], per_message=2)
        msg = g.conn.data_provision_msg(4, ltkms[2:]).encode()
        udp_sent.append(msg)
        await g.open_udp("127.0.0.1", mux.udp_port)
        g._udp.sendto(msg)
        await eventually(lambda: len(mux.received) == 3)
        assert await g.test()
        g.conn.send(MM.STREAM_TEST, g.conn._p() + [(MP.DATA_STREAM_ID, 4)])
        g.conn.send(MM.CHANNEL_TEST, [(MP.CLIENT_ID, CLIENT), (MP.DATA_CHANNEL_ID, 77)])  # -> channel_error
        g.conn.data_provision(4, [b"\xAA" * 1500])  # beyond the 1000-byte bucket -> stream_error
        g._writer.write(g.conn.data_to_send())
        await eventually(lambda: len(g.errors) == 2)
        await g.close()
        await eventually(lambda: not mux.core.channels and not gen.core.channels)
        await p1.close(), await p2.close()
        await gen.close(), await mux.close()
        assert g.conn.state is State.CLOSED

    run(main())

    # --- pcap from the recorded bytes, expected messages from our own decoder
    pw = PcapWriter()
    flows, framers, expected = {}, {}, {}
    for conn, direction, data in log:
        upstream, n = conn
        itf = Interface.ECMG if n is not None and upstream == log[0][0][0] else Interface.EMMG
        key = (itf, n)
        if direction == "open":
            server = ("10.0.0.1", ECMG_PORT if itf is Interface.ECMG else MUX_PORT)
            flows[key] = Flow(("10.0.0.2", 40000 + len(flows)), server)
            framers[key] = {True: Framer(itf), False: Framer(itf)}
            expected[key] = []
            pw.open(flows[key])
            continue
        for seg in pw.data(flows[key], direction, data):
            for frame in framers[key][direction].feed(seg):
                m = parse(itf, frame)
                expected[key].append((m.type, [(c, len(v)) for c, v in m.params]))
    for f in flows.values():
        pw.close(f)
    for msg in udp_sent:
        pw.udp(("10.0.0.2", 45000), ("10.0.0.1", MUX_UDP), msg)
    pcap = tmp_path / "simulcrypt.pcap"
    pw.write(pcap)
    tshark = tshark_or_skip()

    proc = subprocess.run([tshark, "-r", str(pcap), "-o", "tcp.desegment_tcp_streams:TRUE",
                           "-d", f"tcp.port=={ECMG_PORT},simulcrypt", "-d", f"tcp.port=={MUX_PORT},simulcrypt",
                           "-d", f"udp.port=={MUX_UDP},simulcrypt", "-T", "pdml"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    root = ET.fromstring(proc.stdout)
    assert "malformed" not in proc.stdout.lower()
    seen: dict[tuple, list] = {}
    for pkt in root.iter("packet"):
        tcp_port = None
        for proto in pkt.findall("proto"):
            if proto.get("name") == "tcp":
                f = proto.find("field[@name='tcp.srcport']")
                src = int(f.get("show"))
                tcp_port = (src, int(proto.find("field[@name='tcp.dstport']").get("show")))
            if proto.get("name") == "udp":
                tcp_port = ("udp",)
            if proto.get("name") == "simulcrypt":
                mtype = int([f for f in proto.iter("field") if f.get("name") == "simulcrypt.message.type"][0].get("value"), 16)
                params = [int(f.get("value"), 16) for f in proto.iter("field") if f.get("name") == "simulcrypt.parameter.type"]
                lens = [int(f.get("show")) for f in proto.iter("field") if f.get("name") == "simulcrypt.parameter.len"]
                client = tcp_port if tcp_port == ("udp",) else tuple(sorted(tcp_port))
                seen.setdefault(client, []).append((mtype, list(zip(params, lens))))
    # map our flows to their (sorted) port pairs
    for key, flow in flows.items():
        ports = tuple(sorted((flow.client[1], flow.server[1])))
        assert seen.get(ports) == expected[key], (key, seen.get(ports), expected[key])
    assert seen[("udp",)] == [(m.type, [(c, len(v)) for c, v in m.params])
                              for m in (parse(Interface.EMMG, x) for x in udp_sent)]
    # every message type of both interfaces went through the dissector
    types = {t for msgs in seen.values() for t, _ in msgs}
    assert set(MESSAGES[Interface.ECMG]) <= types, sorted(set(MESSAGES[Interface.ECMG]) - types)
    assert set(MESSAGES[Interface.EMMG]) <= types, sorted(set(MESSAGES[Interface.EMMG]) - types)
