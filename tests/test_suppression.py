"""The suppression list (issue 15): a hard bounce of a real message stops its sending domain from
mailing that recipient again, refused at RCPT with 550 5.7.1 naming why and since when; insecure,
transient and "mailbox full" bounces, and our own bounces, suppress nothing; entries expire; the
operator lists, adds and removes them with `mailrelay suppression`."""

from __future__ import annotations

import asyncio
import dataclasses
import smtplib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mailrelay import config as configmod
from mailrelay.config import ConfigError, SuppressionConfig
from mailrelay.store import accounts, connect, events, suppressions
from mailrelay.store.claims import ClaimedRecipient, Job, RecipientUpdate
from mailrelay.store.queue import transaction
from tests.conftest import Relay, RelayFactory, add_user, make_config, write_config_file
from tests.test_cli import cli, ok, ok_json, user_error
from tests.test_delivery import settled
from tests.test_submission import MESSAGE, queued_id
from tests.world import MODERN, NO_STARTTLS, World

FIRST_ADDRESS = "127.0.99.1"  # this file's MX servers: 127.0.99.x
DAY = 86400.0
USER_UNKNOWN = "550 5.1.1 No such user"
FINAL = ("sent", "bounced")


def refusal(address: str, domain: str, since: str, reason: str) -> tuple[int, bytes]:
    """The RCPT reply for a suppressed recipient, as smtplib returns it."""
    text = (
        f"5.7.1 <{address}>: suppressed for {domain} since {since} ({reason});"
        f" mailrelay suppression remove {domain} {address}"
    )
    return 550, text.encode()


def day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


@dataclasses.dataclass
class Env:
    tmp_path: Path
    world: World
    relay_factory: RelayFactory

    async def relay(self, **suppression: Any) -> Relay:
        cfg = make_config(
            self.tmp_path,
            delivery={
                "hold": False,
                "port": self.world.smtp_port,
                "nameservers": self.world.nameservers,
                "dns_timeout": 1,
                "connect_timeout": 2,
                "command_timeout": 5,
            },
            suppression=suppression,
        )
        add_user(cfg, "alice@example.org")
        add_user(cfg, "dave@other.example")
        return await self.relay_factory(cfg)


@pytest.fixture
async def env(tmp_path: Path, relay_factory: RelayFactory) -> AsyncIterator[Env]:
    async with World(tmp_path / "world", first_address=FIRST_ADDRESS) as world:
        # The senders' own domains receive the bounces.
        await world.add_mx("example.org", MODERN)
        await world.add_mx("other.example", MODERN)
        yield Env(tmp_path, world, relay_factory)


def submit(relay: Relay, rcpts: list[str], sender: str = "alice@example.org") -> str:
    """One message to `rcpts`, each of which must be accepted; its queue id."""
    client = relay.session(sender)
    try:
        assert client.mail(sender)[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt) == (250, b"2.1.5 Recipient ok"), rcpt
        return data(client)
    finally:
        client.quit()


def data(client: smtplib.SMTP) -> str:
    assert client.docmd("DATA")[0] == 354
    client.send(MESSAGE + b".\r\n")
    return queued_id(client.getreply())


def entries(relay: Relay, now: float | None = None) -> list[suppressions.Suppression]:
    return suppressions.list_suppressions(relay.db(), time.time() if now is None else now)


async def final(relay: Relay, queue_id: str) -> dict[str, dict[str, Any]]:
    """Wait until the message's every recipient is sent or bounced; each by address."""
    msg = await settled(relay, queue_id, lambda r: r["state"] in FINAL)
    return {r["address"]: r for r in msg["recipients"]}


# ---- end to end ------------------------------------------------------------------------------


