"""Tessera host package: KSN (SCPM), ASM peer, BCAST SP-4 over SimulCrypt, and the board
tooling that deploys and drives the MicroPython firmware. (The RMCP-2 session manager is
planned, not built.)"""

__version__ = "0.1.0"
