"""Sans-IO ASM state machines: bytes in, events / bytes out, no sockets, no clocks.

Clause 6.4 item 2: RRPs are synchronous -- each pair is opened and closed before the next
is opened on the same connection. The responder engine therefore hands out one request at
a time; a request that arrives early is held until the previous response has been sent.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from tessera.asm import codec
from tessera.asm.codec import (BadRequestResponse, CodecError, Frame, GeneralResponse, Message,
                               RESPONSE_FOR)


class ProtocolError(Exception):
    """The peer broke the RRP rules; the connection should be closed."""


class ResponseTooLarge(Exception):
    """The response's value exceeded the limit set for it; it was skipped unread and the
    stream is still in step (the request is closed, the connection usable)."""

    def __init__(self, name: str, length: int, limit: int) -> None:
        super().__init__(f"{name} response of {length} bytes exceeds the {limit}-byte limit")
        self.length, self.limit = length, limit


@dataclass(frozen=True)
class RequestReceived:
    request: Message
    raw: bytes = field(repr=False)  # an LEKeyLoad carries LE keys
    repeat: int = 0  # 0, or n: the n-th request on this connection reusing an earlier Request_ID


@dataclass(frozen=True)
class MalformedRequest:
    """Framed but not understood: answer BadRequest with the copy (clause 7.1)."""

    raw: bytes = field(repr=False)  # may be a malformed LEKeyLoad, keys included
    error: CodecError


@dataclass(frozen=True)
class InvalidParameter:
    """Understood command, invalid parameters: answer the command's response with code 2."""

    response: Message
    error: CodecError


Event = RequestReceived | MalformedRequest | InvalidParameter


class State(enum.Enum):
    IDLE = "idle"
    SERVING = "serving"  # a request has been handed out; its response is owed
    CLOSED = "closed"


def _invalid_response(frame: Frame, err: CodecError) -> Message | None:
    """A typed response with code 2 when the Request_ID can still be read."""
    cls = codec.BY_KEY.get(frame.key)
    if cls is None or not cls.IS_REQUEST or len(frame.value) < 4:
        return None
    rid = int.from_bytes(frame.value[:4], "big")
    if rid == 0 or err.kind not in ("duplicate-id", "batch-item-length", "bad-field"):
        return None
    resp = RESPONSE_FOR[cls]
    return resp(request_id=rid, response=GeneralResponse.INVALID)  # type: ignore[call-arg]


class ResponderEngine:
    """Clause 6.3: the SM "should select unique values" of Request_ID per TLS connection.
    That is a recommendation to the initiator, not a reason for the responder to refuse, so
    a repeat is served normally and only flagged (`RequestReceived.repeat`, `repeats`) for
    the security log. The last `id_window` distinct IDs are remembered (bounded memory).
    """

    def __init__(self, max_value: int = codec.MAX_VALUE_LEN, id_window: int = 65536) -> None:
        self._framer = codec.Framer(max_value)
        self._queue: deque[Event] = deque()
        self.state = State.IDLE
        self._current: Event | None = None
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()
        self._id_window = id_window
        self.repeats = 0

    def _note_id(self, rid: int) -> int:
        if rid in self._seen:
            self.repeats += 1
            return self.repeats
        self._seen.add(rid)
        self._seen_order.append(rid)
        if len(self._seen_order) > self._id_window:
            self._seen.discard(self._seen_order.popleft())
        return 0

    @property
    def mid_request(self) -> bool:
        """Part of a request has arrived and the rest is still awaited."""
        return self._framer.pending > 0

    def receive_data(self, data: bytes) -> None:
        """Raises a fatal CodecError if the stream can no longer be framed."""
        if self.state is State.CLOSED:
            raise ProtocolError("engine closed")
        try:
            frames = self._framer.feed(data)
        except CodecError:
            self.state = State.CLOSED
            raise
        for f in frames:
            raw = f.raw
            try:
                msg = codec.decode_frame(f)
            except CodecError as err:
                inv = _invalid_response(f, err)
                self._queue.append(InvalidParameter(inv, err) if inv else MalformedRequest(raw, err))
                continue
            if not msg.IS_REQUEST:
                self._queue.append(MalformedRequest(raw, CodecError("not-a-request", f"{msg.NAME} response sent as a request")))
            elif getattr(msg, "request_id", 1) == 0:  # clause 6.3: Request_ID is non-zero
                self._queue.append(MalformedRequest(raw, CodecError("zero-request-id", "Request_ID is zero")))
            else:
                self._queue.append(RequestReceived(msg, raw, self._note_id(msg.request_id)))  # type: ignore[attr-defined]

    def next_event(self) -> Event | None:
        if self.state is not State.IDLE or not self._queue:
            return None
        self._current = self._queue.popleft()
        self.state = State.SERVING
        return self._current

    def send_response(self, resp: Message) -> bytes:
        if self.state is not State.SERVING or self._current is None:
            raise ProtocolError("no request is open")
        cur = self._current
        if isinstance(resp, BadRequestResponse):
            if resp.response == GeneralResponse.BUSY and resp.request_copy:
                raise ProtocolError("clause 7.1: a busy BadRequest carries no copy")
        elif isinstance(cur, RequestReceived):
            if type(resp) is not RESPONSE_FOR[type(cur.request)] or resp.request_id != cur.request.request_id:  # type: ignore[attr-defined]
                raise ProtocolError("response does not match the open request")
        elif isinstance(cur, InvalidParameter):
            if type(resp) is not type(cur.response):
                raise ProtocolError("response does not match the open request")
        self.state = State.IDLE
        self._current = None
        return resp.encode()