async def test_a_hard_bounce_suppresses_the_recipient_for_the_sending_domain(env: Env) -> None:
    gmail_like = (
        "550-5.1.1 The email account that you tried to reach does not exist.\n"
        "550 5.1.1 Please try double-checking the recipient's email address"
    )
    await env.world.add_mx(
        "x.example", dataclasses.replace(MODERN, rcpt_replies={"bob@x.example": gmail_like})
    )
    relay = await env.relay()
    first = await asyncio.to_thread(submit, relay, ["Bob@X.example", "carol@x.example"])
    states = await final(relay, first)
    assert states["Bob@X.example"]["state"] == "bounced"
    assert states["Bob@X.example"]["status"] == "5.1.1"
    assert states["carol@x.example"]["state"] == "sent"

    [entry] = entries(relay)
    reason = (
        "550 5.1.1 The email account that you tried to reach does not exist."
        " Please try double-checking the recipient's email address"
    )
    assert entry == suppressions.Suppression(
        "example.org",
        "bob@x.example",
        reason,
        "bounce",
        first,
        entry.created_at,
        entry.created_at + 30 * DAY,
    )

    def again() -> tuple[tuple[int, bytes], tuple[int, bytes], str, tuple[int, bytes]]:
        client = relay.session()
        try:
            assert client.mail("alice@example.org")[0] == 250
            refused = client.rcpt("bob@x.example")
            refused_mixed_case = client.rcpt("BOB@x.EXAMPLE")
            assert client.rcpt("carol@x.example") == (250, b"2.1.5 Recipient ok")
            second = data(client)
        finally:
            client.quit()
        # Scoped per sending domain: another domain of ours may still mail bob.
        other = relay.session("dave@other.example")
        try:
            assert other.mail("dave@other.example")[0] == 250
            return refused, refused_mixed_case, second, other.rcpt("bob@x.example")
        finally:
            other.quit()

    refused, refused_mixed_case, second, other = await asyncio.to_thread(again)
    expected = refusal("bob@x.example", "example.org", day(entry.created_at), reason)
    assert refused == expected
    assert refused_mixed_case == expected
    assert other == (250, b"2.1.5 Recipient ok")
    assert list(await final(relay, second)) == ["carol@x.example"]
    story = events.story(relay.db(), second)
    assert story is not None
    reply = f"{expected[0]} {expected[1].decode()}"
    assert [
        (r["address"], [(e["event"], e["reply"]) for e in r["events"]]) for r in story["refused"]
    ] == [
        ("bob@x.example", [("REFUSED", reply)]),
        ("BOB@x.EXAMPLE", [("REFUSED", reply)]),
    ]
    rejected = relay.service.metrics.smtpd_messages_rejected.labels(code="550")
    assert rejected._value.get() == 2


async def test_unknown_domains_suppress_too(env: Env) -> None:
    env.world.dns.add("nullmx.example", "MX", "0 .")
    relay = await env.relay(expiry="0")  # 0: never expires
    queue_id = await asyncio.to_thread(submit, relay, ["bob@nowhere.example", "bob@nullmx.example"])
    states = await final(relay, queue_id)
    assert [(a, r["state"], r["status"]) for a, r in sorted(states.items())] == [
        ("bob@nowhere.example", "bounced", "5.1.2"),
        ("bob@nullmx.example", "bounced", "5.1.10"),
    ]
    found = {e.address: (e.reason, e.expires_at) for e in entries(relay)}
    assert found == {
        "bob@nowhere.example": ("5.1.2 nowhere.example: no such domain (NXDOMAIN)", None),
        "bob@nullmx.example": ("5.1.10 nullmx.example accepts no mail (null MX, RFC 7505)", None),
    }


async def test_insecure_transient_full_and_codeless_bounces_do_not_suppress(env: Env) -> None:
    await env.world.add_mx("plain.example", NO_STARTTLS)
    replies = {
        "later@soft.example": "450 4.2.1 Try again later",
        "full@soft.example": "552 5.2.2 Mailbox full",
        "policy@soft.example": "550 5.7.1 Message refused by policy",
        "codeless@soft.example": "550 No such user here",
    }
    await env.world.add_mx("soft.example", dataclasses.replace(MODERN, rcpt_replies=replies))
    relay = await env.relay()
    queue_id = await asyncio.to_thread(submit, relay, ["bob@plain.example", *replies])
    msg = await settled(relay, queue_id, lambda r: r["state"] in ("bounced", "deferred"))
    assert {r["address"]: (r["state"], r["status"]) for r in msg["recipients"]} == {
        "bob@plain.example": ("bounced", "5.7.4"),
        "later@soft.example": ("deferred", "4.2.1"),
        "full@soft.example": ("bounced", "5.2.2"),
        "policy@soft.example": ("bounced", "5.7.1"),
        "codeless@soft.example": ("bounced", "5.0.0"),
    }
    assert entries(relay) == []
    # And so each of them may be submitted to again.
    await asyncio.to_thread(submit, relay, ["bob@plain.example", *replies])


