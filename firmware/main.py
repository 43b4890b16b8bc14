# Boot application template: copied to the board as main.py by `tessera board deploy --main`.
# It runs the firmware self-test and prints the result; protocol applications replace the
# body with their own start-up (see docs/ARCHITECTURE.md).
import tessera_fw.selftest

tessera_fw.selftest.run()
