"""Message, parameter and error_status tables of ETSI TS 103 197 for the two interfaces SP-4
uses (/work/shared/reference/simulcrypt.md): ECMG<->SCS (clause 5) and EMMG<->MUX (clause 6).

Cardinality rules are (min, max) per parameter; max None means "n". Parameters not listed
for a message are not allowed in it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Interface(enum.Enum):
    ECMG = "ECMG<->SCS"
    EMMG = "EMMG<->MUX"


# Protocol versions accepted (reference: 2 and 3 on ECMG<->SCS, 1 to 5 on EMMG<->MUX).
# EMMG<->MUX version 1 is refused with `unsupported protocol version` (0x0002), project
# decision: version 1 has no data_id, and BCAST SP-4 14.1.1.3.4 identifies an LTKM stream by
# data_type + client_id + data_id and routes it (IP address and port) by data_id; a v1 EMMG
# could set up a channel but never a routable LTKM stream. Refusing at channel_setup says so
# at once instead of failing later at stream_setup.
VERSIONS = {Interface.ECMG: frozenset({2, 3}), Interface.EMMG: frozenset({2, 3, 4, 5})}
DEFAULT_VERSION = {Interface.ECMG: 3, Interface.EMMG: 3}

# section_TSpkt_flag: BCAST SP-4 14.1.1.3.1 / 14.1.1.3.4 allow only 0x02 (binary STKM/LTKM).
SECTION_TSPKT_BCAST = 0x02
# data_type 0x00 = EMM, which BCAST maps to LTKM (14.1.1.3.4).
DATA_TYPE_LTKM = 0x00
# Super_CAS_id / client_id first two bytes (14.1.1.3.1, 14.1.1.3.4).
PROFILE_DRM = 0x0001
PROFILE_SMARTCARD = 0x0002
# BCAST errors (App C of the BCAST spec) are carried as 0x8000 + n (14.1.1.3.2).
BCAST_ERROR_BASE = 0x8000
USER_DEFINED_MIN = 0x8000  # message types 0x8000-0xFFFF are user defined


def bcast_error(n: int) -> int:
    if not 0 <= n <= 0x7FFF:
        raise ValueError("BCAST error number out of range")
    return BCAST_ERROR_BASE + n


def profile_of(ident: int) -> int:
    """The profile half (first two bytes) of a Super_CAS_id or client_id."""
    return (ident >> 16) & 0xFFFF


@dataclass(frozen=True)
class ParamSpec:
    code: int
    name: str
    length: int | None  # fixed length in bytes, None = variable
    signed: bool = False
    min_length: int = 0  # for variable-length parameters


@dataclass(frozen=True)
class MsgSpec:
    code: int
    name: str
    rules: dict[int, tuple[int, int | None]]


# --- ECMG <-> SCS (TS 103 197 clause 5) ----------------------------------------------------
class EP(enum.IntEnum):
    SUPER_CAS_ID = 0x0001
    SECTION_TSPKT_FLAG = 0x0002
    DELAY_START = 0x0003
    DELAY_STOP = 0x0004
    TRANSITION_DELAY_START = 0x0005
    TRANSITION_DELAY_STOP = 0x0006
    ECM_REP_PERIOD = 0x0007
    MAX_STREAMS = 0x0008
    MIN_CP_DURATION = 0x0009
    LEAD_CW = 0x000A
    CW_PER_MSG = 0x000B
    MAX_COMP_TIME = 0x000C
    ACCESS_CRITERIA = 0x000D
    ECM_CHANNEL_ID = 0x000E
    ECM_STREAM_ID = 0x000F
    NOMINAL_CP_DURATION = 0x0010
    ACCESS_CRITERIA_TRANSFER_MODE = 0x0011
    CP_NUMBER = 0x0012
    CP_DURATION = 0x0013
    CP_CW_COMBINATION = 0x0014
    ECM_DATAGRAM = 0x0015
    AC_DELAY_START = 0x0016
    AC_DELAY_STOP = 0x0017
    CW_ENCRYPTION = 0x0018
    ECM_ID = 0x0019
    ERROR_STATUS = 0x7000
    ERROR_INFORMATION = 0x7001


class EM(enum.IntEnum):
    CHANNEL_SETUP = 0x0001
    CHANNEL_TEST = 0x0002
    CHANNEL_STATUS = 0x0003
    CHANNEL_CLOSE = 0x0004
    CHANNEL_ERROR = 0x0005
    STREAM_SETUP = 0x0101
    STREAM_TEST = 0x0102
    STREAM_STATUS = 0x0103
    STREAM_CLOSE_REQUEST = 0x0104
    STREAM_CLOSE_RESPONSE = 0x0105
    STREAM_ERROR = 0x0106
    CW_PROVISION = 0x0201
    ECM_RESPONSE = 0x0202


class EE(enum.IntEnum):
    """ECMG<->SCS error_status values (TS 103 197 5.6)."""
    INVALID_MESSAGE = 0x0001
    UNSUPPORTED_PROTOCOL_VERSION = 0x0002
    UNKNOWN_MESSAGE_TYPE = 0x0003
    MESSAGE_TOO_LONG = 0x0004
    UNKNOWN_SUPER_CAS_ID = 0x0005
    UNKNOWN_ECM_CHANNEL_ID = 0x0006
    UNKNOWN_ECM_STREAM_ID = 0x0007
    TOO_MANY_CHANNELS_ON_ECMG = 0x0008
    TOO_MANY_STREAMS_ON_CHANNEL = 0x0009
    TOO_MANY_STREAMS_ON_ECMG = 0x000A
    NOT_ENOUGH_CWS = 0x000B
    OUT_OF_STORAGE = 0x000C
    OUT_OF_COMPUTATION = 0x000D
    UNKNOWN_PARAMETER_TYPE = 0x000E
    INCONSISTENT_LENGTH = 0x000F
    MISSING_MANDATORY_PARAMETER = 0x0010
    INVALID_VALUE = 0x0011
    UNKNOWN_ECM_ID = 0x0012
    ECM_CHANNEL_ID_IN_USE = 0x0013
    ECM_STREAM_ID_IN_USE = 0x0014
    ECM_ID_IN_USE = 0x0015
    UNKNOWN_ERROR = 0x7000
    UNRECOVERABLE_ERROR = 0x7001


# --- EMMG <-> MUX (TS 103 197 clause 6) -----------------------------------------------------
class MP(enum.IntEnum):
    CLIENT_ID = 0x0001
    SECTION_TSPKT_FLAG = 0x0002
    DATA_CHANNEL_ID = 0x0003
    DATA_STREAM_ID = 0x0004
    DATAGRAM = 0x0005
    BANDWIDTH = 0x0006
    DATA_TYPE = 0x0007
    DATA_ID = 0x0008
    ERROR_STATUS = 0x7000
    ERROR_INFORMATION = 0x7001


class MM(enum.IntEnum):
    CHANNEL_SETUP = 0x0011
    CHANNEL_TEST = 0x0012
    CHANNEL_STATUS = 0x0013
    CHANNEL_CLOSE = 0x0014
    CHANNEL_ERROR = 0x0015
    STREAM_SETUP = 0x0111
    STREAM_TEST = 0x0112
    STREAM_STATUS = 0x0113
    STREAM_CLOSE_REQUEST = 0x0114
    STREAM_CLOSE_RESPONSE = 0x0115
    STREAM_ERROR = 0x0116
    STREAM_BW_REQUEST = 0x0117
    STREAM_BW_ALLOCATION = 0x0118
    DATA_PROVISION = 0x0211


class ME(enum.IntEnum):
    """EMMG<->MUX error_status values (TS 103 197 6.2.6)."""
    INVALID_MESSAGE = 0x0001
    UNSUPPORTED_PROTOCOL_VERSION = 0x0002
    UNKNOWN_MESSAGE_TYPE = 0x0003
    MESSAGE_TOO_LONG = 0x0004
    UNKNOWN_DATA_STREAM_ID = 0x0005
    UNKNOWN_DATA_CHANNEL_ID = 0x0006
    TOO_MANY_CHANNELS_ON_MUX = 0x0007
    TOO_MANY_STREAMS_ON_CHANNEL = 0x0008
    TOO_MANY_STREAMS_ON_MUX = 0x0009
    UNKNOWN_PARAMETER_TYPE = 0x000A
    INCONSISTENT_LENGTH = 0x000B
    MISSING_MANDATORY_PARAMETER = 0x000C
    INVALID_VALUE = 0x000D
    UNKNOWN_CLIENT_ID = 0x000E
    EXCEEDED_BANDWIDTH = 0x000F
    UNKNOWN_DATA_ID = 0x0010
    DATA_CHANNEL_ID_IN_USE = 0x0011
    DATA_STREAM_ID_IN_USE = 0x0012
    DATA_ID_IN_USE = 0x0013
    CLIENT_ID_IN_USE = 0x0014
    UNKNOWN_ERROR = 0x7000
    UNRECOVERABLE_ERROR = 0x7001


# The parameter an error_status is about, for the 2-byte error_information form (the
# parameter_type of the faulty parameter, TS 103 197: error_information "can be an ASCII
# text or the parameter ID value of a faulty parameter").
STATUS_PARAM: dict[Interface, dict[int, int]] = {
    Interface.ECMG: {
        EE.UNKNOWN_SUPER_CAS_ID: EP.SUPER_CAS_ID, EE.UNKNOWN_ECM_CHANNEL_ID: EP.ECM_CHANNEL_ID,
        EE.UNKNOWN_ECM_STREAM_ID: EP.ECM_STREAM_ID, EE.NOT_ENOUGH_CWS: EP.CP_CW_COMBINATION,
        EE.UNKNOWN_ECM_ID: EP.ECM_ID, EE.ECM_CHANNEL_ID_IN_USE: EP.ECM_CHANNEL_ID,
        EE.ECM_STREAM_ID_IN_USE: EP.ECM_STREAM_ID, EE.ECM_ID_IN_USE: EP.ECM_ID,
    },
    Interface.EMMG: {
        ME.UNKNOWN_DATA_STREAM_ID: MP.DATA_STREAM_ID, ME.UNKNOWN_DATA_CHANNEL_ID: MP.DATA_CHANNEL_ID,
        ME.UNKNOWN_CLIENT_ID: MP.CLIENT_ID, ME.EXCEEDED_BANDWIDTH: MP.DATAGRAM, ME.UNKNOWN_DATA_ID: MP.DATA_ID,
        ME.DATA_CHANNEL_ID_IN_USE: MP.DATA_CHANNEL_ID, ME.DATA_STREAM_ID_IN_USE: MP.DATA_STREAM_ID,
        ME.DATA_ID_IN_USE: MP.DATA_ID, ME.CLIENT_ID_IN_USE: MP.CLIENT_ID,
    },
}


class ErrorInfo(enum.Enum):
    """What goes into error_information. PARAM (the default): the 2-byte parameter_type of the
    faulty parameter when one is to blame, else no error_information at all (it is optional,
    cardinality 0..n): deployed head-end tools fix this parameter at 2 bytes. TEXT: the ASCII
    reason (allowed by TS 103 197; readable, but longer than 2 bytes)."""
    PARAM = "param"
    TEXT = "text"


_ECMG_PARAMS = [
    ParamSpec(EP.SUPER_CAS_ID, "Super_CAS_id", 4),
    ParamSpec(EP.SECTION_TSPKT_FLAG, "section_TSpkt_flag", 1),
    ParamSpec(EP.DELAY_START, "delay_start", 2, signed=True),
    ParamSpec(EP.DELAY_STOP, "delay_stop", 2, signed=True),
    ParamSpec(EP.TRANSITION_DELAY_START, "transition_delay_start", 2, signed=True),
    ParamSpec(EP.TRANSITION_DELAY_STOP, "transition_delay_stop", 2, signed=True),
    ParamSpec(EP.ECM_REP_PERIOD, "ECM_rep_period", 2),
    ParamSpec(EP.MAX_STREAMS, "max_streams", 2),
    ParamSpec(EP.MIN_CP_DURATION, "min_CP_duration", 2),
    ParamSpec(EP.LEAD_CW, "lead_CW", 1),
    ParamSpec(EP.CW_PER_MSG, "CW_per_msg", 1),
    ParamSpec(EP.MAX_COMP_TIME, "max_comp_time", 2),
    ParamSpec(EP.ACCESS_CRITERIA, "access_criteria", None),
    ParamSpec(EP.ECM_CHANNEL_ID, "ECM_channel_id", 2),
    ParamSpec(EP.ECM_STREAM_ID, "ECM_stream_id", 2),
    ParamSpec(EP.NOMINAL_CP_DURATION, "nominal_CP_duration", 2),
    ParamSpec(EP.ACCESS_CRITERIA_TRANSFER_MODE, "access_criteria_transfer_mode", 1),
    ParamSpec(EP.CP_NUMBER, "CP_number", 2),
    ParamSpec(EP.CP_DURATION, "CP_duration", 2),
    ParamSpec(EP.CP_CW_COMBINATION, "CP_CW_combination", None, min_length=3),
    ParamSpec(EP.ECM_DATAGRAM, "ECM_datagram", None),
    ParamSpec(EP.AC_DELAY_START, "AC_delay_start", 2, signed=True),
    ParamSpec(EP.AC_DELAY_STOP, "AC_delay_stop", 2, signed=True),
    ParamSpec(EP.CW_ENCRYPTION, "CW_encryption", None),
    ParamSpec(EP.ECM_ID, "ECM_id", 2),
    ParamSpec(EP.ERROR_STATUS, "error_status", 2),
    ParamSpec(EP.ERROR_INFORMATION, "error_information", None),
]

_EMMG_PARAMS = [
    ParamSpec(MP.CLIENT_ID, "client_id", 4),
    ParamSpec(MP.SECTION_TSPKT_FLAG, "section_TSpkt_flag", 1),
    ParamSpec(MP.DATA_CHANNEL_ID, "data_channel_id", 2),
    ParamSpec(MP.DATA_STREAM_ID, "data_stream_id", 2),
    ParamSpec(MP.DATAGRAM, "datagram", None),
    ParamSpec(MP.BANDWIDTH, "bandwidth", 2),
    ParamSpec(MP.DATA_TYPE, "data_type", 1),
    ParamSpec(MP.DATA_ID, "data_id", 2),
    ParamSpec(MP.ERROR_STATUS, "error_status", 2),
    ParamSpec(MP.ERROR_INFORMATION, "error_information", None),
]

ONE = (1, 1)
OPT = (0, 1)
MANY = (1, None)
ANY = (0, None)

_C, _S = EP.ECM_CHANNEL_ID, EP.ECM_STREAM_ID
_ECMG_MSGS = [
    MsgSpec(EM.CHANNEL_SETUP, "channel_setup", {_C: ONE, EP.SUPER_CAS_ID: ONE}),
    MsgSpec(EM.CHANNEL_TEST, "channel_test", {_C: ONE}),
    MsgSpec(EM.CHANNEL_STATUS, "channel_status", {
        _C: ONE, EP.SECTION_TSPKT_FLAG: ONE, EP.AC_DELAY_START: OPT, EP.AC_DELAY_STOP: OPT,
        EP.DELAY_START: ONE, EP.DELAY_STOP: ONE, EP.TRANSITION_DELAY_START: OPT,
        EP.TRANSITION_DELAY_STOP: OPT, EP.ECM_REP_PERIOD: ONE, EP.MAX_STREAMS: ONE,
        EP.MIN_CP_DURATION: ONE, EP.LEAD_CW: ONE, EP.CW_PER_MSG: ONE, EP.MAX_COMP_TIME: ONE}),
    MsgSpec(EM.CHANNEL_CLOSE, "channel_close", {_C: ONE}),
    MsgSpec(EM.CHANNEL_ERROR, "channel_error", {_C: ONE, EP.ERROR_STATUS: MANY, EP.ERROR_INFORMATION: ANY}),
    MsgSpec(EM.STREAM_SETUP, "stream_setup", {_C: ONE, _S: ONE, EP.ECM_ID: ONE, EP.NOMINAL_CP_DURATION: ONE}),
    MsgSpec(EM.STREAM_TEST, "stream_test", {_C: ONE, _S: ONE}),
    MsgSpec(EM.STREAM_STATUS, "stream_status", {_C: ONE, _S: ONE, EP.ECM_ID: ONE, EP.ACCESS_CRITERIA_TRANSFER_MODE: ONE}),
    MsgSpec(EM.STREAM_CLOSE_REQUEST, "stream_close_request", {_C: ONE, _S: ONE}),
    MsgSpec(EM.STREAM_CLOSE_RESPONSE, "stream_close_response", {_C: ONE, _S: ONE}),
    MsgSpec(EM.STREAM_ERROR, "stream_error", {_C: ONE, _S: ONE, EP.ERROR_STATUS: MANY, EP.ERROR_INFORMATION: ANY}),
    MsgSpec(EM.CW_PROVISION, "CW_provision", {
        _C: ONE, _S: ONE, EP.CP_NUMBER: ONE, EP.CW_ENCRYPTION: OPT, EP.CP_CW_COMBINATION: MANY,
        EP.CP_DURATION: OPT, EP.ACCESS_CRITERIA: OPT}),
    MsgSpec(EM.ECM_RESPONSE, "ECM_response", {_C: ONE, _S: ONE, EP.CP_NUMBER: ONE, EP.ECM_DATAGRAM: ONE}),
]

_K, _D = MP.CLIENT_ID, MP.DATA_CHANNEL_ID
_ST = MP.DATA_STREAM_ID
_EMMG_MSGS = [
    MsgSpec(MM.CHANNEL_SETUP, "channel_setup", {_K: ONE, _D: ONE, MP.SECTION_TSPKT_FLAG: ONE}),
    MsgSpec(MM.CHANNEL_TEST, "channel_test", {_K: ONE, _D: ONE}),
    MsgSpec(MM.CHANNEL_STATUS, "channel_status", {_K: ONE, _D: ONE, MP.SECTION_TSPKT_FLAG: ONE}),
    MsgSpec(MM.CHANNEL_CLOSE, "channel_close", {_K: ONE, _D: ONE}),
    MsgSpec(MM.CHANNEL_ERROR, "channel_error", {_K: ONE, _D: ONE, MP.ERROR_STATUS: MANY, MP.ERROR_INFORMATION: ANY}),
    MsgSpec(MM.STREAM_SETUP, "stream_setup", {_K: ONE, _D: ONE, _ST: ONE, MP.DATA_ID: ONE, MP.DATA_TYPE: ONE}),
    MsgSpec(MM.STREAM_TEST, "stream_test", {_K: ONE, _D: ONE, _ST: ONE}),
    MsgSpec(MM.STREAM_STATUS, "stream_status", {_K: ONE, _D: ONE, _ST: ONE, MP.DATA_ID: ONE, MP.DATA_TYPE: ONE}),
    MsgSpec(MM.STREAM_CLOSE_REQUEST, "stream_close_request", {_K: ONE, _D: ONE, _ST: ONE}),
    MsgSpec(MM.STREAM_CLOSE_RESPONSE, "stream_close_response", {_K: ONE, _D: ONE, _ST: ONE}),
    MsgSpec(MM.STREAM_ERROR, "stream_error", {_K: ONE, _D: ONE, _ST: ONE, MP.ERROR_STATUS: MANY, MP.ERROR_INFORMATION: ANY}),
    MsgSpec(MM.STREAM_BW_REQUEST, "stream_BW_request", {_K: ONE, _D: ONE, _ST: ONE, MP.BANDWIDTH: OPT}),
    MsgSpec(MM.STREAM_BW_ALLOCATION, "stream_BW_allocation", {_K: ONE, _D: ONE, _ST: ONE, MP.BANDWIDTH: OPT}),
    MsgSpec(MM.DATA_PROVISION, "data_provision", {_K: ONE, _D: OPT, _ST: OPT, MP.DATA_ID: ONE, MP.DATAGRAM: MANY}),
]

PARAMS: dict[Interface, dict[int, ParamSpec]] = {
    Interface.ECMG: {p.code: p for p in _ECMG_PARAMS},
    Interface.EMMG: {p.code: p for p in _EMMG_PARAMS},
}
MESSAGES: dict[Interface, dict[int, MsgSpec]] = {
    Interface.ECMG: {m.code: m for m in _ECMG_MSGS},
    Interface.EMMG: {m.code: m for m in _EMMG_MSGS},
}
PARAM_BY_NAME = {i: {p.name: p for p in PARAMS[i].values()} for i in Interface}
MSG_BY_NAME = {i: {m.name: m for m in MESSAGES[i].values()} for i in Interface}


def interface_of(message_type: int) -> Interface | None:
    for itf, table in MESSAGES.items():
        if message_type in table:
            return itf
    return None


def error_name(itf: Interface, status: int) -> str:
    if status >= BCAST_ERROR_BASE:
        return f"BCAST error {status - BCAST_ERROR_BASE:03d}"
    enum_ = EE if itf is Interface.ECMG else ME
    try:
        return enum_(status).name.lower()
    except ValueError:
        return f"error 0x{status:04x}"
