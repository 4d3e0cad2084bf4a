"""Standard Webhooks signatures (https://www.standardwebhooks.com/): HMAC-SHA256 over
"{webhook-id}.{webhook-timestamp}.{body}", keyed by the base64-decoded `whsec_` secret, sent as
`webhook-signature: v1,<base64>`."""

from __future__ import annotations

import base64
import hashlib
import hmac

from mailrelay.store.webhooks import SECRET_PREFIX


def key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header's value."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id, timestamp, body),
    }


def verify(secret: str, message_id: str, timestamp: str, body: bytes, signatures: str) -> bool:
    """Whether any `v1,` signature in the (space-separated) header value matches: what a
    receiver does, here for the tests and as the reference for docs/webhooks.md."""
    expected = sign(secret, message_id, int(timestamp), body)
    return any(hmac.compare_digest(expected, s) for s in signatures.split())
