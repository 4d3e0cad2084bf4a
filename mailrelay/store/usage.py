"""What each user has had queued in the current minute, hour and day: the counts that per-user
rates and quotas ([limits]) are checked against.

Windows are whole minutes, hours and UTC days. The counts are written by `count`, in the
transaction that queues the message: a message that is refused, or whose commit fails, counts
for nothing, and a restart forgets nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from mailrelay.store.backend import Connection, greatest

Period = Literal["minute", "hour", "day"]
SECONDS: dict[Period, int] = {"minute": 60, "hour": 3600, "day": 86400}


@dataclass(frozen=True)
class Window:
    period: Period
    started_at: float
    messages: int
    recipients: int

    @property
    def ends_at(self) -> float:
        return self.started_at + SECONDS[self.period]

    def at(self, now: float) -> Window:
        """This window as seen at `now`: empty once its period is over."""
        start = window_start(self.period, now)
        if start > self.started_at:
            return Window(self.period, start, 0, 0)
        return self

    def seconds_left(self, now: float) -> int:
        return max(1, math.ceil(self.ends_at - now))


Usage = dict[Period, Window]


def window_start(period: Period, now: float) -> float:
    length = SECONDS[period]
    return float(math.floor(now / length) * length)


def current(conn: Connection, user: str, now: float) -> Usage:
    """The user's counts in the windows that contain `now`."""
    found = {
        row["period"]: Window(row["period"], row["started_at"], row["messages"], row["recipients"])
        for row in conn.execute(
            "SELECT period, started_at, messages, recipients FROM user_usage"
            " WHERE user_address = ?",
            (user.lower(),),
        )
    }
    return {
        period: found.get(period, Window(period, window_start(period, now), 0, 0)).at(now)
        for period in SECONDS
    }


def count(conn: Connection, user: str, now: float, recipients: int) -> Usage:
    """Add one message with `recipients` recipients to the user's windows; return the new counts.
    A window that has ended starts again from this message. (A clock that steps back keeps
    counting in the later window, so that it cannot reset a count.)"""
    user = user.lower()
    for period in SECONDS:
        conn.execute(
            "INSERT INTO user_usage (user_address, period, started_at, messages, recipients)"  # noqa: S608
            " VALUES (?, ?, ?, 1, ?)"
            " ON CONFLICT (user_address, period) DO UPDATE SET"
            # Qualified: PostgreSQL finds a bare name ambiguous beside `excluded`.
            "  messages = CASE WHEN user_usage.started_at >= excluded.started_at"
            "   THEN user_usage.messages + 1 ELSE 1 END,"
            "  recipients = CASE WHEN user_usage.started_at >= excluded.started_at"
            "   THEN user_usage.recipients + excluded.recipients ELSE excluded.recipients END,"
            f"  started_at = {greatest(conn)}(user_usage.started_at, excluded.started_at)",
            (user, period, window_start(period, now), recipients),
        )
    return current(conn, user, now)
