# Boot application template: copied to the board as main.py by `tessera board deploy --main`.
# It runs the firmware self-test and prints the result, then starts the SCPM device when
# the board has an scpm.json (docs/scpm-firmware.md), else the RMCP-2 RMA when it has an
# rmcp2.json (docs/rmcp2.md); protocol applications replace the
# body with their own start-up (see docs/ARCHITECTURE.md).
import gc
import sys

import tessera_fw.selftest

tessera_fw.selftest.run()  # each suite unloaded after its checks
del sys.modules["tessera_fw.selftest"]  # and the runner itself: the device needs the heap
tessera_fw = None
gc.collect()

try:
    open("scpm.json").close()
except OSError:
    # no SCPM device here: the secure RMCP-2 RMA when rmcp2.json is there (docs/rmcp2.md)
    from tessera_fw.rmcp2 import board

    board.main()
else:
    from tessera_fw.scpm import udp

    udp.main()
