"""The HTTP API (issue 15): send and follow mail with API keys, beside SMTP submission."""
