"""Channel and stream state machines for the four roles (sans-IO).

Each engine object is one TCP connection (TS 103 197: one channel per connection). Feed it
received bytes with `receive_data`, which returns events; take the bytes to write with
`data_to_send`. Malformed or out-of-state messages are answered with channel_error or
stream_error carrying the matching error_status, and the connection carries on (the
framing is intact, so the next message is read normally).

Servers (ECMG, MUX) share a core object across their connections: it owns the ids that
must be unique per generator/multiplexer and the capacity limits.
"""
from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tessera.simulcrypt.codec import Framer, Message, ProtocolError, parse, status
from tessera.simulcrypt.tables import (
    DATA_TYPE_LTKM, DEFAULT_VERSION, EE, EM, EP, ME, MM, MP, PROFILE_DRM, PROFILE_SMARTCARD,
    SECTION_TSPKT_BCAST, STATUS_PARAM, ErrorInfo, Interface, error_name, profile_of,
)

# errors_sent keeps only the last ERRORS_KEPT errors (a peer flooding bad messages earns one
# error each: issue 11 #5, 592k of them held 117 MB); error_count counts them all.
ERRORS_KEPT = 32

log = logging.getLogger("tessera.simulcrypt.engine")


# ---------------------------------------------------------------- events
@dataclass
class Event:
    pass


@dataclass
class ChannelOpen(Event):
    channel_id: int
    params: dict[str, int] = field(default_factory=dict)


@dataclass
class ChannelClosed(Event):
    channel_id: int


@dataclass
class StreamOpen(Event):
    channel_id: int
    stream_id: int
    ident: int  # ECM_id or data_id


@dataclass
class StreamClosed(Event):
    channel_id: int
    stream_id: int


@dataclass
class Alive(Event):
    """A channel_status / stream_status that answers a test (keep-alive)."""
    channel_id: int
    stream_id: int | None = None


@dataclass
class PeerError(Event):
    channel_id: int
    stream_id: int | None
    statuses: list[int]
    infos: list[bytes]

    def describe(self, itf: Interface) -> str:
        return ", ".join(error_name(itf, s) for s in self.statuses)


@dataclass
class ErrorSent(Event):
    status: int
    detail: str
    channel_id: int | None = None
    stream_id: int | None = None


@dataclass
class CwProvision(Event):
    channel_id: int
    stream_id: int
    ecm_id: int
    cp_number: int
    cws: list[tuple[int, bytes]] = field(repr=False)  # (CP number, CW); CW may be encrypted, see cw_encryption
    cw_encryption: bytes | None
    cp_duration: int | None
    access_criteria: bytes | None


@dataclass
class EcmResponse(Event):
    channel_id: int
    stream_id: int
    cp_number: int
    datagram: bytes


@dataclass
class BandwidthAllocated(Event):
    channel_id: int
    stream_id: int
    kbps: int | None


@dataclass
class DataReceived(Event):
    channel_id: int
    stream_id: int
    data_id: int
    datagrams: list[bytes]
    via: str = "tcp"


@dataclass
class UserMessage(Event):
    msg: Message


@dataclass
class CloseConnection(Event):
    reason: str


class State(enum.Enum):
    IDLE = "idle"
    SETUP_SENT = "setup sent"
    OPEN = "open"
    CLOSED = "closed"


# ---------------------------------------------------------------- base
class Endpoint:
    itf: Interface
    CHANNEL_ID: int  # parameter code of the channel id
    STREAM_ID: int
    CHANNEL_ERROR: int
    STREAM_ERROR: int
    ERROR_STATUS = 0x7000
    ERROR_INFORMATION = 0x7001
    STREAM_LEVEL: frozenset[int]  # message types that concern one stream

    def __init__(self, version: int | None = None, user_types: frozenset[int] = frozenset(),
                 error_info: ErrorInfo = ErrorInfo.PARAM) -> None:
        self.framer = Framer(self.itf)
        self.version = version or DEFAULT_VERSION[self.itf]
        self.user_types = user_types
        self.error_info = error_info
        self.state = State.IDLE
        self.channel_id: int | None = None
        self._out: list[bytes] = []
        self.errors_sent: deque[ErrorSent] = deque(maxlen=ERRORS_KEPT)
        self.error_count = 0
        self.error_budget: float | None = None  # errors still allowed (set by a server adapter)
        self.flooded = False

    # -- I/O boundary
    def receive_data(self, data: bytes) -> list[Event]:
        """Events of the complete messages in data. With error_budget set (servers), stops
        once that many errors have been answered and sets `flooded`: the rest is not read,
        the adapter drops the connection (a peer earning errors that fast is not working)."""
        events: list[Event] = []
        for item in self.framer.feed(data):
            if self.error_budget is not None and self.error_budget <= 0:
                self.flooded = True
                break
            if isinstance(item, ProtocolError):
                events += self._answer_error(item)
                continue
            try:
                msg = parse(self.itf, item, user_types=self.user_types)
                if self.state is State.OPEN and msg.version != self.version and msg.type not in self.user_types:
                    # the channel runs at the version negotiated by channel_setup
                    raise ProtocolError(status(self.itf, "version"),
                                        f"protocol_version {msg.version} on a version {self.version} channel", msg, msg.version)
                events += self.handle(msg)
            except ProtocolError as exc:
                events += self._answer_error(exc)
        return events

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send(self, mtype: int, params: list[tuple[int, int | bytes]]) -> Message:
        msg = Message.build(self.itf, mtype, self.version, params)
        self._out.append(msg.encode())
        return msg

    # -- errors
    def _ids(self) -> list[tuple[int, int | bytes]]:
        """Leading parameters of every message on this channel (client_id on EMMG<->MUX)."""
        return []

    def _error_information(self, err: int, info: bytes | None, param: int | None) -> list[tuple[int, int | bytes]]:
        """error_information in the configured form (ErrorInfo): the text, or the 2-byte
        parameter_type of the faulty parameter (given, or implied by the error_status)."""
        if self.error_info is ErrorInfo.TEXT:
            return [(self.ERROR_INFORMATION, info)] if info else []
        if param is None:
            param = STATUS_PARAM[self.itf].get(err)
        return [] if param is None else [(self.ERROR_INFORMATION, int(param).to_bytes(2, "big"))]

    def _sent(self, ev: ErrorSent) -> ErrorSent:
        self.errors_sent.append(ev)
        self.error_count += 1
        return ev

    def send_channel_error(self, err: int, info: bytes | None = None, channel_id: int | None = None,
                           param: int | None = None) -> ErrorSent:
        """info: the reason as text (logs; error_information in the TEXT form); param: the
        faulty parameter_type (error_information in the PARAM form)."""
        cid = channel_id if channel_id is not None else (self.channel_id or 0)
        params: list[tuple[int, int | bytes]] = self._ids() + [(self.CHANNEL_ID, cid), (self.ERROR_STATUS, err)]
        self.send(self.CHANNEL_ERROR, params + self._error_information(err, info, param))
        return self._sent(ErrorSent(err, (info or b"").decode(errors="replace"), cid))

    def send_stream_error(self, stream_id: int, err: int, info: bytes | None = None, channel_id: int | None = None,
                          param: int | None = None) -> ErrorSent:
        cid = channel_id if channel_id is not None else (self.channel_id or 0)
        params: list[tuple[int, int | bytes]] = self._ids() + [(self.CHANNEL_ID, cid), (self.STREAM_ID, stream_id),
                                                               (self.ERROR_STATUS, err)]
        self.send(self.STREAM_ERROR, params + self._error_information(err, info, param))
        return self._sent(ErrorSent(err, (info or b"").decode(errors="replace"), cid, stream_id))

    def _answer_error(self, exc: ProtocolError) -> list[Event]:
        msg = exc.msg
        log.debug("%s: answering %s (%s)", self.itf.value, error_name(self.itf, exc.status), exc.detail)
        if self.error_budget is not None:
            self.error_budget -= 1  # every faulty message costs the peer (our own refusals do not)
        if msg is not None and msg.type in (self.CHANNEL_ERROR, self.STREAM_ERROR):
            return [ErrorSent(exc.status, "not answered: bad error message")]  # never answer an error with an error
        saved = self.version
        if exc.version is not None and exc.status != status(self.itf, "version") and self.state is not State.OPEN:
            self.version = exc.version
        info = exc.detail.encode()[:200]
        try:
            cid = _int_or_none(msg, self.CHANNEL_ID) if msg else None
            sid = _int_or_none(msg, self.STREAM_ID) if msg else None
            if msg is not None and msg.type in self.STREAM_LEVEL and sid is not None:
                ev = self.send_stream_error(sid, exc.status, info, cid if cid is not None else self.channel_id,
                                            exc.param)
            else:
                ev = self.send_channel_error(exc.status, info, cid if cid is not None else self.channel_id, exc.param)
        finally:
            self.version = saved
        return [ev]

    def _fail(self, kind: str | int, detail: str, msg: Message, param: int | None = None) -> ProtocolError:
        st = status(self.itf, kind) if isinstance(kind, str) else int(kind)
        return ProtocolError(st, detail, msg, msg.version, param)

    def _peer_error(self, msg: Message) -> PeerError:
        ev = PeerError(msg.int(self.CHANNEL_ID, 0) or 0, msg.int(self.STREAM_ID),
                       msg.ints(self.ERROR_STATUS), msg.all(self.ERROR_INFORMATION))
        log.debug("%s: peer reports %s on channel %s stream %s", self.itf.value, ev.describe(self.itf),
                  ev.channel_id, ev.stream_id)
        return ev

    def handle(self, msg: Message) -> list[Event]:  # pragma: no cover - abstract
        raise NotImplementedError


