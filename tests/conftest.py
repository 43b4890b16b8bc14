pytest_plugins = ["tests.mpy_plugin"]
