"""What the API's handlers share: the service's parts they use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mailrelay.config import Config
from mailrelay.metrics import Metrics
from mailrelay.store import Store
from mailrelay.submission.accept import Acceptor


@dataclass(frozen=True)
class ApiContext:
    config: Config
    store: Store
    acceptor: Acceptor
    on_queued: Callable[[], None]
    """Wakes delivery: a message was committed."""
    on_accepted: Callable[[], None] = lambda: None
    metrics: Metrics | None = None
    """The service's: the API counts its answers and refusals there (None in unit tests)."""