def _int4_or_none(msg: Message, code: int) -> int | None:
    v = msg.get(code)
    return int.from_bytes(v, "big") if v is not None and len(v) == 4 else None


def _int_or_none(msg: Message, code: int) -> int | None:
    v = msg.get(code)
    if v is None or len(v) != 2:
        return None
    return int.from_bytes(v, "big")


# ================================================================ ECMG <-> SCS
@dataclass
class EcmgCaps:
    """What a STKM generator advertises in channel_status (TS 103 197 5.4.3). The engine
    enforces max_streams, min_CP_duration and CW_per_msg; the asyncio adapter measures its
    computation time against max_comp_time."""
    delay_start: int = -200        # ms, STKM broadcast may start before the crypto-period
    delay_stop: int = 0            # ms
    ecm_rep_period: int = 100      # ms
    max_streams: int = 128
    min_cp_duration: int = 1       # 100 ms units
    lead_cw: int = 1
    cw_per_msg: int = 2
    max_comp_time: int = 100       # ms
    section_tspkt_flag: int = SECTION_TSPKT_BCAST
    # Optional in channel_status (signed ms). They replace delay_start / delay_stop for the
    # first crypto-period after an access-criteria change / the last one before it (AC_*),
    # and the first after a clear->scrambled / the last before a scrambled->clear transition
    # (transition_*). None: the generator advertises the delay_start / delay_stop value; on
    # the SCS side, None means the generator did not send it and delay_start / delay_stop apply.
    ac_delay_start: int | None = None
    ac_delay_stop: int | None = None
    transition_delay_start: int | None = None
    transition_delay_stop: int | None = None

    def check(self) -> None:
        """Raises ValueError for values a generator must not advertise."""
        if not 1 <= self.cw_per_msg <= 255:
            raise ValueError(f"CW_per_msg must be 1..255 (one byte, at least one CW), not {self.cw_per_msg}")
        if not 0 <= self.lead_cw <= self.cw_per_msg:
            raise ValueError(f"lead_CW must be 0..CW_per_msg ({self.cw_per_msg}), not {self.lead_cw}: "
                             "the CWs of a CW_provision end lead_CW periods ahead")

    def params(self) -> list[tuple[int, int]]:
        def pick(v: int | None, default: int) -> int:
            return default if v is None else v

        return [(EP.SECTION_TSPKT_FLAG, self.section_tspkt_flag),
                (EP.AC_DELAY_START, pick(self.ac_delay_start, self.delay_start)),
                (EP.AC_DELAY_STOP, pick(self.ac_delay_stop, self.delay_stop)),
                (EP.DELAY_START, self.delay_start), (EP.DELAY_STOP, self.delay_stop),
                (EP.TRANSITION_DELAY_START, pick(self.transition_delay_start, self.delay_start)),
                (EP.TRANSITION_DELAY_STOP, pick(self.transition_delay_stop, self.delay_stop)),
                (EP.ECM_REP_PERIOD, self.ecm_rep_period),
                (EP.MAX_STREAMS, self.max_streams), (EP.MIN_CP_DURATION, self.min_cp_duration),
                (EP.LEAD_CW, self.lead_cw), (EP.CW_PER_MSG, self.cw_per_msg), (EP.MAX_COMP_TIME, self.max_comp_time)]


CW_LENGTHS = (16, 32)  # TEK sizes accepted in CP_CW_combination (AES-128 / AES-256); project choice


