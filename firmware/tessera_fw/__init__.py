# Tessera firmware: SCPM device stack and secure RMCP-2 receiver for MicroPython boards.
VERSION = "0.1.0"
