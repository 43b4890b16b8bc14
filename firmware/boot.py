# boot.py template: runs before main.py on a board. It brings the WLAN up when the board
# has a wlan.json (credentials on the board's filesystem, never in the firmware image; see
# tessera_fw/net.py); a board without one, or without a radio, boots as before.
import gc
import sys

try:
    open("wlan.json").close()  # no file: nothing loaded (issue 9 #9: every name a module
except OSError:  # interns stays on the heap until the next reset)
    pass
else:
    try:
        from tessera_fw import net

        net.wlan_up()
    except Exception as e:  # never stop the boot: main.py and the REPL must stay reachable
        print("boot: network not up:", e)
    net = None
    # not needed after the boot: forget the modules so that main.py has their heap
    for m in ("tessera_fw.net", "tessera_fw.config", "tessera_fw"):
        sys.modules.pop(m, None)
gc.collect()