class EcmgCore:
    """State shared by all connections of one STKM generator."""

    def __init__(self, super_cas_ids: set[int], caps: EcmgCaps | None = None, max_channels: int = 64,
                 max_streams_total: int = 4096, ecm_id_known: Callable[[int, int], bool] | None = None,
                 error_info: ErrorInfo = ErrorInfo.PARAM) -> None:
        self.error_info = error_info
        for s in super_cas_ids:
            if profile_of(s) not in (PROFILE_DRM, PROFILE_SMARTCARD):
                raise ValueError(f"Super_CAS_id 0x{s:08x} is neither DRM (0x0001xxxx) nor Smartcard (0x0002xxxx) profile")
        self.super_cas_ids = set(super_cas_ids)
        self.caps = caps or EcmgCaps()
        self.caps.check()
        self.max_channels = max_channels
        self.max_streams_total = max_streams_total
        self.channels: dict[int, EcmgConnection] = {}
        self.ecm_ids: set[tuple[int, int]] = set()  # (Super_CAS_id, ECM_id): unique per KMS (14.1.1.3.1)
        self.streams_total = 0
        self.ecm_id_known = ecm_id_known  # (Super_CAS_id, ECM_id) -> has keys for this STKM stream


@dataclass
class EcmStream:
    stream_id: int
    ecm_id: int
    nominal_cp_duration: int
    access_criteria: bytes | None = None


class EcmgConnection(Endpoint):
    """STKM generator side of one SCS connection (server)."""
    itf = Interface.ECMG
    CHANNEL_ID, STREAM_ID = EP.ECM_CHANNEL_ID, EP.ECM_STREAM_ID
    CHANNEL_ERROR, STREAM_ERROR = EM.CHANNEL_ERROR, EM.STREAM_ERROR
    STREAM_LEVEL = frozenset({EM.STREAM_SETUP, EM.STREAM_TEST, EM.STREAM_STATUS, EM.STREAM_CLOSE_REQUEST,
                              EM.STREAM_CLOSE_RESPONSE, EM.STREAM_ERROR, EM.CW_PROVISION, EM.ECM_RESPONSE})

    def __init__(self, core: EcmgCore, user_types: frozenset[int] = frozenset(),
                 allowed_ids: frozenset[int] | None = None) -> None:
        """allowed_ids: the Super_CAS_ids this peer may set up a channel for (the adapter's
        allow-list); None: any the generator serves."""
        super().__init__(user_types=user_types, error_info=core.error_info)
        self.core = core
        self.allowed_ids = allowed_ids
        self.super_cas_id: int | None = None
        self.streams: dict[int, EcmStream] = {}

    def handle(self, msg: Message) -> list[Event]:
        t = msg.type
        if t in self.user_types:
            return [UserMessage(msg)]
        if t == EM.CHANNEL_SETUP:
            return self._channel_setup(msg)
        if t in (EM.CHANNEL_ERROR, EM.STREAM_ERROR):
            return [self._peer_error(msg)]
        cid = msg.int(EP.ECM_CHANNEL_ID)
        if self.state is not State.OPEN or cid != self.channel_id:
            raise self._fail(EE.UNKNOWN_ECM_CHANNEL_ID, f"ECM_channel_id {cid} is not set up on this connection", msg)
        if t == EM.CHANNEL_TEST:
            self._send_status()
            return []
        if t == EM.CHANNEL_STATUS:
            return [Alive(cid)]
        if t == EM.CHANNEL_CLOSE:
            return self.close("channel_close received")
        sid = msg.int(EP.ECM_STREAM_ID)
        assert sid is not None
        if t == EM.STREAM_SETUP:
            return self._stream_setup(msg, sid)
        stream = self.streams.get(sid)
        if stream is None:
            raise self._fail(EE.UNKNOWN_ECM_STREAM_ID, f"ECM_stream_id {sid} is not set up", msg)
        if t == EM.STREAM_TEST:
            self._send_stream_status(stream)
            return []
        if t == EM.STREAM_STATUS:
            return [Alive(cid, sid)]
        if t == EM.STREAM_CLOSE_REQUEST:
            self._release_stream(stream)
            self.send(EM.STREAM_CLOSE_RESPONSE, [(EP.ECM_CHANNEL_ID, cid), (EP.ECM_STREAM_ID, sid)])
            return [StreamClosed(cid, sid)]
        if t == EM.CW_PROVISION:
            return self._cw_provision(msg, stream)
        # stream_close_response / ECM_response only travel ECMG -> SCS
        raise self._fail("invalid", f"{msg.name} is not sent to an ECMG", msg)

    def _channel_setup(self, msg: Message) -> list[Event]:
        cid = msg.int(EP.ECM_CHANNEL_ID)
        scid = msg.int(EP.SUPER_CAS_ID)
        assert cid is not None and scid is not None
        if cid in self.core.channels:
            raise self._fail(EE.ECM_CHANNEL_ID_IN_USE, f"ECM_channel_id {cid} already in use", msg)
        if self.state is State.OPEN:
            raise self._fail("invalid", "one channel per TCP connection (TS 103 197 5.1.2)", msg)
        if profile_of(scid) not in (PROFILE_DRM, PROFILE_SMARTCARD):
            raise self._fail(EE.INVALID_VALUE, "Super_CAS_id profile must be 0x0001 (DRM) or 0x0002 (Smartcard)", msg)
        if scid not in self.core.super_cas_ids or (self.allowed_ids is not None and scid not in self.allowed_ids):
            raise self._fail(EE.UNKNOWN_SUPER_CAS_ID, f"Super_CAS_id 0x{scid:08x} not served here", msg)
        if len(self.core.channels) >= self.core.max_channels:
            raise self._fail(EE.TOO_MANY_CHANNELS_ON_ECMG, "too many channels", msg)
        self.version = msg.version
        self.channel_id, self.super_cas_id, self.state = cid, scid, State.OPEN
        self.core.channels[cid] = self
        self._send_status()
        return [ChannelOpen(cid, {"Super_CAS_id": scid})]

    def _send_status(self) -> None:
        self.send(EM.CHANNEL_STATUS, [(EP.ECM_CHANNEL_ID, self.channel_id or 0)] + self.core.caps.params())

    def _send_stream_status(self, s: EcmStream) -> None:
        # access_criteria_transfer_mode 0: access criteria only when they change (the
        # generator keeps the last ones per stream)
        self.send(EM.STREAM_STATUS, [(EP.ECM_CHANNEL_ID, self.channel_id or 0), (EP.ECM_STREAM_ID, s.stream_id),
                                     (EP.ECM_ID, s.ecm_id), (EP.ACCESS_CRITERIA_TRANSFER_MODE, 0)])

    def _stream_setup(self, msg: Message, sid: int) -> list[Event]:
        ecm_id = msg.int(EP.ECM_ID)
        ncp = msg.int(EP.NOMINAL_CP_DURATION)
        assert ecm_id is not None and ncp is not None
        key = (self.super_cas_id or 0, ecm_id)
        if sid in self.streams:
            raise self._fail(EE.ECM_STREAM_ID_IN_USE, f"ECM_stream_id {sid} already in use", msg)
        if key in self.core.ecm_ids:
            raise self._fail(EE.ECM_ID_IN_USE, f"ECM_id {ecm_id} already in use for this Super_CAS_id", msg)
        if len(self.streams) >= self.core.caps.max_streams:
            raise self._fail(EE.TOO_MANY_STREAMS_ON_CHANNEL, "too many streams on this channel", msg)
        if self.core.streams_total >= self.core.max_streams_total:
            raise self._fail(EE.TOO_MANY_STREAMS_ON_ECMG, "too many streams on this generator", msg)
        if self.core.ecm_id_known is not None and not self.core.ecm_id_known(self.super_cas_id or 0, ecm_id):
            raise self._fail(EE.UNKNOWN_ECM_ID, f"no keys for ECM_id (stkmstream) {ecm_id}", msg)
        if ncp < self.core.caps.min_cp_duration:
            raise self._fail(EE.INVALID_VALUE, "nominal_CP_duration below min_CP_duration", msg)
        s = EcmStream(sid, ecm_id, ncp)
        self.streams[sid] = s
        self.core.ecm_ids.add(key)
        self.core.streams_total += 1
        self._send_stream_status(s)
        return [StreamOpen(self.channel_id or 0, sid, ecm_id)]

    def _cw_provision(self, msg: Message, s: EcmStream) -> list[Event]:
        combos = []
        for raw in msg.all(EP.CP_CW_COMBINATION):
            cw = raw[2:]
            if len(cw) not in CW_LENGTHS:
                raise self._fail(EE.INVALID_VALUE, f"CW of {len(cw)} bytes (16 or 32 expected)", msg)
            combos.append((int.from_bytes(raw[:2], "big"), cw))
        if len(combos) < self.core.caps.cw_per_msg:
            raise self._fail(EE.NOT_ENOUGH_CWS, f"{len(combos)} CWs, CW_per_msg is {self.core.caps.cw_per_msg}", msg)
        ac = msg.get(EP.ACCESS_CRITERIA)
        if ac is not None:
            s.access_criteria = ac
        return [CwProvision(self.channel_id or 0, s.stream_id, s.ecm_id, msg.int(EP.CP_NUMBER) or 0, combos,
                            msg.get(EP.CW_ENCRYPTION), msg.int(EP.CP_DURATION), s.access_criteria)]

    # -- application calls
    def ecm_response(self, stream_id: int, cp_number: int, datagram: bytes) -> None:
        if stream_id in self.streams and self.state is State.OPEN:
            self.send(EM.ECM_RESPONSE, [(EP.ECM_CHANNEL_ID, self.channel_id or 0), (EP.ECM_STREAM_ID, stream_id),
                                        (EP.CP_NUMBER, cp_number), (EP.ECM_DATAGRAM, datagram)])

    def _release_stream(self, s: EcmStream) -> None:
        self.streams.pop(s.stream_id, None)
        self.core.ecm_ids.discard((self.super_cas_id or 0, s.ecm_id))
        self.core.streams_total -= 1

    def close(self, reason: str) -> list[Event]:
        """Release everything this connection holds (channel_close or transport loss)."""
        for s in list(self.streams.values()):
            self._release_stream(s)
        evs: list[Event] = []
        if self.state is State.OPEN and self.channel_id is not None:
            self.core.channels.pop(self.channel_id, None)
            evs.append(ChannelClosed(self.channel_id))
        self.state = State.CLOSED
        evs.append(CloseConnection(reason))
        return evs


