"""Delivery in a process of its own, so that submission and delivery each have a core.

Both processes open the same SQLite database (WAL lets several processes read and write it;
each keeps its own group-committing writer). The parent (`DeliveryProcess`, started by the
service) spawns `python -m mailrelay.delivery.process`, hands it the configuration on stdin and
one end of a socket pair, and then:

- wakes it through the socket when a message was queued, instead of letting it poll;
- receives its metrics every second and serves them on the one /metrics endpoint;
- restarts it if it dies (kill -9 loses nothing: what it had claimed is released and tried
  again by the next one, as after a restart of the whole service);
- stops it with SIGTERM (in-flight attempts finish), then SIGKILL after the grace period.

The child dies with its parent (PR_SET_PDEATHSIG, and end-of-file on the socket), so a killed
service never leaves a second deliverer behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time

from mailrelay.config import Config
from mailrelay.metrics import Metrics

log = logging.getLogger("mailrelay.delivery")

WAKE = b"w"
METRICS_EVERY = 1.0  # seconds between metric snapshots sent to the parent
RESTART_DELAY = 1.0  # seconds before a child that died is started again
_FRAME = struct.Struct("!I")


class DeliveryProcess:
    """The parent's handle on the delivery child; `start`/`stop` like every long-lived part."""

    def __init__(self, config: Config, metrics: Metrics, wake: asyncio.Event) -> None:
        self.config = config
        self.metrics = metrics
        self.wake = wake
        self.grace = 10.0
        self._child: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    async def start(self) -> None:
        self.metrics.take_delivery_metrics_from(None)
        await self._spawn()
        self._tasks += [
            asyncio.create_task(self._forward_wakes(), name="mailrelay-delivery-waker"),
            asyncio.create_task(self._supervise(), name="mailrelay-delivery-supervisor"),
        ]

    async def _spawn(self) -> None:
        parent, child = socket.socketpair()
        try:
            self._child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mailrelay.delivery.process",
                str(child.fileno()),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(child.fileno(),),
            )
        finally:
            child.close()
        assert self._child.stdin is not None
        self._child.stdin.write(pickle.dumps(self.config))
        await self._child.stdin.drain()
        self._child.stdin.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        self._tasks.append(
            asyncio.create_task(self._receive(reader), name="mailrelay-delivery-metrics")
        )
        self.wake.set()  # whatever is due now

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        """Metric snapshots from the child, until it goes away."""
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (size,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
                text = (await reader.readexactly(size)).decode()
                self.metrics.take_delivery_metrics_from(text)

    async def _forward_wakes(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self._writer is not None and not self._writer.is_closing():
                with contextlib.suppress(ConnectionError):
                    self._writer.write(WAKE)
                    await self._writer.drain()

    async def _supervise(self) -> None:
        while True:
            child = self._child
            assert child is not None
            code = await child.wait()
            if self._stopping:
                return
            self.restarts += 1
            log.error("event=delivery_process_died code=%s restarting_in=%.0f", code, RESTART_DELAY)
            if self._writer is not None:
                self._writer.close()
            await asyncio.sleep(RESTART_DELAY)
            await self._spawn()

    async def stop(self) -> None:
        self._stopping = True
        child = self._child
        if child is not None and child.returncode is None:
            child.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.wait(), self.grace + 5.0)
            except TimeoutError:
                log.error("event=delivery_process_killed after=%.0fs", self.grace + 5.0)
                child.kill()
                await child.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()


# -- the child ---------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the parent dies, however it dies. SIGHUP (the
    service's certificate reload, maybe sent to the whole unit) is not for this process."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


async def _child_main(config: Config, sock: socket.socket) -> None:
    # Imported here: the parent needs none of this.
    from mailrelay.delivery.courier import SmtpCourier
    from mailrelay.delivery.mta_sts import StoreStsCache
    from mailrelay.delivery.pool import SessionPool
    from mailrelay.delivery.published import transport_policy
    from mailrelay.delivery.runner import QueueRunner
    from mailrelay.store import Store, claims
    from mailrelay.tlsrpt.reporter import Reporter
    from mailrelay.webhooks.dispatcher import Dispatcher

    if config.storage.url and config.dkim.master_key_file:
        # TLS-RPT reports by mail are DKIM-signed here, with keys sealed in the shared store:
        # this process needs the master key too (the parent's is not inherited by a spawn).
        from mailrelay import dkim

        dkim.use_master_key(dkim.read_master_key(config.dkim.master_key_file))
    metrics = Metrics()
    store = Store(config.storage.database)
    await store.start()
    # This is the instance's only process that claims: whatever its [instance] id still holds
    # was its predecessor's. Other instances' claims are theirs (claims.recover_expired).
    released = await store.write(
        lambda c: claims.release_interrupted(c, time.time(), config.instance.id)
    )
    if released:
        log.info("event=recovered recipients=%d", released)
    wake = asyncio.Event()
    pool = SessionPool(config, metrics)
    courier = SmtpCourier(transport_policy(config, StoreStsCache(store), metrics), pool, metrics)
    runner = QueueRunner(config, store, courier, metrics, wake)
    reporter = Reporter(config, store, metrics, wake)  # TLS-RPT, beside the runner
    dispatcher = Dispatcher(config, store, metrics) if config.webhooks.enabled else None
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def listen() -> None:
        while byte := await reader.read(4096):
            if WAKE in byte:
                wake.set()
        stop.set()  # the parent is gone

    async def report() -> None:
        while True:
            send_metrics(writer, metrics)
            await writer.drain()
            await asyncio.sleep(METRICS_EVERY)

    await pool.start()
    await runner.start()
    await reporter.start()
    if dispatcher is not None:
        await dispatcher.start()
    tasks = [asyncio.create_task(listen()), asyncio.create_task(report())]
    log.info("event=delivery_process_started pid=%d", os.getpid())
    try:
        await stop.wait()
    finally:
        if dispatcher is not None:
            await dispatcher.stop()
        await reporter.stop()
        await runner.stop()
        await pool.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(ConnectionError, RuntimeError):
            send_metrics(writer, metrics)
            await writer.drain()
        writer.close()
        await store.stop()
        log.info("event=delivery_process_stopped")


def send_metrics(writer: asyncio.StreamWriter, metrics: Metrics) -> None:
    text = metrics.delivery_text().encode()
    writer.write(_FRAME.pack(len(text)) + text)


def main() -> None:
    from mailrelay import logs

    _die_with_parent()
    fd = int(sys.argv[1])
    config: Config = pickle.loads(sys.stdin.buffer.read())  # noqa: S301 (our own parent)
    logs.setup(config.log)
    sock = socket.socket(fileno=fd)
    import uvloop

    uvloop.run(_child_main(config, sock))


if __name__ == "__main__":
    main()