class InitiatorEngine:
    """Allocates Request_IDs (non-zero, unique per connection: a counter) and checks echoes."""

    def __init__(self, first_id: int = 1, max_value: int = codec.MAX_VALUE_LEN) -> None:
        self._framer = codec.Framer(max_value, skip_oversized=True)
        self.max_value = max_value
        self._next = first_id or 1
        self._used: set[int] = set()
        self._open: Message | None = None
        self._open_raw = b""

    def new_request_id(self) -> int:
        rid = self._next
        while rid == 0 or rid in self._used:
            rid = (rid + 1) & codec.MAX_UINT32
        self._used.add(rid)
        self._next = (rid + 1) & codec.MAX_UINT32
        return rid

    @property
    def waiting(self) -> bool:
        return self._open is not None

    def send_request(self, req: Message, max_value: int | None = None) -> bytes:
        """`max_value`: the largest response value accepted for this request (default: the
        engine's); a larger one is skipped and reported as ResponseTooLarge."""
        if self._open is not None:
            raise ProtocolError("clause 6.4: an RRP is already open on this connection")
        if not req.IS_REQUEST:
            raise ValueError("not a request")
        self._open = req
        self._open_raw = req.encode()
        self._framer.max_value = self.max_value if max_value is None else max_value
        return self._open_raw

    def receive_data(self, data: bytes) -> Message | None:
        """The response to the open request once complete; ProtocolError on any mismatch."""
        try:
            frames = self._framer.feed(data)
        except CodecError as err:
            raise ProtocolError(f"unframeable response: {err}") from None
        if not frames:
            return None
        if self._open is None or len(frames) > 1:
            raise ProtocolError("unsolicited response")
        if isinstance(frames[0], codec.OversizedFrame):
            req, self._open = self._open, None
            raise ResponseTooLarge(req.NAME, frames[0].length, self._framer.max_value)
        try:
            msg = codec.decode_frame(frames[0])
        except CodecError as err:
            raise ProtocolError(f"undecodable response: {err}") from None
        req, self._open = self._open, None
        if isinstance(msg, BadRequestResponse):
            if msg.request_copy and msg.request_copy != self._open_raw:
                raise ProtocolError("BadRequest copy is not our request")
            return msg
        if type(msg) is not RESPONSE_FOR[type(req)]:
            raise ProtocolError(f"{msg.NAME} response to a {req.NAME} request")
        if msg.request_id != req.request_id:  # type: ignore[attr-defined]
            raise ProtocolError("Request_ID not echoed")
        return msg