@dataclass
class ScsStream:
    stream_id: int
    ecm_id: int
    nominal_cp_duration: int
    open: bool = False
    access_criteria_transfer_mode: int | None = None


class ScsConnection(Endpoint):
    """SCS side of one STKM generator connection (client)."""
    itf = Interface.ECMG
    CHANNEL_ID, STREAM_ID = EP.ECM_CHANNEL_ID, EP.ECM_STREAM_ID
    CHANNEL_ERROR, STREAM_ERROR = EM.CHANNEL_ERROR, EM.STREAM_ERROR
    STREAM_LEVEL = EcmgConnection.STREAM_LEVEL

    def __init__(self, channel_id: int, super_cas_id: int, version: int = 3,
                 user_types: frozenset[int] = frozenset()) -> None:
        super().__init__(version, user_types)
        if profile_of(super_cas_id) not in (PROFILE_DRM, PROFILE_SMARTCARD):
            raise ValueError("Super_CAS_id profile must be 0x0001 (DRM) or 0x0002 (Smartcard)")
        self.channel_id = channel_id
        self.super_cas_id = super_cas_id
        self.caps: EcmgCaps | None = None
        self._status_params: list[tuple[int, bytes]] = []
        self.streams: dict[int, ScsStream] = {}

    def setup(self) -> None:
        self.send(EM.CHANNEL_SETUP, [(EP.ECM_CHANNEL_ID, self.channel_id), (EP.SUPER_CAS_ID, self.super_cas_id)])
        self.state = State.SETUP_SENT

    def test(self) -> None:
        self.send(EM.CHANNEL_TEST, [(EP.ECM_CHANNEL_ID, self.channel_id)])

    def stream_setup(self, stream_id: int, ecm_id: int, nominal_cp_duration: int) -> None:
        if self.state is not State.OPEN:
            raise RuntimeError("channel not open")
        if stream_id in self.streams:
            raise ValueError(f"stream {stream_id} exists")
        self.streams[stream_id] = ScsStream(stream_id, ecm_id, nominal_cp_duration)
        self.send(EM.STREAM_SETUP, [(EP.ECM_CHANNEL_ID, self.channel_id), (EP.ECM_STREAM_ID, stream_id),
                                    (EP.ECM_ID, ecm_id), (EP.NOMINAL_CP_DURATION, nominal_cp_duration)])

    def stream_test(self, stream_id: int) -> None:
        self.send(EM.STREAM_TEST, [(EP.ECM_CHANNEL_ID, self.channel_id), (EP.ECM_STREAM_ID, stream_id)])

    def cw_provision(self, stream_id: int, cp_number: int, cws: list[tuple[int, bytes]], *,
                     cw_encryption: bytes | None = None, cp_duration: int | None = None,
                     access_criteria: bytes | None = None) -> None:
        s = self.streams.get(stream_id)
        if s is None or not s.open:
            raise RuntimeError(f"stream {stream_id} not open")
        params: list[tuple[int, int | bytes]] = [(EP.ECM_CHANNEL_ID, self.channel_id), (EP.ECM_STREAM_ID, stream_id),
                                                 (EP.CP_NUMBER, cp_number)]
        if cw_encryption is not None:
            params.append((EP.CW_ENCRYPTION, cw_encryption))
        params += [(EP.CP_CW_COMBINATION, cp.to_bytes(2, "big") + cw) for cp, cw in cws]
        if cp_duration is not None:
            params.append((EP.CP_DURATION, cp_duration))
        if access_criteria is not None:
            params.append((EP.ACCESS_CRITERIA, access_criteria))
        self.send(EM.CW_PROVISION, params)

    def stream_close(self, stream_id: int) -> None:
        self.send(EM.STREAM_CLOSE_REQUEST, [(EP.ECM_CHANNEL_ID, self.channel_id), (EP.ECM_STREAM_ID, stream_id)])

    def close(self) -> None:
        self.send(EM.CHANNEL_CLOSE, [(EP.ECM_CHANNEL_ID, self.channel_id)])
        self.state = State.CLOSED

    def handle(self, msg: Message) -> list[Event]:
        t = msg.type
        if t in self.user_types:
            return [UserMessage(msg)]
        if t in (EM.CHANNEL_ERROR, EM.STREAM_ERROR):
            return [self._peer_error(msg)]
        cid = msg.int(EP.ECM_CHANNEL_ID)
        if cid != self.channel_id or self.state in (State.IDLE, State.CLOSED):
            raise self._fail(EE.UNKNOWN_ECM_CHANNEL_ID, f"ECM_channel_id {cid} is not this channel", msg)
        if t == EM.CHANNEL_STATUS:
            return self._channel_status(msg)
        if self.state is not State.OPEN:
            raise self._fail("invalid", f"{msg.name} before channel_status", msg)
        if t == EM.CHANNEL_TEST:
            self.send(EM.CHANNEL_STATUS, [(EP.ECM_CHANNEL_ID, self.channel_id)] + list(self._status_params))
            return []
        sid = msg.int(EP.ECM_STREAM_ID)
        s = self.streams.get(sid) if sid is not None else None
        if t not in (EM.STREAM_STATUS, EM.STREAM_TEST, EM.STREAM_CLOSE_RESPONSE, EM.ECM_RESPONSE):
            raise self._fail("invalid", f"{msg.name} is not sent to an SCS", msg)
        if s is None:
            raise self._fail(EE.UNKNOWN_ECM_STREAM_ID, f"ECM_stream_id {sid} unknown", msg)
        if t == EM.STREAM_STATUS:
            ecm_id = msg.int(EP.ECM_ID)
            if ecm_id != s.ecm_id:
                raise self._fail(EE.UNKNOWN_ECM_ID, f"ECM_id {ecm_id} does not match stream {sid}", msg)
            s.access_criteria_transfer_mode = msg.int(EP.ACCESS_CRITERIA_TRANSFER_MODE)
            if s.open:
                return [Alive(self.channel_id, sid)]
            s.open = True
            return [StreamOpen(self.channel_id, sid, s.ecm_id)]
        if not s.open:
            raise self._fail("invalid", f"{msg.name} before stream_status", msg)
        if t == EM.STREAM_TEST:
            self.send(EM.STREAM_STATUS, [(EP.ECM_CHANNEL_ID, self.channel_id), (EP.ECM_STREAM_ID, sid),
                                         (EP.ECM_ID, s.ecm_id), (EP.ACCESS_CRITERIA_TRANSFER_MODE,
                                                                 s.access_criteria_transfer_mode or 0)])
            return []
        if t == EM.STREAM_CLOSE_RESPONSE:
            del self.streams[s.stream_id]
            return [StreamClosed(self.channel_id, s.stream_id)]
        return [EcmResponse(self.channel_id, s.stream_id, msg.int(EP.CP_NUMBER) or 0, msg.get(EP.ECM_DATAGRAM) or b"")]

    def _channel_status(self, msg: Message) -> list[Event]:
        flag = msg.int(EP.SECTION_TSPKT_FLAG)
        if flag != SECTION_TSPKT_BCAST:
            # BCAST 14.1.1.3.1: only 0x02 (binary STKM); other values shall not be used
            raise self._fail(EE.INVALID_VALUE, f"section_TSpkt_flag {flag} (BCAST requires 0x02)", msg)
        caps = EcmgCaps(
            delay_start=msg.int(EP.DELAY_START) or 0, delay_stop=msg.int(EP.DELAY_STOP) or 0,
            ecm_rep_period=msg.int(EP.ECM_REP_PERIOD) or 0, max_streams=msg.int(EP.MAX_STREAMS) or 0,
            min_cp_duration=msg.int(EP.MIN_CP_DURATION) or 0, lead_cw=msg.int(EP.LEAD_CW) or 0,
            cw_per_msg=msg.int(EP.CW_PER_MSG) or 0, max_comp_time=msg.int(EP.MAX_COMP_TIME) or 0,
            ac_delay_start=msg.int(EP.AC_DELAY_START), ac_delay_stop=msg.int(EP.AC_DELAY_STOP),
            transition_delay_start=msg.int(EP.TRANSITION_DELAY_START),
            transition_delay_stop=msg.int(EP.TRANSITION_DELAY_STOP))
        if caps.cw_per_msg < 1 or caps.lead_cw > caps.cw_per_msg:
            raise self._fail(EE.INVALID_VALUE, "inconsistent lead_CW / CW_per_msg", msg)
        self.caps = caps
        self._status_params = [(c, v) for c, v in msg.params if c != EP.ECM_CHANNEL_ID]
        if self.state is State.OPEN:
            return [Alive(self.channel_id or 0)]
        self.state = State.OPEN
        return [ChannelOpen(self.channel_id or 0, {k: getattr(caps, k) for k in vars(caps)})]