async def test_our_own_bounce_suppresses_nothing(env: Env) -> None:
    # The sender's own MX refuses the bounce: a bounce of a bounce, which never suppresses.
    home = env.world.servers[0]
    home.behaviour = dataclasses.replace(MODERN, rcpt_replies={"alice@example.org": USER_UNKNOWN})
    await env.world.add_mx(
        "x.example", dataclasses.replace(MODERN, rcpt_replies={"bob@x.example": USER_UNKNOWN})
    )
    relay = await env.relay()
    queue_id = await asyncio.to_thread(submit, relay, ["bob@x.example"])
    await final(relay, queue_id)
    [bounce_id] = [
        row[0] for row in relay.db().execute("SELECT id FROM messages WHERE is_bounce = 1")
    ]
    states = await final(relay, bounce_id)
    assert states["alice@example.org"]["state"] == "bounced"
    assert states["alice@example.org"]["status"] == "5.1.1"
    assert [(e.domain, e.address) for e in entries(relay)] == [("example.org", "bob@x.example")]


async def test_turned_off_nothing_is_added_and_nothing_refused(env: Env) -> None:
    await env.world.add_mx(
        "x.example", dataclasses.replace(MODERN, rcpt_replies={"bob@x.example": USER_UNKNOWN})
    )
    relay = await env.relay(enabled=False)
    queue_id = await asyncio.to_thread(submit, relay, ["bob@x.example"])
    assert (await final(relay, queue_id))["bob@x.example"]["state"] == "bounced"
    assert entries(relay) == []
    conn = relay.db()
    with transaction(conn):
        suppressions.add(conn, "example.org", "carol@x.example", time.time())
    await asyncio.to_thread(submit, relay, ["bob@x.example", "carol@x.example"])


async def test_a_manual_entry_is_refused_in_one_short_printable_line(env: Env) -> None:
    relay = await env.relay()
    conn = relay.db()
    with transaction(conn):
        entry = suppressions.add(
            conn, "Example.ORG", "Bob@X.example", time.time(), reason="said\r\nno\x1b " + "x" * 300
        )
        plain = suppressions.add(conn, "example.org", "carol@x.example", time.time())
    reason = "said no " + "x" * (suppressions.REASON_MAX - len("said no ") - 3) + "..."
    assert (entry.domain, entry.address, entry.reason, entry.expires_at) == (
        "example.org",
        "bob@x.example",
        reason,
        None,
    )

    def rcpts() -> list[tuple[int, bytes]]:
        client = relay.session()
        try:
            assert client.mail("alice@example.org")[0] == 250
            return [client.rcpt("bob@x.example"), client.rcpt("carol@x.example")]
        finally:
            client.quit()

    assert await asyncio.to_thread(rcpts) == [
        refusal("bob@x.example", "example.org", day(entry.created_at), reason),
        refusal(
            "carol@x.example", "example.org", day(plain.created_at), suppressions.MANUAL_REASON
        ),
    ]


# ---- the store functions, on a clock of their own -------------------------------------------


T0 = 1_800_000_000.0  # 2027-01-15


def job(*, sender_domain: str | None = "example.org", is_bounce: bool = False) -> Job:
    return Job(
        message_id="0123456789ABCDEF",
        sender="alice@example.org",
        domain="x.example",
        data=b"",
        created_at=T0,
        is_bounce=is_bounce,
        sender_domain=sender_domain,
        recipients=(ClaimedRecipient(1, "bob@x.example", 1, False, None),),
    )


def bounced(status: str, address: str = "Bob@x.example") -> RecipientUpdate:
    return RecipientUpdate(1, address, "bounced", status, f"smtp; 550 {status} no", None, ())


@pytest.fixture
def db(database: str) -> Any:
    """On each backend (SQLite and PostgreSQL, tests/conftest.py `database`)."""
    conn = connect(database)
    yield conn
    conn.close()


@pytest.mark.parametrize(
    ("status", "hard"),
    [
        ("5.1.1", True),
        ("5.1.2", True),
        ("5.1.6", True),
        ("5.1.10", True),
        ("5.2.1", True),
        ("5.2.2", False),
        ("5.1.0", False),
        ("5.7.1", False),
        ("5.7.4", False),
        ("5.7.5", False),
        ("5.7.10", False),
        ("5.7.30", False),
        ("5.0.0", False),
        ("4.4.7", False),
        ("4.1.1", False),
    ],
)
def test_which_statuses_are_hard(db: Any, status: str, hard: bool) -> None:
    with transaction(db):
        added = suppressions.add_from_bounces(db, job(), [bounced(status)], T0, 30 * DAY)
    assert suppressions.is_hard(status) is hard
    assert added == int(hard)
    found = suppressions.lookup(db, "example.org", "bob@x.example", T0)
    assert (found is not None) is hard


