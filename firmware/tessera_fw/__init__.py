# Tessera firmware for MicroPython boards: the SCPM device stack (the secure RMCP-2 receiver is planned, not built).
VERSION = "0.1.0"
