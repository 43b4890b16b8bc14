# boot.py template: runs before main.py on a board. It brings the WLAN up when the board
# has a wlan.json (credentials on the board's filesystem, never in the firmware image; see
# tessera_fw/net.py); a board without one, or without a radio, boots as before.
import gc
import sys

try:
    from tessera_fw import net

    net.wlan_up()
except Exception as e:  # never stop the boot: main.py and the REPL must stay reachable
    print("boot: network not up:", e)
net = None
# the module is not needed after the boot: forget it so that main.py has its heap
sys.modules.pop("tessera_fw.net", None)
sys.modules.pop("tessera_fw.config", None)
sys.modules.pop("tessera_fw", None)
gc.collect()
