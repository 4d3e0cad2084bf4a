"""The submission side: the SMTP server mail clients talk to (RFC 6409, RFC 8314)."""
