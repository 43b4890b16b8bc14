"""D-cinema PKI: SMPTE 430-2 style certificate chains (create and validate)."""
