"""Webhooks: signed HTTPS notifications of each recipient's outcome, for the sending domain
(`store.webhooks` keeps endpoints and the outbox, `dispatcher` posts it, `signature` signs)."""
