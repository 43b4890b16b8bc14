"""Board tooling: profiles, mpy-cross builds, virtual boards and mpremote-driven deploys."""