# ================================================================ EMMG <-> MUX
class _MuxItf(Endpoint):
    itf = Interface.EMMG
    CHANNEL_ID, STREAM_ID = MP.DATA_CHANNEL_ID, MP.DATA_STREAM_ID
    CHANNEL_ERROR, STREAM_ERROR = MM.CHANNEL_ERROR, MM.STREAM_ERROR
    STREAM_LEVEL = frozenset({MM.STREAM_SETUP, MM.STREAM_TEST, MM.STREAM_STATUS, MM.STREAM_CLOSE_REQUEST,
                              MM.STREAM_CLOSE_RESPONSE, MM.STREAM_ERROR, MM.STREAM_BW_REQUEST,
                              MM.STREAM_BW_ALLOCATION, MM.DATA_PROVISION})
    client_id: int | None = None

    def _ids(self) -> list[tuple[int, int | bytes]]:
        return [(MP.CLIENT_ID, self.client_id or 0)]

    def _answer_error(self, exc: ProtocolError) -> list[Event]:
        # before the channel is open (a refused channel_setup), answer with the client_id
        # the peer sent rather than 0
        client = _int4_or_none(exc.msg, MP.CLIENT_ID) if exc.msg is not None else None
        if self.client_id is not None or client is None:
            return super()._answer_error(exc)
        self.client_id = client
        try:
            return super()._answer_error(exc)
        finally:
            self.client_id = None


