# SCPM constants and error numbers (docs/scpm-profile.md sections 1-8), public for the host,
# tests and applications. The firmware's own modules do not import this module: each
# keeps the numbers it needs as module-private `_NAME = const(...)`, which the compiler
# folds away (a public name costs the board a dict entry and a qstr; issue 9 #9), and a
# test checks that every such copy equals the value here (fwtest_scpm_const.py).
from micropython import const

from tessera_fw.scpm.frame import SCPMError, name  # noqa: F401 - part of this module's API

HD_PLAIN = const(0x10)
HD_SECURE = const(0x11)
HDR = const(11)  # HD SA DA BC
MAX_ADATA = const(1100)
MAX_PADATA = const(1024)
MAC_LEN = const(16)
WINDOW = const(32)
SNF_RESERVE = const(64)
SNF_MAX = const(0xFFFFFFFF)  # never sent
SNF_MASTER_LIMIT = const(0xFFFF0000)  # past this the device asks for a master key update
PORT = const(24767)
KSN_DEFAULT = const(1)

SVC_AUTH = const(1)
SVC_CONF = const(2)
SVC_AUTH_CONF = const(3)

KIND_SETUP = const(0)
KIND_USER = const(1)
KIND_SP = const(2)
KIND_MAKER = const(3)
KIND_MASTER = const(4)

# key-management OPs (section 6)
OP_ENROL_HELLO = const(0x01)
OP_ENROL_CHALLENGE = const(0x02)
OP_USER_KEY_INIT = const(0x03)
OP_USER_KEY_INIT_ACK = const(0x04)
OP_SP_KEY_INIT = const(0x05)
OP_SP_KEY_INIT_ACK = const(0x06)
OP_MAKER_KEY_INIT = const(0x07)
OP_MAKER_KEY_INIT_ACK = const(0x08)
OP_USER_KEY_SET = const(0x09)
OP_USER_KEY_SET_ACK = const(0x0A)
OP_MKU_START = const(0x10)
OP_MKU_RESPONSE = const(0x11)
OP_MKU_COMMIT = const(0x12)
OP_MKU_COMMIT_ACK = const(0x13)
OP_MKU_ABORT = const(0x14)
OP_MKU_REQUEST = const(0x15)
OP_SYNC_REQ = const(0x18)
OP_SYNC_RESP = const(0x19)
OP_KM_ERROR = const(0x1F)
# application OPs (section 7)
OP_APP_GET = const(0x40)
OP_APP_SET = const(0x41)
OP_APP_RESULT = const(0x42)

REASON_OPERATOR = const(1)
REASON_SNF = const(2)
REASON_COMPROMISE = const(3)

# error numbers (section 8)
ERR_TRUNCATED = const(1)
ERR_LENGTH = const(2)
ERR_OVERSIZE = const(3)
ERR_HEADER = const(4)
ERR_SHD = const(5)
ERR_ALGORITHM = const(6)
ERR_NOT_FOR_ME = const(7)
ERR_NO_KEY = const(8)
ERR_SNF = const(9)
ERR_REPLAY = const(10)
ERR_TOO_OLD = const(11)
ERR_MAC = const(12)
ERR_PADDING = const(13)
ERR_BCC = const(14)
ERR_AUTHORITY = const(15)
ERR_WRONG_KSN = const(16)
ERR_STATE = const(17)
ERR_MALFORMED = const(18)
ERR_DH = const(19)
ERR_CONFIRM = const(20)
ERR_SNF_EXHAUSTED = const(21)
ERR_UNKNOWN_OP = const(22)
# Defined by this project, not by the profile's section 8: a local counter only, never sent
# (frames failing decode are never answered). An authenticated frame from a new peer when
# the device's peer table is full (device.MAX_PEERS).
ERR_PEERS_FULL = const(23)

# the names: name(code) -> "ERR_MAC" (frame.py), built only where printed
