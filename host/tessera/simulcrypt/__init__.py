"""OMA BCAST SP-4 over DVB SimulCrypt (ETSI TS 103 197): ECMG<->SCS carrying STKMs and
EMMG<->MUX carrying LTKMs, as adapted by the OMA BCAST change request in
/work/shared/seeds/004 (SP-4, section 14.1.1).

- tables: message and parameter codes, cardinality rules, error_status codes
- codec: TLV framing and per-message validation (sans-IO)
- engine: channel and stream state machines for SCS, ECMG, EMMG and MUX (sans-IO)
- stkm / ltkm: the binary STKM and LTKM layouts this project defines (docs/bcast-profile.md)
- keystore: SQLite store of service/program keys and transport keys
- ecmg, scs, emmg, mux: asyncio adapters
"""
