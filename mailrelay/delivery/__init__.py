"""Delivery: MX resolution, TLS policy, the SMTP client session, retry timing and bounces."""
