"""Tessera host package: KSN (SCPM), RMCP-2 session manager, ASM peer, BCAST SP-4 over
SimulCrypt, and the board tooling that deploys and drives the MicroPython firmware."""

__version__ = "0.1.0"