@dataclass
class DataStream:
    stream_id: int
    data_id: int
    data_type: int = DATA_TYPE_LTKM
    open: bool = False
    kbps: int = 0               # allocated bandwidth
    tokens: float = 0.0         # byte budget (MUX side)
    stamp: float = 0.0
    bytes_in: int = 0
    dropped: int = 0


class EmmgConnection(_MuxItf):
    """LTKM generator side of one MUX connection (client). DRM profile only: BCAST
    14.1.1.3.4 broadcasts no LTKM for the Smartcard profile."""

    def __init__(self, client_id: int, channel_id: int, version: int = 3) -> None:
        super().__init__(version)
        if profile_of(client_id) != PROFILE_DRM:
            raise ValueError("client_id must be DRM profile (0x0001xxxx): Smartcard LTKMs are not broadcast")
        self.client_id = client_id
        self.channel_id = channel_id
        self.streams: dict[int, DataStream] = {}

    def _p(self) -> list[tuple[int, int | bytes]]:
        return [(MP.CLIENT_ID, self.client_id or 0), (MP.DATA_CHANNEL_ID, self.channel_id or 0)]

    def setup(self) -> None:
        self.send(MM.CHANNEL_SETUP, self._p() + [(MP.SECTION_TSPKT_FLAG, SECTION_TSPKT_BCAST)])
        self.state = State.SETUP_SENT

    def test(self) -> None:
        self.send(MM.CHANNEL_TEST, self._p())

    def stream_setup(self, stream_id: int, data_id: int) -> None:
        if self.state is not State.OPEN:
            raise RuntimeError("channel not open")
        self.streams[stream_id] = DataStream(stream_id, data_id)
        self.send(MM.STREAM_SETUP, self._p() + [(MP.DATA_STREAM_ID, stream_id), (MP.DATA_ID, data_id),
                                                (MP.DATA_TYPE, DATA_TYPE_LTKM)])

    def bw_request(self, stream_id: int, kbps: int | None) -> None:
        params = self._p() + [(MP.DATA_STREAM_ID, stream_id)]
        if kbps is not None:
            params.append((MP.BANDWIDTH, kbps))
        self.send(MM.STREAM_BW_REQUEST, params)

    def data_provision_msg(self, stream_id: int, datagrams: list[bytes]) -> Message:
        s = self.streams[stream_id]
        return Message.build(self.itf, MM.DATA_PROVISION, self.version, self._p() + [
            (MP.DATA_STREAM_ID, stream_id), (MP.DATA_ID, s.data_id)] + [(MP.DATAGRAM, d) for d in datagrams])

    def data_provision(self, stream_id: int, datagrams: list[bytes]) -> None:
        self._out.append(self.data_provision_msg(stream_id, datagrams).encode())

    def stream_close(self, stream_id: int) -> None:
        self.send(MM.STREAM_CLOSE_REQUEST, self._p() + [(MP.DATA_STREAM_ID, stream_id)])

    def close(self) -> None:
        self.send(MM.CHANNEL_CLOSE, self._p())
        self.state = State.CLOSED

    def handle(self, msg: Message) -> list[Event]:
        t = msg.type
        if t in (MM.CHANNEL_ERROR, MM.STREAM_ERROR):
            return [self._peer_error(msg)]
        if self.state is State.CLOSED:
            # we sent channel_close: what the MUX had in flight (e.g. the stream_close_response
            # of a request given up on) is dropped, never answered with an error
            log.debug("EMMG: %s after channel_close ignored", msg.name)
            return []
        if msg.int(MP.CLIENT_ID) != self.client_id:
            raise self._fail(ME.UNKNOWN_CLIENT_ID, "client_id is not ours", msg)
        cid = msg.int(MP.DATA_CHANNEL_ID)
        if cid != self.channel_id or self.state in (State.IDLE, State.CLOSED):
            raise self._fail(ME.UNKNOWN_DATA_CHANNEL_ID, f"data_channel_id {cid} is not this channel", msg)
        if t == MM.CHANNEL_STATUS:
            if msg.int(MP.SECTION_TSPKT_FLAG) != SECTION_TSPKT_BCAST:
                raise self._fail(ME.INVALID_VALUE, "section_TSpkt_flag must be 0x02 (BCAST 14.1.1.3.4)", msg)
            if self.state is State.OPEN:
                return [Alive(cid)]
            self.state = State.OPEN
            return [ChannelOpen(cid)]
        if self.state is not State.OPEN:
            raise self._fail("invalid", f"{msg.name} before channel_status", msg)
        if t == MM.CHANNEL_TEST:
            self.send(MM.CHANNEL_STATUS, self._p() + [(MP.SECTION_TSPKT_FLAG, SECTION_TSPKT_BCAST)])
            return []
        if t not in (MM.STREAM_STATUS, MM.STREAM_TEST, MM.STREAM_CLOSE_RESPONSE, MM.STREAM_BW_ALLOCATION):
            raise self._fail("invalid", f"{msg.name} is not sent to an EMMG", msg)
        sid = msg.int(MP.DATA_STREAM_ID)
        s = self.streams.get(sid) if sid is not None else None
        if s is None:
            raise self._fail(ME.UNKNOWN_DATA_STREAM_ID, f"data_stream_id {sid} unknown", msg)
        if t == MM.STREAM_STATUS:
            if msg.int(MP.DATA_ID) != s.data_id:
                raise self._fail(ME.UNKNOWN_DATA_ID, "data_id does not match the stream", msg)
            if s.open:
                return [Alive(cid, sid)]
            s.open = True
            return [StreamOpen(cid, sid, s.data_id)]
        if t == MM.STREAM_TEST:
            self.send(MM.STREAM_STATUS, self._p() + [(MP.DATA_STREAM_ID, sid), (MP.DATA_ID, s.data_id),
                                                     (MP.DATA_TYPE, s.data_type)])
            return []
        if t == MM.STREAM_CLOSE_RESPONSE:
            del self.streams[sid]
            return [StreamClosed(cid, sid)]
        s.kbps = msg.int(MP.BANDWIDTH) or 0
        return [BandwidthAllocated(cid, sid, msg.int(MP.BANDWIDTH))]