def test_only_bounces_of_real_messages_count(db: Any) -> None:
    deferred = dataclasses.replace(bounced("5.1.1", "carol@x.example"), state="deferred")
    with transaction(db):
        for one in (job(is_bounce=True), job(sender_domain=None), job()):
            suppressions.add_from_bounces(db, one, [deferred], T0, 30 * DAY)
        # A bounce (is_bounce) and a TLS report (no sending domain) are ours: never suppress.
        assert (
            suppressions.add_from_bounces(db, job(is_bounce=True), [bounced("5.1.1")], T0, DAY) == 0
        )
        assert (
            suppressions.add_from_bounces(db, job(sender_domain=None), [bounced("5.1.1")], T0, DAY)
            == 0
        )
    assert suppressions.list_suppressions(db, T0) == []


def test_expiry_is_honoured_and_expired_entries_are_pruned(db: Any) -> None:
    with transaction(db):
        suppressions.add_from_bounces(db, job(), [bounced("5.1.1")], T0, 3600)
        suppressions.add_from_bounces(db, job(), [bounced("5.1.1", "forever@x.example")], T0, 0)
    assert suppressions.lookup(db, "example.org", "bob@x.example", T0 + 3599) is not None
    assert suppressions.lookup(db, "EXAMPLE.org.", "BOB@x.example", T0 + 3599) is not None
    assert suppressions.lookup(db, "other.example", "bob@x.example", T0) is None
    assert suppressions.lookup(db, "example.org", "bob@x.example", T0 + 3600) is None
    later = T0 + 3650 * DAY
    assert [e.address for e in suppressions.list_suppressions(db, later)] == ["forever@x.example"]
    assert db.execute("SELECT count(*) FROM suppressions").fetchone()[0] == 2  # not yet pruned
    with transaction(db):
        suppressions.add_from_bounces(db, job(), [bounced("5.2.1", "new@x.example")], later, 3600)
    rows = db.execute("SELECT address FROM suppressions ORDER BY address").fetchall()
    assert [r[0] for r in rows] == ["forever@x.example", "new@x.example"]


def test_a_new_bounce_renews_and_keeps_the_later_expiry(db: Any) -> None:
    with transaction(db):
        suppressions.add_from_bounces(db, job(), [bounced("5.1.1")], T0, 30 * DAY)
        suppressions.add_from_bounces(db, job(), [bounced("5.2.1")], T0 + DAY, DAY)
    entry = suppressions.lookup(db, "example.org", "bob@x.example", T0 + DAY)
    assert entry is not None
    assert (entry.reason, entry.created_at, entry.expires_at) == (
        "550 5.2.1 no",
        T0 + DAY,
        T0 + 30 * DAY,
    )
    assert entry.describe() == "suppressed for example.org since 2027-01-16 (550 5.2.1 no)"


def test_manual_add_and_remove(db: Any) -> None:
    def refused(kind: type[Exception], call: Any) -> str:
        with pytest.raises(kind) as caught:
            call()
        return str(caught.value)

    with transaction(db):
        accounts.add_domain(db, "example.org", "postmaster@example.org", T0)
        assert refused(
            accounts.NotFound, lambda: suppressions.add(db, "other.example", "bob@x.example", T0)
        ) == ("domain other.example is not one of ours")
        assert refused(ValueError, lambda: suppressions.add(db, "example.org", "bob", T0)) == (
            "'bob' is not an e-mail address"
        )
        expired = refused(
            ValueError,
            lambda: suppressions.add(db, "example.org", "bob@x.example", T0, expires_at=T0),
        )
        assert expired == "the expiry must be in the future"
        suppressions.add_from_bounces(db, job(), [bounced("5.1.1")], T0, 0)
        # By hand, the operator's word wins: a shorter expiry included.
        entry = suppressions.add(db, "example.org", "bob@x.example", T0, expires_at=T0 + DAY)
        assert entry.source == "manual" and entry.message_id is None
        assert suppressions.lookup(db, "example.org", "bob@x.example", T0 + DAY) is None
        suppressions.remove(db, "example.org", "Bob@X.example")
        assert refused(
            accounts.NotFound, lambda: suppressions.remove(db, "example.org", "bob@x.example")
        ) == ("bob@x.example is not suppressed for example.org")


def test_listing_pages_by_domain_and_address(db: Any) -> None:
    with transaction(db):
        for sender_domain in ("b.example", "a.example"):
            updates = [bounced("5.1.1", f"{n}@x.example") for n in ("carol", "bob")]
            suppressions.add_from_bounces(db, job(sender_domain=sender_domain), updates, T0, 0)
    keys = [(e.domain, e.address) for e in suppressions.list_suppressions(db, T0)]
    assert keys == [
        ("a.example", "bob@x.example"),
        ("a.example", "carol@x.example"),
        ("b.example", "bob@x.example"),
        ("b.example", "carol@x.example"),
    ]
    page = suppressions.list_suppressions(db, T0, limit=2, after=keys[1])
    assert [(e.domain, e.address) for e in page] == keys[2:]
    only = suppressions.list_suppressions(db, T0, domain="B.example")
    assert [(e.domain, e.address) for e in only] == keys[2:]


