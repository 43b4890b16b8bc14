"""SCPM (ISO/IEC 24767-2) host side: codec, key setting node (KSN) engine, store, server, CLI.

The wire format is docs/scpm-profile.md; this package implements it independently of the
firmware codec (they meet only at tests/vectors/scpm)."""