class MuxCore:
    """State shared by all EMMG connections of one multiplexer: channel/stream/data_id
    registries, bandwidth pool, and the UDP entry for data_provision."""

    def __init__(self, total_kbps: int = 2000, clients: set[int] | None = None, max_channels: int = 32,
                 max_streams_per_channel: int = 16, max_streams_total: int = 256, burst_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, channels_per_client: int | None = None,
                 error_info: ErrorInfo = ErrorInfo.PARAM) -> None:
        self.total_kbps = total_kbps
        self.error_info = error_info
        # Open channels one client_id may hold; one more gets `client_id already in use`
        # (0x0014). None: no limit, the default. The reference does not say when 0x0014 is due,
        # and since every EMMG<->MUX message names client_id AND data_channel_id, one client
        # may run several channels; the limit is a project option.
        if channels_per_client is not None and channels_per_client < 1:
            raise ValueError("channels_per_client must be at least 1 (or None for no limit)")
        self.channels_per_client = channels_per_client
        self.clients = clients  # None: any DRM-profile client_id
        self.max_channels = max_channels
        self.max_streams_per_channel = max_streams_per_channel
        self.max_streams_total = max_streams_total
        self.burst_seconds = burst_seconds  # token bucket depth (project choice)
        self.clock = clock
        self.channels: dict[tuple[int, int], MuxConnection] = {}
        self.data_ids: dict[tuple[int, int], MuxConnection] = {}  # (client_id, data_id) -> its channel
        self.streams_total = 0
        self.allocated_kbps = 0
        # UDP datagrams not delivered, by reason (no TCP channel to answer them on)
        self.udp_dropped: dict[str, int] = {}

    def _udp_drop(self, reason: str) -> tuple[None, list[Event]]:
        self.udp_dropped[reason] = self.udp_dropped.get(reason, 0) + 1
        log.debug("UDP datagram dropped: %s", reason)
        return None, []

    def receive_udp(self, data: bytes, source: str | None = None) -> tuple[MuxConnection | None, list[Event]]:
        """data_provision over UDP. The channel is the one named by client_id and
        data_channel_id, or, when data_channel_id is absent (it and data_stream_id are
        optional, cardinality 0-1), the channel whose stream carries client_id + data_id
        (unique per MUX: BCAST 14.1.1.3.4). source: the sender's IP address; it must be one
        the channel accepts UDP from (MuxConnection.udp_sources: by default the address its
        TCP connection came from), since a UDP source address is all that ties a datagram
        to a channel. Errors about a datagram that reached a channel are answered on its TCP
        connection; what reaches no channel (undecodable, not data_provision, unknown ids,
        wrong source) has nobody to answer to and is counted in udp_dropped."""
        from tessera.simulcrypt.codec import parse as _parse
        try:
            msg = _parse(Interface.EMMG, data)
        except ProtocolError:
            return self._udp_drop("undecodable")
        if msg.type != MM.DATA_PROVISION:
            return self._udp_drop("not a data_provision")
        client = msg.int(MP.CLIENT_ID) or 0
        cid = msg.int(MP.DATA_CHANNEL_ID)
        conn = self.channels.get((client, cid)) if cid is not None else self.data_ids.get((client, msg.int(MP.DATA_ID) or 0))
        if conn is None:
            return self._udp_drop("no open channel for its client_id / data_channel_id / data_id")
        if conn.udp_sources is not None and source not in conn.udp_sources:
            return self._udp_drop("sender is not the channel's UDP source")
        try:
            evs = conn.handle(msg)
        except ProtocolError as exc:
            evs = conn._answer_error(exc)
        for e in evs:
            if isinstance(e, DataReceived):
                e.via = "udp"
        return conn, evs


