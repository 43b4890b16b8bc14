"""Secure RMCP-2 (ITU-T X.603.1 Amd.1): docs/rmcp2-profile.md. So far the codec and the
message protection only; no session manager or agents yet."""
