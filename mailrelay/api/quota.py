"""Per-key rates and quotas on the API's send endpoints: the `[limits]` that SMTP applies per user
(messages a minute, recipients an hour and a day), counted in the same usage store under the
principal `apikey:<id>`, and advertised on every answer as draft-ietf-httpapi-ratelimit-headers-11
describes (`RateLimit-Policy`, `RateLimit`).

A send is checked twice: against the counts read before the message is built (so that a key
over its limit costs no signing), and again in the transaction that queues it and counts it,
where requests running side by side cannot both pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailrelay.api.errors import ApiError
from mailrelay.config import LimitsConfig
from mailrelay.store import usage
from mailrelay.store.backend import Connection


def principal(key_id: str) -> str:
    """The name an API key's sending is counted under in the usage store."""
    return f"apikey:{key_id}"


@dataclass(frozen=True)
class Policy:
    """One limit as RateLimit-Policy names it: `name` is also the `[limits]` setting's period."""

    name: str
    period: usage.Period
    quota: int
    counts: str  # "messages" or "recipients"
    setting: str
    per: str  # "messages a minute"


def policies(limits: LimitsConfig) -> tuple[Policy, ...]:
    """The limits that are on (0 turns one off)."""
    every = (
        Policy("messages-minute", "minute", limits.messages_per_minute, "messages",
               "messages_per_minute", "messages a minute"),
        Policy("recipients-hour", "hour", limits.recipients_per_hour, "recipients",
               "recipients_per_hour", "recipients an hour"),
        Policy("recipients-day", "day", limits.recipients_per_day, "recipients",
               "recipients_per_day", "recipients a day"),
    )  # fmt: skip
    return tuple(p for p in every if p.quota > 0)


def _used(policy: Policy, used: usage.Usage, now: float) -> tuple[int, int]:
    """(what the window has used, the seconds until it resets)."""
    window = used[policy.period].at(now)
    count = window.messages if policy.counts == "messages" else window.recipients
    return count, window.seconds_left(now)


@dataclass(frozen=True)
class Over:
    """The first limit a send would pass, and when its window resets."""

    policy: Policy
    retry_after: int

    def error(self, headers: dict[str, str]) -> ApiError:
        p = self.policy
        return ApiError(
            429,
            "rate_limited",
            f"this key may send {p.quota} {p.per} ([limits] {p.setting});"
            f" try again in {self.retry_after} seconds",
            None,
            {**headers, "Retry-After": str(self.retry_after)},
        )

    @property
    def smtp_reply(self) -> str:
        """As the REFUSED event records it: the SMTP path's codes for the same limits."""
        if self.policy.counts == "messages":
            return f"451 4.7.1 rate limited: {self.policy.setting} ({self.policy.quota})"
        return f"452 4.5.3 rate limited: {self.policy.setting} ({self.policy.quota})"


def over(
    limits: LimitsConfig, used: usage.Usage, messages: int, recipients: int, now: float
) -> Over | None:
    """The limit that `messages` more messages with `recipients` more recipients would pass."""
    for policy in policies(limits):
        count, left = _used(policy, used, now)
        adding = messages if policy.counts == "messages" else recipients
        if count + adding > policy.quota:
            return Over(policy, left)
    return None


def headers(limits: LimitsConfig, used: usage.Usage | None, now: float) -> dict[str, str]:
    """RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers-11): each policy
    with its quota `q` and window `w` in seconds; each with what `r` remains and `t` seconds
    until the window resets. Empty when no limit is on."""
    found = policies(limits)
    if not found or used is None:
        return {}
    policy = ", ".join(f'"{p.name}";q={p.quota};w={usage.SECONDS[p.period]}' for p in found)
    state = []
    for p in found:
        count, left = _used(p, used, now)
        state.append(f'"{p.name}";r={max(0, p.quota - count)};t={left}')
    return {"RateLimit-Policy": policy, "RateLimit": ", ".join(state)}


def current(conn: Connection, key_id: str, now: float) -> usage.Usage:
    return usage.current(conn, principal(key_id), now)


def count(conn: Connection, key_id: str, now: float, recipients: int) -> usage.Usage:
    """One message with `recipients` recipients, counted in the queueing transaction."""
    return usage.count(conn, principal(key_id), now, recipients)
