"""Durable state in one SQLite file: the queue, the delivery record, users and domains."""

from mailrelay.store.db import connect, open_readonly
from mailrelay.store.writer import Store

__all__ = ["Store", "connect", "open_readonly"]