# ---- configuration -------------------------------------------------------------------------


def test_the_example_config_shows_the_defaults() -> None:
    example = Path(__file__).parent.parent / "config" / "mailrelay.example.toml"
    assert configmod.load(example).suppression == SuppressionConfig(enabled=True, expiry=30 * DAY)


@pytest.mark.parametrize(
    ("expiry", "seconds"), [("0", 0.0), (0, 0.0), ("12h", 43200.0), (3600, 3600.0), ("7d", 7 * DAY)]
)
def test_expiry_takes_a_duration_or_0_for_never(expiry: object, seconds: float) -> None:
    parsed = configmod.parse({"suppression": {"expiry": expiry}}, base_dir=Path())
    assert parsed.suppression.expiry == seconds


@pytest.mark.parametrize("expiry", ["-1", -5, "soon", True])
def test_a_bad_expiry_is_named(expiry: object) -> None:
    with pytest.raises(ConfigError) as caught:
        configmod.parse({"suppression": {"expiry": expiry}}, base_dir=Path())
    assert str(caught.value) == (
        f'suppression.expiry: {expiry!r} is not a duration (0 or more, e.g. 30, "90s", "5m", "5d")'
    )


# ---- the command ------------------------------------------------------------------------------


def test_the_suppression_commands(tmp_path: Path) -> None:
    config, _ = write_config_file(tmp_path, '[suppression]\nexpiry = "7d"\n')
    database = tmp_path / "queue.sqlite3"
    error = user_error(cli(config, "suppression", "list"))
    assert error == (
        f"no database at {database} (has `mailrelay serve` or `domain add` run with this config?)"
    )
    assert not database.exists()
    ok(config, "domain", "add", "example.org", "--notify", "postmaster@example.org")
    assert ok(config, "suppression", "list") == "no suppressed addresses\n"
    assert ok_json(config, "suppression", "list") == []

    out = ok(config, "suppression", "add", "example.org", "Bob@X.example", "--reason", "asked\x1b")
    assert out == "bob@x.example suppressed for example.org for good\n"
    out = ok(config, "suppression", "add", "example.org", "carol@x.example", "--expires", "30d")
    listed = ok_json(config, "suppression", "list")
    assert [
        {k: v for k, v in e.items() if k not in ("created_at", "expires_at")} for e in listed
    ] == [
        {
            "domain": "example.org",
            "address": "bob@x.example",
            "reason": "asked",
            "source": "manual",
            "message_id": None,
        },
        {
            "domain": "example.org",
            "address": "carol@x.example",
            "reason": suppressions.MANUAL_REASON,
            "source": "manual",
            "message_id": None,
        },
    ]
    bob, carol = listed
    assert bob["expires_at"] is None
    assert carol["expires_at"] - carol["created_at"] == 30 * DAY
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(carol["expires_at"]))
    assert out == f"carol@x.example suppressed for example.org until {until}\n"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(bob["created_at"]))
    assert ok(config, "suppression", "list", "--domain", "example.org").splitlines()[0] == (
        f"example.org\tbob@x.example\tmanual\tsince {since}\texpires never\tasked"
    )
    assert ok(config, "suppression", "list", "--domain", "other.example") == (
        "no suppressed addresses\n"
    )

    assert user_error(cli(config, "suppression", "add", "other.example", "bob@x.example")) == (
        "domain other.example is not one of ours"
    )
    assert user_error(cli(config, "suppression", "add", "example.org", "bob")) == (
        "'bob' is not an e-mail address"
    )
    done = cli(config, "suppression", "add", "example.org", "bob@x.example", "--expires", "soon")
    assert user_error(done) == "--expires: 'soon' is not a duration like 30d or 12h (0: never)"

    out = ok(config, "suppression", "remove", "example.org", "BOB@x.example")
    assert out == "bob@x.example no longer suppressed for example.org\n"
    assert user_error(cli(config, "suppression", "remove", "example.org", "bob@x.example")) == (
        "bob@x.example is not suppressed for example.org"
    )
    assert [e["address"] for e in ok_json(config, "suppression", "list")] == ["carol@x.example"]
