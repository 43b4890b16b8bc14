# Boot application template: copied to the board as main.py by `tessera board deploy --main`.
# Two interpreter lives per power-on (issue 9 #9, docs/scpm-firmware.md "Boot heap"):
#  1. no selftest.txt: tessera_fw.selftest.boot() runs the firmware self-test, writes its
#     summary line to selftest.txt and soft-resets (machine.soft_reset(): the VM restarts
#     with a fresh heap and runs boot.py and main.py again; every object and every name the
#     self-test interned is gone);
#  2. selftest.txt there: print it, remove it (the next boot tests again) and start the
#     SCPM device when the board has an scpm.json, in a heap that never held the self-test.
# A board that cannot write selftest.txt serves in the first life, after the self-test.
# Protocol applications replace the serving part with their own start-up (docs/ARCHITECTURE.md).
import gc
import sys

try:
    f = open("selftest.txt")
except OSError:  # first life
    import tessera_fw.selftest

    tessera_fw.selftest.boot()  # soft-resets, unless selftest.txt could not be written
    sys.modules.pop("tessera_fw.selftest", None)  # then the device needs its heap
    tessera_fw = None
else:  # second life
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
    pass
else:
    from tessera_fw.scpm import udp

    udp.main()
