"""Writes tests/vectors/simulcrypt/{ecmg,emmg}.json: one frame per message type of each
interface, hex; and cw_encryption.json: the project's CW_encryption layouts (v2 encrypted and
authenticated, v1 legacy) computed from fixed keys and counters. Parameter values are fixed so the files are stable; the frames were
cross-checked with tshark's SimulCrypt dissector (tests/host/simulcrypt/test_tshark.py
decodes the same kind of traffic). The first ECMG case is the channel_setup example of
/work/shared/reference/simulcrypt.md byte for byte."""
from __future__ import annotations

import json
from pathlib import Path

from tessera.simulcrypt import stkm
from tessera.simulcrypt.codec import Message
from tessera.simulcrypt.tables import EM, EP, MM, MP, Interface

OUT = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "simulcrypt"

# CW_encryption (project layout, docs/bcast-profile.md): fixed CWT key, counter and CWs
CWT_KEY, CWT_ID, CWE_COUNTER = bytes(range(0x40, 0x50)), 1, bytes(range(16))
CWE_CTX = stkm.CwContext(0x00010042, 0x0101, 7)  # the channel / stream of the ECMG vectors below
CWE_CWS = [(7, bytes(range(16, 32))), (8, bytes(range(32, 48)))]
CWE_VALUE, CWE_ENC = stkm.seal_cws(CWT_KEY, CWT_ID, CWE_CTX, CWE_CWS, counter=CWE_COUNTER)

C, S = (EP.ECM_CHANNEL_ID, 1), (EP.ECM_STREAM_ID, 2)
ECMG = [
    ("channel_setup_reference", 2, EM.CHANNEL_SETUP, [(EP.ECM_CHANNEL_ID, 1), (EP.SUPER_CAS_ID, 0x4AE60000)]),
    ("channel_setup", 3, EM.CHANNEL_SETUP, [C, (EP.SUPER_CAS_ID, 0x00010042)]),
    ("channel_test", 3, EM.CHANNEL_TEST, [C]),
    ("channel_status", 3, EM.CHANNEL_STATUS, [C, (EP.SECTION_TSPKT_FLAG, 2), (EP.AC_DELAY_START, -100),
                                               (EP.AC_DELAY_STOP, 50), (EP.DELAY_START, -200), (EP.DELAY_STOP, 0),
                                               (EP.TRANSITION_DELAY_START, -500), (EP.TRANSITION_DELAY_STOP, 0),
                                               (EP.ECM_REP_PERIOD, 100), (EP.MAX_STREAMS, 128),
                                               (EP.MIN_CP_DURATION, 1), (EP.LEAD_CW, 1), (EP.CW_PER_MSG, 2),
                                               (EP.MAX_COMP_TIME, 100)]),
    ("channel_close", 3, EM.CHANNEL_CLOSE, [C]),
    ("channel_error", 3, EM.CHANNEL_ERROR, [C, (EP.ERROR_STATUS, 0x0006), (EP.ERROR_STATUS, 0x8003),
                                             (EP.ERROR_INFORMATION, b"unknown channel")]),
    # the 2-byte error_information Tessera sends by default: the faulty parameter's type
    # (here ECM_channel_id 0x000e), the answer to a channel_test on channel 9 that is not set up
    ("channel_error_param_info", 3, EM.CHANNEL_ERROR, [(EP.ECM_CHANNEL_ID, 9), (EP.ERROR_STATUS, 0x0006),
                                                        (EP.ERROR_INFORMATION, b"\x00\x0e")]),
    ("stream_setup", 3, EM.STREAM_SETUP, [C, S, (EP.ECM_ID, 0x0101), (EP.NOMINAL_CP_DURATION, 100)]),
    ("stream_test", 3, EM.STREAM_TEST, [C, S]),
    ("stream_status", 3, EM.STREAM_STATUS, [C, S, (EP.ECM_ID, 0x0101), (EP.ACCESS_CRITERIA_TRANSFER_MODE, 0)]),
    ("stream_close_request", 3, EM.STREAM_CLOSE_REQUEST, [C, S]),
    ("stream_close_response", 3, EM.STREAM_CLOSE_RESPONSE, [C, S]),
    ("stream_error", 3, EM.STREAM_ERROR, [C, S, (EP.ERROR_STATUS, 0x000B)]),
    ("CW_provision", 3, EM.CW_PROVISION, [C, S, (EP.CP_NUMBER, 7),
                                           (EP.CW_ENCRYPTION, CWE_VALUE),
                                           (EP.CP_CW_COMBINATION, bytes.fromhex("0007") + CWE_ENC[0]),
                                           (EP.CP_CW_COMBINATION, bytes.fromhex("0008") + CWE_ENC[1]),
                                           (EP.CP_DURATION, 100),
                                           (EP.ACCESS_CRITERIA, bytes.fromhex("010001020002abcd030000"))]),
    ("ECM_response", 3, EM.ECM_RESPONSE, [C, S, (EP.CP_NUMBER, 7), (EP.ECM_DATAGRAM, bytes.fromhex("0101") + bytes(20))]),
]

