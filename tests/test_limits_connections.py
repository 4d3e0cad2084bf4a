"""[limits] against the real server: connection caps, the deadline for AUTH, the DATA timeout
per read, and the AUTH back-off across sessions. Real SMTP over real TLS from Python's clients;
every client comes from 127.0.0.x (the whole of 127.0.0.0/8 is this machine), so "another
client address" is a client socket bound to 127.0.0.2 and so on."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import select
import smtplib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailrelay.submission.auth import AuthBackoff, backoff_delay
from tests.conftest import PASSWORD, Relay, RelayFactory, add_user, make_config

run = asyncio.to_thread

BANNER = b"220 relay.test mailrelay\r\n"
TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections to this server, try again later\r\n"
TOO_MANY_FROM_CLIENT = b"421 4.7.0 Too many connections from your address, try again later\r\n"
TOO_MANY_UNAUTHENTICATED = (
    b"421 4.7.0 Too many unauthenticated connections from your address, try again later\r\n"
)
PRE_AUTH_TIMEOUT = (421, b"4.4.2 Not authenticated in time, closing connection")
TIMEOUT = (421, b"4.4.2 Timeout exceeded, closing connection")
DATA_TOO_SLOW = (421, b"4.4.2 Message data too slow, closing connection")
AUTH_FAILED = (535, b"5.7.8 Authentication credentials invalid")
AUTH_OK = (235, b"2.7.0 Authentication successful")
OK = (250, b"2.0.0 OK")
HEADER = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: slow\r\n\r\n"
# asyncio may run a timer up to its clock resolution early; a lower bound allows for that.
EARLY = 0.05


def first_line(
    relay: Relay, source: str = "127.0.0.1", *, implicit_tls: bool = False
) -> tuple[bytes, bool]:
    """Connect from `source` and read the first line the server sends; then whether the server
    closes the connection without waiting for anything from us."""
    sock = socket.create_connection(
        ("127.0.0.1", relay.implicit_port if implicit_tls else relay.port),
        timeout=5,
        source_address=(source, 0),
    )
    if implicit_tls:
        sock = relay.client_context().wrap_socket(sock)
    with sock:
        received = b""
        while not received.endswith(b"\r\n"):
            chunk = sock.recv(512)
            assert chunk, received
            received += chunk
        sock.settimeout(2)
        try:
            closed = sock.recv(512) == b""
        except TimeoutError:
            closed = False
    return received, closed


def idle(relay: Relay, source: str = "127.0.0.1") -> smtplib.SMTP:
    """A session that has said EHLO and nothing since (smtplib raises on anything but 220)."""
    client = smtplib.SMTP(
        "127.0.0.1",
        relay.port,
        local_hostname="client.test",
        timeout=10,
        source_address=(source, 0),
    )
    client.ehlo()
    return client


def authenticate(relay: Relay, client: smtplib.SMTP, user: str = "alice@example.org") -> None:
    client.starttls(context=relay.client_context())
    client.ehlo()
    client.user, client.password = user, PASSWORD
    assert client.auth("PLAIN", client.auth_plain) == AUTH_OK


def quit_(client: smtplib.SMTP) -> None:
    client.quit()
    client.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for the server to have noticed something the client did (a close, say)."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"never: {what}")


def refusals(relay: Relay, limit: str) -> float:
    value = relay.service.metrics.smtpd_limit_refusals.labels(limit=limit)._value.get()
    return float(value)


def refused_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "event=connection_refused" in r.getMessage()]


# ---- connection caps ----------------------------------------------------------------------------


async def test_connections_per_client_address_are_capped(
    tmp_path: Path, relay_factory: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await relay_factory(
        limits={"max_connections_per_ip": 3, "max_unauthenticated_per_ip": 3}
    )
    sessions = [await run(idle, relay) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="mailrelay.submission"):
        assert await run(first_line, relay) == (TOO_MANY_FROM_CLIENT, True)
        # The implicit-TLS port counts the same address (refused after the handshake).
        assert await run(first_line, relay, implicit_tls=True) == (TOO_MANY_FROM_CLIENT, True)
        # Another address is not affected.
        other = await run(idle, relay, "127.0.0.2")
        # Once one of them has gone, the address may connect again.
        await run(quit_, sessions.pop())
        counts = relay.service.submission.counts
        await until(lambda: counts.open_from("127.0.0.1") == (2, 2), "one session fewer")
        sessions.append(await run(idle, relay))
    assert refusals(relay, "connections_per_ip") == 2
    assert (
        refused_lines(caplog)
        == ["event=connection_refused limit=connections_per_ip client=127.0.0.1"] * 2
    )
    for client in [*sessions, other]:
        await run(quit_, client)


async def test_connections_in_all_are_capped(
    tmp_path: Path, relay_factory: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await relay_factory(limits={"max_connections": 3})
    sessions = [await run(idle, relay, f"127.0.0.{n}") for n in (1, 2, 3)]
    with caplog.at_level(logging.INFO, logger="mailrelay.submission"):
        assert await run(first_line, relay, "127.0.0.4") == (TOO_MANY_CONNECTIONS, True)
    await run(quit_, sessions.pop())
    await until(lambda: relay.service.submission.counts.total == 2, "one session fewer")
    sessions.append(await run(idle, relay, "127.0.0.4"))
    assert refusals(relay, "connections") == 1
    assert refused_lines(caplog) == ["event=connection_refused limit=connections client=127.0.0.4"]
    for client in sessions:
        await run(quit_, client)


async def test_authenticated_sessions_do_not_use_the_unauthenticated_allowance(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    cfg = make_config(
        tmp_path, limits={"max_connections_per_ip": 4, "max_unauthenticated_per_ip": 2}
    )
    add_user(cfg, "alice@example.org")
    relay = await relay_factory(cfg)
    a, b = await run(idle, relay), await run(idle, relay)
    assert await run(first_line, relay) == (TOO_MANY_UNAUTHENTICATED, True)
    # A session that authenticates stops counting as unauthenticated ...
    await run(authenticate, relay, a)
    c = await run(idle, relay)
    await run(authenticate, relay, c)
    d = await run(idle, relay)
    # ... and still counts as a connection from its address.
    assert relay.service.submission.counts.open_from("127.0.0.1") == (4, 2)
    assert await run(first_line, relay) == (TOO_MANY_FROM_CLIENT, True)
    assert refusals(relay, "unauthenticated_per_ip") == 1
    assert refusals(relay, "connections_per_ip") == 1
    for client in (a, b, c, d):
        assert await run(client.noop) == OK  # none of them was disturbed
        await run(quit_, client)


# ---- the deadline for AUTH ----------------------------------------------------------------------


async def test_a_session_must_authenticate_within_pre_auth_timeout(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    cfg = make_config(tmp_path, limits={"pre_auth_timeout": 1}, submission={"timeout": 5})
    add_user(cfg, "alice@example.org")
    relay = await relay_factory(cfg)

    def unauthenticated() -> tuple[float, tuple[int, bytes], bool]:
        # NOOPs keep the idle timeout away; the deadline for AUTH is counted from the connect.
        start = time.monotonic()
        client = idle(relay)
        client.starttls(context=relay.client_context())
        client.ehlo()
        while time.monotonic() - start < 4:
            reply = client.noop()
            if reply != OK:
                break
            time.sleep(0.2)
        try:
            client.noop()
            closed = False
        except smtplib.SMTPServerDisconnected:
            closed = True
        client.close()
        return time.monotonic() - start, reply, closed

    def authenticated() -> tuple[float, tuple[int, bytes]]:
        start = time.monotonic()
        client = idle(relay)
        authenticate(relay, client)
        time.sleep(max(0.0, start + 2 - time.monotonic()))  # well past pre_auth_timeout
        reply = client.noop()
        quit_(client)
        return time.monotonic() - start, reply

    (late, reply, closed), (kept, noop) = await asyncio.gather(
        run(unauthenticated), run(authenticated)
    )
    assert reply == PRE_AUTH_TIMEOUT and closed
    assert late >= 1 - EARLY
    assert noop == OK and kept >= 2
    assert refusals(relay, "pre_auth_timeout") == 1
    # The session that went counts no more.
    await until(lambda: relay.service.submission.counts.total == 0, "both sessions gone")


# ---- the DATA timeout, per read -----------------------------------------------------------------


def trickle(client: smtplib.SMTP, lines: int, every: float, then_silent: float = 0.0) -> bool:
    """Send the header, then a line every `every` seconds, then nothing for `then_silent`;
    stop early (False) as soon as the server says something or closes."""
    assert client.docmd("DATA")[0] == 354
    client.send(HEADER)
    sock = client.sock
    assert sock is not None
    for n in range(lines):
        if select.select([sock], [], [], every)[0]:
            return False
        client.send(b"line %d of a slow but live client\r\n" % n)
    return not select.select([sock], [], [], then_silent)[0] if then_silent else True


def reply_then_closed(client: smtplib.SMTP) -> tuple[tuple[int, bytes], bool]:
    reply = client.getreply()
    try:
        client.noop()
        closed = False
    except smtplib.SMTPServerDisconnected:
        closed = True
    client.close()
    return reply, closed


async def test_data_timeout_is_per_read(tmp_path: Path, relay_factory: RelayFactory) -> None:
    cfg = make_config(tmp_path, submission={"timeout": 1})
    add_user(cfg, "alice@example.org")
    relay = await relay_factory(cfg)

    def slow_but_live() -> tuple[bool, float, tuple[int, bytes]]:
        client = relay.session()
        client.mail("alice@example.org")
        client.rcpt("bob@example.net")
        start = time.monotonic()
        uninterrupted = trickle(client, lines=8, every=0.4)
        client.send(b".\r\n")
        reply = client.getreply()
        quit_(client)
        return uninterrupted, time.monotonic() - start, reply

    def silent() -> tuple[bool, tuple[tuple[int, bytes], bool]]:
        client = relay.session()
        client.mail("alice@example.org")
        client.rcpt("bob@example.net")
        interrupted = not trickle(client, lines=2, every=0.4, then_silent=3)
        return interrupted, reply_then_closed(client)

    uninterrupted, took, reply = await run(slow_but_live)
    assert uninterrupted and took > 3
    assert reply[0] == 250 and reply[1].startswith(b"2.0.0 Ok: queued as ")
    interrupted, (cut, closed) = await run(silent)
    assert interrupted  # the server spoke first, within the 3 s of silence
    assert cut == TIMEOUT and closed


async def test_data_as_a_whole_is_capped_by_size_and_floor_rate(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    # The cap is timeout + max_message_size / 8 KiB/s: here 1 + 1024 / 8192 = 1.125 s, while
    # each read (a line every 0.3 s) is well within the 1 s timeout.
    cfg = make_config(tmp_path, submission={"timeout": 1, "max_message_size": 1024})
    add_user(cfg, "alice@example.org")
    relay = await relay_factory(cfg)

    def too_slow() -> tuple[bool, float, tuple[tuple[int, bytes], bool]]:
        client = relay.session()
        client.mail("alice@example.org")
        client.rcpt("bob@example.net")
        start = time.monotonic()
        interrupted = not trickle(client, lines=10, every=0.3)
        return interrupted, time.monotonic() - start, reply_then_closed(client)

    interrupted, took, (cut, closed) = await run(too_slow)
    assert interrupted and took >= 1.125 - EARLY
    assert cut == DATA_TOO_SLOW and closed


# ---- AUTH back-off across sessions --------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 0.0), (1, 0.0), (2, 0.5), (3, 1.0), (4, 2.0), (9, 16.0), (99, 16.0)]
)
def test_backoff_schedule(failures: int, delay: float) -> None:
    assert backoff_delay(failures, cap=16.0) == delay


async def test_backoff_is_per_address_and_login_and_forgives_only_ones_own_typos() -> None:
    now = [1000.0]
    backoff = AuthBackoff(16.0, base_delay=0.001, clock=lambda: now[0])

    async def wrong() -> bool:
        return False

    async def right() -> bool:
        return True

    def held(failures: int) -> float:
        return backoff_delay(failures, 16.0, base=0.001)

    for _ in range(4):
        await backoff.attempt("192.0.2.1", "alice@example.org", wrong)
    assert backoff.delay("192.0.2.1", "alice@example.org") == held(4)
    assert backoff.delay("192.0.2.1", "bob@example.org") == held(4)  # the address's
    assert backoff.delay("192.0.2.2", "Alice@example.org") == held(4)  # the login's
    assert backoff.delay("192.0.2.2", "bob@example.org") == 0.0
    # Another login's success from the same address forgives nothing ...
    assert await backoff.attempt("192.0.2.1", "mallory@example.org", right)
    assert backoff.delay("192.0.2.1", "alice@example.org") == held(4)
    # ... the login's own success there forgives those failures (they were its typos).
    assert await backoff.attempt("192.0.2.1", "alice@example.org", right)
    assert backoff.delay("192.0.2.1", "bob@example.org") == 0.0
    assert backoff.delay("192.0.2.2", "alice@example.org") == 0.0
    # And every failure is forgotten after the window.
    for _ in range(3):
        await backoff.attempt("192.0.2.3", "carol@example.org", wrong)
    now[0] += backoff.window + 1
    assert backoff.delay("192.0.2.3", "carol@example.org") == 0.0


def wrong_auth(
    relay: Relay, login: str, source: str = "127.0.0.1"
) -> tuple[float, tuple[int, bytes]]:
    """One AUTH PLAIN with a wrong password in a session of its own: (seconds the reply took,
    the reply)."""
    client = idle(relay, source)
    client.starttls(context=relay.client_context())
    client.ehlo()
    plain = base64.b64encode(f"\0{login}\0not the password".encode()).decode()
    start = time.monotonic()
    reply = client.docmd("AUTH", "PLAIN " + plain)
    took = time.monotonic() - start
    client.close()
    return took, reply


def good_auth(relay: Relay, login: str, source: str = "127.0.0.1") -> float:
    client = idle(relay, source)
    start = time.monotonic()
    authenticate(relay, client, login)
    took = time.monotonic() - start
    quit_(client)
    return took


BACKOFF_LIMITS: dict[str, Any] = {
    "auth_backoff_max": 1,
    "max_connections_per_ip": 20,
    "max_unauthenticated_per_ip": 20,
}


async def test_concurrent_guesses_from_one_address_wait_their_turn(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    cfg = make_config(tmp_path, limits=BACKOFF_LIMITS)
    add_user(cfg, "alice@example.org")
    relay = await relay_factory(cfg)
    sessions = 6
    ready = threading.Barrier(sessions)

    def guess() -> tuple[float, tuple[int, bytes]]:
        client = idle(relay)
        client.starttls(context=relay.client_context())
        client.ehlo()
        plain = base64.b64encode(b"\0alice@example.org\0guess").decode()
        ready.wait()
        start = time.monotonic()
        reply = client.docmd("AUTH", "PLAIN " + plain)
        took = time.monotonic() - start
        client.close()
        return took, reply

    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
        results = await asyncio.gather(
            *(loop.run_in_executor(pool, guess) for _ in range(sessions))
        )
    assert [reply for _, reply in results] == [AUTH_FAILED] * sessions
    # Answered one after another, each after the back-off its predecessors' failures earned:
    # the k-th answer cannot come before the sum of the first k delays (0, 0, 0.5, 1, 1, 1).
    took = sorted(t for t, _ in results)
    earned = 0.0
    for k in range(sessions):
        earned += backoff_delay(k, cap=1.0)
        assert took[k] >= earned - EARLY, (k, took)
    assert refusals(relay, "auth_backoff") == 4


async def test_backoff_survives_a_success_and_follows_the_login(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    cfg = make_config(tmp_path, limits=BACKOFF_LIMITS)
    for user in ("alice@example.org", "mallory@example.org"):
        add_user(cfg, user)
    relay = await relay_factory(cfg)
    # Alice's own address, where she has logged in before the attack.
    await run(good_auth, relay, "alice@example.org", "127.0.0.3")
    for _ in range(3):
        assert (await run(wrong_auth, relay, "alice@example.org"))[1] == AUTH_FAILED
    # The attacker logs in as themselves from the same address: that resets nothing ...
    await run(good_auth, relay, "mallory@example.org")
    took, reply = await run(wrong_auth, relay, "alice@example.org")
    assert reply == AUTH_FAILED and took >= backoff_delay(3, cap=1.0) - EARLY
    # ... and guesses at the same login from another address are held back too.
    took, reply = await run(wrong_auth, relay, "alice@example.org", "127.0.0.2")
    assert reply == AUTH_FAILED and took >= backoff_delay(4, cap=1.0) - EARLY
    # Alice, from the address she logged in from, is not held back by what others did to her
    # login; anyone else trying her login is.
    backoff = relay.service.submission.backoff
    assert backoff.delay("127.0.0.3", "alice@example.org") == 0.0
    assert backoff.delay("127.0.0.4", "alice@example.org") == 1.0
    await run(good_auth, relay, "alice@example.org", "127.0.0.3")
