"""Tessera's public Python API for host scripts (docs/scripting.md).

Everything a script may rely on is listed in `__all__` below and re-exported by the
`tessera` package itself (`from tessera import Ksn, Board`). Names not listed here, and every
name starting with an underscore, are internal and may change without notice.

- boards, real or virtual: `Board` (tessera.api.boards)
- the SCPM key setting node: `AsyncKsn`, `Ksn`, `serve_ksn` (tessera.api.ksn)
- the ASM initiator and log collector: `AsmClient`, `collect_log` (tessera.api.asm)
- secure RMCP-2: `SessionManager`, `AsyncSessionManager`, `MaAgent`, `AsyncMaAgent`
  (tessera.api.rmcp2; every name of its `__all__` is re-exported here)
- the SimulCrypt roles: the submodule `tessera.api.simulcrypt`, with its own `__all__`
  (not re-exported by `tessera`, whose `tessera.simulcrypt` is the protocol package)
- errors: `TesseraError` and its subclasses (tessera.api.errors)
"""
from __future__ import annotations

from tessera.api.asm import (Asm, AsmClient, AsmError, AsmLinkError, AsmPeerRejected, AsmProtocolError, AsmRefused,
                             AsmResponder, ClockOffset, CollectedRecord, CollectProgress, CollectResult, Credentials,
                             LEKey, SpbStatus, collected_records, pki_credentials, response_name, set_spb_status)
from tessera.api.boards import (Board, BoardStatus, BridgeStatus, DeployProgress, DeployResult, SelftestReport,
                                Speed, serial_ports, virtual_boards)
from tessera.api.errors import (BatchFailed, BoardError, DeviceError, InvalidKey, KsnBusy, KsnError, NoDatabase,
                                TesseraError, UnknownDevice)
from tessera.api.ksn import (KSN_ADDRESS, KSN_PORT, AsyncKsn, DeviceInfo, Enrolled, ErrorCode, KeyInstalled, Ksn,
                             KsnEndpoint, Rotated, Synced, Timing, format_addr, list_devices, parse_addr, serve_ksn)
from tessera.api.rmcp2 import (AclEntry, Admission, AgentError, AgentStatus, AsyncContentSource, AsyncMaAgent,
                               AsyncSessionManager, ContentSource, MaAgent, SourceStatus, MemberInfo, NoSession, PolicyInfo, PolicyRefused, Rekeyed, RequestRefused,
                               SecReturn, Serving, SessionManager, SmEndpoint, SmError, SmNotServing, SmSettings,
                               SmStatus, SubscriptionRefused, SubsResult, TreeStatus, Truncated, make_sm_pki)

__all__ = [
    # boards
    "Board", "BoardStatus", "BridgeStatus", "DeployProgress", "DeployResult", "SelftestReport", "Speed", "serial_ports",
    "virtual_boards",
    # SCPM key setting node
    "AsyncKsn", "Ksn", "serve_ksn", "list_devices", "DeviceInfo", "Enrolled", "KeyInstalled", "Rotated", "Synced",
    "KsnEndpoint", "Timing", "ErrorCode", "KSN_ADDRESS", "KSN_PORT", "format_addr", "parse_addr",
    # ASM
    "Asm", "AsmClient", "AsmResponder", "Credentials", "LEKey", "SpbStatus", "ClockOffset", "CollectProgress",
    "CollectResult", "CollectedRecord", "collected_records", "pki_credentials", "response_name", "set_spb_status",
    "AsmError", "AsmLinkError", "AsmPeerRejected", "AsmProtocolError", "AsmRefused",
    # secure RMCP-2 (tessera.api.rmcp2)
    "SessionManager", "AsyncSessionManager", "Serving", "SmSettings", "SmEndpoint", "SmStatus", "MemberInfo",
    "PolicyInfo", "AclEntry", "Rekeyed", "Truncated", "MaAgent", "AsyncMaAgent", "Admission", "AgentStatus",
    "SubsResult", "SecReturn", "make_sm_pki", "SmError", "NoSession", "SmNotServing", "RequestRefused", "AgentError",
    "SubscriptionRefused", "PolicyRefused", "TreeStatus", "AsyncContentSource", "ContentSource", "SourceStatus",
    # errors
    "TesseraError", "BoardError", "KsnError", "NoDatabase", "KsnBusy", "InvalidKey", "UnknownDevice", "DeviceError",
    "BatchFailed",
]
