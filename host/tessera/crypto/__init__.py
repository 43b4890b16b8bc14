"""Host crypto core on `cryptography`: the same primitives the firmware builds on cryptolib.

- aes: AES ECB / CBC / CTR
- mac: HMAC (SHA-1, SHA-256; MD5 only for contexts whose standard mandates it) and
  constant-time comparison
- dh: RFC 3526 group 14 Diffie-Hellman with short exponents and public-value validation
"""
