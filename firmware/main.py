# Boot application template: copied to the board as main.py by `tessera board deploy --main`.
# One interpreter life per self-test suite, then one to serve (issue 9 #9, docs/scpm-firmware.md
# "Boot heap"):
#  - no selftest.txt: tessera_fw.selftest.boot() runs the next suite, notes its figures in
#    selftest.part (after the last suite: the summary line in selftest.txt) and soft-resets
#    (machine.soft_reset(): the VM restarts with a fresh heap and runs boot.py and main.py
#    again; every object and every name the suite interned is gone);
#  - selftest.txt there: print it, remove it (the next boot tests again) and start the
#    SCPM device when the board has an scpm.json, else the secure RMCP-2 RMA when it has an
#    rmcp2.json (docs/rmcp2.md), in a heap that never held the self-test.
# A board that cannot write those files serves in the first life, after one suite.
# Protocol applications replace the serving part with their own start-up (docs/ARCHITECTURE.md).
import gc
import sys

# Collect after every 8 KB allocated instead of only when the heap is full: the long-lived
# objects (loaded code, keys) then stay packed at the bottom of the heap instead of being
# scattered among garbage; the smallest heap the device serves in went down by 6-9 KB
# (docs/scpm-firmware.md "Boot heap"). A collection of a 56 KB heap holding the device takes
# 0.11 ms on the unix port here; a board is slower (not measured on one).
gc.threshold(8192)

try:
    f = open("selftest.txt")
except OSError:  # a self-test life
    import tessera_fw.selftest

    tessera_fw.selftest.boot()  # soft-resets, unless its files could not be written
    sys.modules.pop("tessera_fw.selftest", None)  # then the device needs its heap
    tessera_fw = None
else:  # the serving life
    print(f.read() + " (before the soft reset)")
    f.close()
    import os

    os.remove("selftest.txt")
    os = None
f = None
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