K, D, T = (MP.CLIENT_ID, 0x00010007), (MP.DATA_CHANNEL_ID, 3), (MP.DATA_STREAM_ID, 4)
EMMG = [
    ("channel_setup", 3, MM.CHANNEL_SETUP, [K, D, (MP.SECTION_TSPKT_FLAG, 2)]),
    ("channel_test", 3, MM.CHANNEL_TEST, [K, D]),
    ("channel_status", 3, MM.CHANNEL_STATUS, [K, D, (MP.SECTION_TSPKT_FLAG, 2)]),
    ("channel_close", 3, MM.CHANNEL_CLOSE, [K, D]),
    ("channel_error", 3, MM.CHANNEL_ERROR, [K, D, (MP.ERROR_STATUS, 0x000E)]),
    ("stream_setup", 3, MM.STREAM_SETUP, [K, D, T, (MP.DATA_ID, 0x0201), (MP.DATA_TYPE, 0)]),
    ("stream_test", 3, MM.STREAM_TEST, [K, D, T]),
    ("stream_status", 3, MM.STREAM_STATUS, [K, D, T, (MP.DATA_ID, 0x0201), (MP.DATA_TYPE, 0)]),
    ("stream_close_request", 3, MM.STREAM_CLOSE_REQUEST, [K, D, T]),
    ("stream_close_response", 3, MM.STREAM_CLOSE_RESPONSE, [K, D, T]),
    ("stream_error", 3, MM.STREAM_ERROR, [K, D, T, (MP.ERROR_STATUS, 0x000F), (MP.ERROR_INFORMATION, b"bw")]),
    # exceeded bandwidth with the 2-byte error_information naming datagram (0x0005)
    ("stream_error_param_info", 3, MM.STREAM_ERROR, [K, D, T, (MP.ERROR_STATUS, 0x000F),
                                                      (MP.ERROR_INFORMATION, b"\x00\x05")]),
    ("stream_BW_request", 3, MM.STREAM_BW_REQUEST, [K, D, T, (MP.BANDWIDTH, 64)]),
    ("stream_BW_allocation", 3, MM.STREAM_BW_ALLOCATION, [K, D, T, (MP.BANDWIDTH, 48)]),
    ("data_provision", 3, MM.DATA_PROVISION, [K, D, T, (MP.DATA_ID, 0x0201), (MP.DATAGRAM, bytes.fromhex("01") * 8),
                                              (MP.DATAGRAM, bytes.fromhex("02") * 4)]),
    ("data_provision_v5_udp", 5, MM.DATA_PROVISION, [K, (MP.DATA_ID, 0x0201), (MP.DATAGRAM, b"\x01\x01")]),
]


def cases(itf: Interface, rows) -> list[dict]:
    out = []
    for name, version, mtype, params in rows:
        m = Message.build(itf, mtype, version, params)
        out.append({"name": name, "version": version, "message_type": f"{int(mtype):04x}",
                    "params": [[f"{c:04x}", v.hex()] for c, v in m.params], "frame": m.encode().hex()})
    return out


def cw_encryption_cases() -> list[dict]:
    v1_value, v1_enc = stkm.seal_cws_v1(CWT_KEY, CWT_ID, [cw for _, cw in CWE_CWS], counter=CWE_COUNTER)
    common = {"cwt_key": CWT_KEY.hex(), "super_cas_id": f"{CWE_CTX.super_cas_id:08x}", "ecm_id": CWE_CTX.ecm_id,
              "cp_number": CWE_CTX.cp_number, "cws": [[cp, cw.hex()] for cp, cw in CWE_CWS]}
    return [{"name": "v2_aes_ctr_hmac", "layout": 2, **common, "cw_encryption": CWE_VALUE.hex(),
             "encrypted_cws": [e.hex() for e in CWE_ENC]},
            {"name": "v1_aes_ctr_legacy", "layout": 1, **common, "cw_encryption": v1_value.hex(),
             "encrypted_cws": [e.hex() for e in v1_enc]}]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {"source": "Tessera CW_encryption layouts (project-defined, docs/bcast-profile.md); "
           "generated by tools/gen_simulcrypt_vectors.py", "cases": cw_encryption_cases()}
    (OUT / "cw_encryption.json").write_text(json.dumps(doc, indent=1) + "\n")
    for fname, itf, rows in (("ecmg.json", Interface.ECMG, ECMG), ("emmg.json", Interface.EMMG, EMMG)):
        doc = {"interface": itf.value, "source": "ETSI TS 103 197 TLV framing; generated by tools/gen_simulcrypt_vectors.py",
               "cases": cases(itf, rows)}
        lines = ",\n".join("  " + json.dumps(c) for c in doc.pop("cases"))
        head = json.dumps(doc, indent=1)[:-2]
        (OUT / fname).write_text(f'{head},\n "cases": [\n{lines}\n ]\n}}\n')


if __name__ == "__main__":
    main()
