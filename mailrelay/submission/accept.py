"""Checking and preparing a submitted message for an authenticated principal: the rules SMTP
submission and the HTTP API both apply before a message may be queued.

The principal is whoever authenticated (an SMTP user, an API key); `SendAs` says which addresses
it may use. `prepare` runs in a worker thread: it parses, checks, adds our header fields and
signs. The caller commits the result with `queue.enqueue` in a store write of its own, beside
whatever it counts with the message.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable
from dataclasses import dataclass

from mailrelay.config import SubmissionConfig
from mailrelay.store import Store, accounts, senders
from mailrelay.submission import headers, replies
from mailrelay.submission.message import add_submission_headers

SignFunction = Callable[[bytes, str], bytes]
"""(message, sending domain) -> the message with DKIM-Signature headers. Blocking: it is run in
a worker thread with the rest of the message's work."""

_BARE_LINE_ENDING = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")
_NOT_PRINTABLE = re.compile(r"[^\x21-\x7e]")

# An address named in a reply is shown printable and at most 256 characters.
NOT_A_SENDER = "553 5.7.1 <{address}>: not a sender {user} may use"
NUL_IN_DATA = "554 5.6.0 Message refused: NUL character in DATA (RFC 5322 section 2.3, RFC 6152)"


def split_address(address: str) -> tuple[str, str] | None:
    """'alice@Example.org' -> ('alice', 'example.org'), or None if it is not a routable address.

    Stricter than RFC 5321 on purpose: quoted local parts and address literals are legal but
    are never what a submission client of ours means, and they complicate every later step.
    """
    local, at, domain = address.rpartition("@")
    domain = domain.lower()
    if not at or not _LOCAL.fullmatch(local) or not _DOMAIN.fullmatch(domain):
        return None
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return None
    return local, domain


@dataclass(frozen=True)
class Refusal:
    reply: str
    """An SMTP reply: the API maps its code to an HTTP status."""


@dataclass(frozen=True)
class Prepared:
    message: bytes
    """Signed, as it will be queued."""
    tls_required_no: bool = False
    """The message carries "TLS-Required: No" (RFC 8689 §4.2.1)."""
    signing_domain: str = ""


@dataclass(frozen=True)
class Principal:
    """Who submits: what it may send as, and the Authentication-Results field that says so."""

    send_as: Callable[[], senders.SendAs]
    """Read when the message is checked (blocking; in the worker thread)."""
    authentication_results: str | None
    protocol: str = "ESMTPSA"
    """The Received field's "with": how the message came in."""


class Acceptor:
    """The checks and preparation shared by every way in. Holds no per-message state."""

    def __init__(
        self,
        config: SubmissionConfig,
        hostname: str,
        store: Store,
        signer: SignFunction | None,
    ) -> None:
        self.config = config
        self.hostname = hostname
        self.store = store
        self.signer = signer

    def domain_may_send(self, domain: accounts.Domain | None) -> bool:
        return domain is not None and (
            domain.state == "valid" or self.config.allow_unverified_domains
        )

    def prepare(
        self, data: bytes, principal: Principal, sender_domain: str, queue_id: str, now: float
    ) -> Prepared | Refusal:
        """The message as it will be queued, or why it is refused. Runs in a worker thread."""
        if _BARE_LINE_ENDING.search(data):
            # SMTP smuggling: a bare LF or CR may be read as a line end by the next hop, which
            # would then see a second message hidden in this one. Refuse the whole DATA.
            return Refusal(replies.BARE_LINE_ENDING)
        if b"\0" in data:
            # RFC 5322 section 2.3 and RFC 6152 allow no NUL, not even in an 8-bit body; many
            # programs after us would cut the message short there.
            return Refusal(NUL_IN_DATA)
        try:
            section = headers.read(data)
        except headers.HeaderError as exc:
            return Refusal(exc.reply)
        data = section.message
        from_fields = section.all("From")
        if len(from_fields) != 1:
            return Refusal(replies.FROM_MISSING)
        send_as = principal.send_as()
        # Every address of From: (and below, of each Sender:) as email.utils reads them: on a
        # malformed field it yields more, and emptier, addresses than a lenient reader would.
        authors = [a for _, a in email.utils.getaddresses([from_fields[0].unfolded()])]
        if not authors:
            return Refusal(replies.FROM_NOT_OWNED)
        for address in authors:
            refusal = sender_refusal(send_as, address, foreign=replies.FROM_NOT_OWNED)
            if refusal is not None:
                return Refusal(refusal)
        for field in section.all("Sender"):
            for _, address in email.utils.getaddresses([field.unfolded()]) or [("", "")]:
                refusal = sender_refusal(send_as, address, foreign=None)
                if refusal is not None:
                    return Refusal(refusal)
        # DMARC aligns on the From: domain, so that is the domain that signs. It differs from
        # the envelope's (checked at MAIL) only under a grant for another of our domains.
        signing_domain = authors[0].rpartition("@")[2].lower()
        if signing_domain != sender_domain:
            domain = self.store.read_blocking(lambda c: accounts.get_domain(c, signing_domain))
            if not self.domain_may_send(domain):
                return Refusal(replies.DOMAIN_NOT_VERIFIED.format(domain=signing_domain))
        message = add_submission_headers(
            data,
            hostname=self.hostname,
            queue_id=queue_id,
            now=now,
            authentication_results=principal.authentication_results,
            protocol=principal.protocol,
        )
        if self.signer is not None:
            message = self.signer(message, signing_domain)
        tls_required = section.all("TLS-Required")
        no = any(f.unfolded().strip().lower() == "no" for f in tls_required)
        return Prepared(message, no, signing_domain)


def sender_refusal(send_as: senders.SendAs, address: str, *, foreign: str | None) -> str | None:
    """Why the principal may not send as `address`, or None if it may. An address outside the
    principal's own domain that no grant covers gets `foreign` where given (the refusal that was
    there before per-user grants); every other one is named."""
    if send_as.allows(address):
        return None
    own_domain = send_as.user.rpartition("@")[2]
    if foreign is not None and (split_address(address) or ("", ""))[1] != own_domain:
        return foreign
    shown = _NOT_PRINTABLE.sub("?", address)[:256]
    return NOT_A_SENDER.format(address=shown, user=send_as.user)
