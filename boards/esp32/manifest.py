# Freeze Tessera into a custom MicroPython build for this board:
#   make -C ports/<port> BOARD=<BOARD> FROZEN_MANIFEST=/path/to/tessera/boards/<board>/manifest.py
# The board's own manifest (asyncio, etc.) is included first.
include("$(PORT_DIR)/boards/manifest.py")
metadata(description="Tessera firmware: SCPM device stack (secure RMCP-2 receiver planned)", version="0.1.0")
package("tessera_fw", base_path="../../firmware")
