"""TLS reporting (RFC 8460): what delivery saw of each recipient domain's TLS, aggregated per day
and sent to the addresses the domain publishes in `_smtp._tls`."""
