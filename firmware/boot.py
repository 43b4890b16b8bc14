# boot.py template: runs before main.py on a real board. Keep it minimal: bring up the
# network here if the application needs it (credentials come from a config file on the
# board, never from the firmware image).
import gc

gc.collect()
