# Secure RMCP-2 on the board (docs/rmcp2-profile.md): the message codec. The RMA engine,
# message protection and transports are not built yet.