class MuxConnection(_MuxItf):
    """Multiplexer side of one LTKM generator connection (server)."""

    def __init__(self, core: MuxCore, udp_sources: frozenset[str] | None = None,
                 allowed_ids: frozenset[int] | None = None) -> None:
        """allowed_ids: the client_ids this peer may set up a channel for (allow-list)."""
        super().__init__(error_info=core.error_info)
        self.core = core
        self.allowed_ids = allowed_ids
        self.streams: dict[int, DataStream] = {}
        # IP addresses this channel accepts UDP data_provision from (None: any; the
        # Multiplexer sets the TCP peer's address, or a configured set)
        self.udp_sources = udp_sources

    def _p(self) -> list[tuple[int, int | bytes]]:
        return [(MP.CLIENT_ID, self.client_id or 0), (MP.DATA_CHANNEL_ID, self.channel_id or 0)]

    def handle(self, msg: Message) -> list[Event]:
        t = msg.type
        if t == MM.CHANNEL_SETUP:
            return self._channel_setup(msg)
        if t in (MM.CHANNEL_ERROR, MM.STREAM_ERROR):
            return [self._peer_error(msg)]
        if self.state is State.OPEN and msg.int(MP.CLIENT_ID) != self.client_id:
            raise self._fail(ME.UNKNOWN_CLIENT_ID, "client_id differs from the channel's", msg)
        cid = msg.int(MP.DATA_CHANNEL_ID, self.channel_id)  # optional in data_provision
        if self.state is not State.OPEN or cid != self.channel_id:
            raise self._fail(ME.UNKNOWN_DATA_CHANNEL_ID, f"data_channel_id {cid} is not set up on this connection", msg)
        if t == MM.CHANNEL_TEST:
            self.send(MM.CHANNEL_STATUS, self._p() + [(MP.SECTION_TSPKT_FLAG, SECTION_TSPKT_BCAST)])
            return []
        if t == MM.CHANNEL_STATUS:
            return [Alive(cid)]
        if t == MM.CHANNEL_CLOSE:
            return self.close("channel_close received")
        if t == MM.STREAM_SETUP:
            return self._stream_setup(msg)
        if t == MM.DATA_PROVISION:
            return self._data(msg)
        sid = msg.int(MP.DATA_STREAM_ID)
        s = self.streams.get(sid) if sid is not None else None
        if t not in (MM.STREAM_TEST, MM.STREAM_STATUS, MM.STREAM_CLOSE_REQUEST, MM.STREAM_BW_REQUEST):
            raise self._fail("invalid", f"{msg.name} is not sent to a MUX", msg)
        if s is None:
            raise self._fail(ME.UNKNOWN_DATA_STREAM_ID, f"data_stream_id {sid} unknown", msg)
        if t == MM.STREAM_TEST:
            self._stream_status(s)
            return []
        if t == MM.STREAM_STATUS:
            return [Alive(cid, sid)]
        if t == MM.STREAM_CLOSE_REQUEST:
            self._release(s)
            self.send(MM.STREAM_CLOSE_RESPONSE, self._p() + [(MP.DATA_STREAM_ID, s.stream_id)])
            return [StreamClosed(cid, s.stream_id)]
        return self._bw(msg, s)

    def _channel_setup(self, msg: Message) -> list[Event]:
        client = msg.int(MP.CLIENT_ID) or 0
        cid = msg.int(MP.DATA_CHANNEL_ID) or 0
        if self.state is State.OPEN:
            if (client, cid) in self.core.channels:
                raise self._fail(ME.DATA_CHANNEL_ID_IN_USE, f"data_channel_id {cid} already in use", msg)
            raise self._fail("invalid", "one channel per TCP connection", msg)
        if profile_of(client) != PROFILE_DRM:
            # BCAST 14.1.1.3.4: LTKMs over EMMG<->MUX exist only for the DRM profile
            raise self._fail(ME.INVALID_VALUE, "client_id must be DRM profile 0x0001xxxx", msg)
        if (self.core.clients is not None and client not in self.core.clients) or \
                (self.allowed_ids is not None and client not in self.allowed_ids):
            raise self._fail(ME.UNKNOWN_CLIENT_ID, f"client_id 0x{client:08x} unknown", msg)
        if msg.int(MP.SECTION_TSPKT_FLAG) != SECTION_TSPKT_BCAST:
            raise self._fail(ME.INVALID_VALUE, "section_TSpkt_flag must be 0x02 (BCAST 14.1.1.3.4)", msg)
        if (client, cid) in self.core.channels:
            raise self._fail(ME.DATA_CHANNEL_ID_IN_USE, f"data_channel_id {cid} already in use", msg)
        limit = self.core.channels_per_client
        if limit is not None and sum(1 for c, _ in self.core.channels if c == client) >= limit:
            raise self._fail(ME.CLIENT_ID_IN_USE, f"client_id 0x{client:08x} already has {limit} open channel(s)", msg)
        if len(self.core.channels) >= self.core.max_channels:
            raise self._fail(ME.TOO_MANY_CHANNELS_ON_MUX, "too many channels", msg)
        self.version = msg.version
        self.client_id, self.channel_id, self.state = client, cid, State.OPEN
        self.core.channels[(client, cid)] = self
        self.send(MM.CHANNEL_STATUS, self._p() + [(MP.SECTION_TSPKT_FLAG, SECTION_TSPKT_BCAST)])
        return [ChannelOpen(cid, {"client_id": client})]

    def _stream_status(self, s: DataStream) -> None:
        self.send(MM.STREAM_STATUS, self._p() + [(MP.DATA_STREAM_ID, s.stream_id), (MP.DATA_ID, s.data_id),
                                                 (MP.DATA_TYPE, s.data_type)])

    def _stream_setup(self, msg: Message) -> list[Event]:
        sid = msg.int(MP.DATA_STREAM_ID) or 0
        data_id = msg.int(MP.DATA_ID) or 0
        if sid in self.streams:
            raise self._fail(ME.DATA_STREAM_ID_IN_USE, f"data_stream_id {sid} already in use", msg)
        if (self.client_id or 0, data_id) in self.core.data_ids:  # unique per MUX (client_id + data_id)
            raise self._fail(ME.DATA_ID_IN_USE, f"data_id {data_id} already in use", msg)
        if msg.int(MP.DATA_TYPE) != DATA_TYPE_LTKM:
            raise self._fail(ME.INVALID_VALUE, "data_type must be 0x00 (LTKM, BCAST 14.1.1.3.4)", msg)
        if len(self.streams) >= self.core.max_streams_per_channel:
            raise self._fail(ME.TOO_MANY_STREAMS_ON_CHANNEL, "too many streams on this channel", msg)
        if self.core.streams_total >= self.core.max_streams_total:
            raise self._fail(ME.TOO_MANY_STREAMS_ON_MUX, "too many streams on this MUX", msg)
        s = DataStream(sid, data_id, open=True, stamp=self.core.clock())
        self.streams[sid] = s
        self.core.data_ids[(self.client_id or 0, data_id)] = self
        self.core.streams_total += 1
        self._stream_status(s)
        return [StreamOpen(self.channel_id or 0, sid, data_id)]

    def _bw(self, msg: Message, s: DataStream) -> list[Event]:
        want = msg.int(MP.BANDWIDTH)
        free = self.core.total_kbps - self.core.allocated_kbps + s.kbps
        # No bandwidth given: the EMMG asks what it has; the allocation stays as it is (our
        # reading; granting "whatever is free" let one request take the whole pool).
        grant = s.kbps if want is None else min(want, free)
        self.core.allocated_kbps += grant - s.kbps
        s.kbps = grant
        s.tokens, s.stamp = self._depth(s), self.core.clock()  # a fresh allocation starts with a full bucket
        self.send(MM.STREAM_BW_ALLOCATION, self._p() + [(MP.DATA_STREAM_ID, s.stream_id), (MP.BANDWIDTH, grant)])
        return [BandwidthAllocated(self.channel_id or 0, s.stream_id, grant)]

    def _depth(self, s: DataStream) -> float:
        return s.kbps * 1000 / 8 * self.core.burst_seconds

    def _data(self, msg: Message) -> list[Event]:
        data_id = msg.int(MP.DATA_ID) or 0
        sid = msg.int(MP.DATA_STREAM_ID)
        if sid is not None:
            s = self.streams.get(sid)
            if s is None:
                raise self._fail(ME.UNKNOWN_DATA_STREAM_ID, f"data_stream_id {sid} unknown", msg)
            if s.data_id != data_id:
                raise self._fail(ME.UNKNOWN_DATA_ID, f"data_id {data_id} is not stream {sid}'s", msg)
        else:
            found = [x for x in self.streams.values() if x.data_id == data_id]
            if not found:
                raise self._fail(ME.UNKNOWN_DATA_ID, f"data_id {data_id} unknown", msg)
            s = found[0]
        datagrams = msg.all(MP.DATAGRAM)
        size = sum(len(d) for d in datagrams)
        now = self.core.clock()
        s.tokens = min(self._depth(s), s.tokens + (now - s.stamp) * s.kbps * 1000 / 8)
        s.stamp = now
        if size > s.tokens:
            s.dropped += size
            raise ProtocolError(ME.EXCEEDED_BANDWIDTH,
                                f"{size} bytes exceed the {s.kbps} kbit/s allocation", msg, msg.version)
        s.tokens -= size
        s.bytes_in += size
        return [DataReceived(self.channel_id or 0, s.stream_id, data_id, datagrams)]

    def _release(self, s: DataStream) -> None:
        self.streams.pop(s.stream_id, None)
        if self.core.data_ids.get((self.client_id or 0, s.data_id)) is self:
            del self.core.data_ids[(self.client_id or 0, s.data_id)]
        self.core.streams_total -= 1
        self.core.allocated_kbps -= s.kbps

    def close(self, reason: str) -> list[Event]:
        for s in list(self.streams.values()):
            self._release(s)
        evs: list[Event] = []
        if self.state is State.OPEN:
            self.core.channels.pop((self.client_id or 0, self.channel_id or 0), None)
            evs.append(ChannelClosed(self.channel_id or 0))
        self.state = State.CLOSED
        evs.append(CloseConnection(reason))
        return evs
