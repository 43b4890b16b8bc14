"""Auditorium Security Messages (SMPTE 430-6-2008 = ISO 26430-6:2009) peer.

codec   -- KLV framing and the message set (clauses 6.2, 6.3, 7, 8; Annex A)
tls     -- the constrained TLS 1.0 profile of clause 6.1, driven through MemoryBIO
engine  -- sans-IO responder / initiator state machines
store   -- link-encryption key store and SQLite security log
responder, initiator, collector -- asyncio peers
"""
