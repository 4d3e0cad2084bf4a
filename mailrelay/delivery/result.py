"""The one vocabulary of delivery results: how an attempt on a recipient ended, and the evidence.

Every attempt ends as exactly one `Kind`, decided where the reply code, the error or the policy
verdict is known (the session, the policy), never by comparing strings later. The queue runner
turns a `Result` into the recipient's next state; the store records the `Kind` and `Evidence`
as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from mailrelay.tlsrpt import model as tlsrpt


class Kind(StrEnum):
    """How an attempt ended; the value is what the store and `queue show` say."""

    SENT = "sent"  # the MX took responsibility (2xx after the final dot)
    TRANSIENT = "transient"  # try again later: 4xx, no connection, DNS trouble, broken handshake
    PERMANENT = "permanent"  # never going to work: 5xx, NXDOMAIN, null MX
    INSECURE = "insecure"  # reachable, but no MX met the transport policy


class Insecure(StrEnum):
    """Why an MX was refused as insecure; the value is the metrics label."""

    NO_STARTTLS = "no_starttls"
    STARTTLS_REFUSED = "starttls_refused"
    CERTIFICATE = "certificate"
    HANDSHAKE = "handshake"
    PROTOCOL = "protocol"
    CIPHER = "cipher"
    DANE = "dane"  # secure TLSA records, and the certificate matches none of them
    DANE_REQUIRED = "dane_required"  # security_level = "dane", and the MX has no DANE
    MTA_STS = "mta_sts"  # an enforce policy refuses the MX name or its certificate
    # The message was sent with REQUIRETLS (RFC 8689) and this MX is not authenticated (no DANE,
    # no MTA-STS enforce, no security_level verify) or does not offer REQUIRETLS itself.
    REQUIRETLS = "requiretls"

    @property
    def status(self) -> str:
        """The RFC 3463 enhanced status code a bounce for this reason carries."""
        return _INSECURE_STATUS[self]

    @property
    def defers(self) -> bool:
        """Whether recipients wait instead of bouncing at once. A failure of a policy the
        recipient published is often its own key or policy rollover, or an attacker in the path
        for now: RFC 7672 §2.2 and RFC 8461 §5 want delivery deferred, and the bounce only at
        the queue lifetime (with this reason). A missing STARTTLS or a weak cipher is the
        server's lasting configuration: `insecure_action` decides."""
        return self in (Insecure.DANE, Insecure.DANE_REQUIRED, Insecure.MTA_STS)


_INSECURE_STATUS = {
    Insecure.NO_STARTTLS: "5.7.4",
    Insecure.STARTTLS_REFUSED: "5.7.4",
    Insecure.CERTIFICATE: "5.7.5",
    Insecure.HANDSHAKE: "5.7.5",
    Insecure.PROTOCOL: "5.7.10",
    Insecure.CIPHER: "5.7.10",
    Insecure.DANE: "5.7.5",
    Insecure.DANE_REQUIRED: "5.7.5",
    Insecure.MTA_STS: "5.7.5",
    Insecure.REQUIRETLS: "5.7.30",  # RFC 8689 §5: "REQUIRETLS support required"
}
# An MX that did offer TLS (5.7.10, 5.7.5) says more about the destination than one that offered
# none (5.7.4): the bounce names the most telling reason.
_TELLING = {"5.7.10": 0, "5.7.5": 1, "5.7.4": 2}


@dataclass(frozen=True)
class Evidence:
    """What one connection to one MX address showed: the operator's proof of how mail left."""

    at: float
    kind: Kind  # how this connection ended, for the recipient it carried
    mx_host: str | None = None
    mx_address: str | None = None
    reply: str | None = None  # the server's reply, or our diagnostic where it gave none
    tls_protocol: str | None = None
    tls_cipher: str | None = None
    cert_fingerprint: str | None = None  # SHA-256 of the leaf, lowercase hex
    cert_verified: bool | None = None  # authenticated by DANE, or by WebPKI for the MX name
    policy: str | None = None  # which policy decided: "encrypt", "verify", later DANE, MTA-STS
    policy_detail: str | None = None  # e.g. the TLSA record that matched
    local_address: str | None = None  # our end of the connection: TLS-RPT's sending-mta-ip

    def ended(self, kind: Kind, reply: str | None) -> Evidence:
        """The same connection's facts, for a recipient whose transaction ended otherwise."""
        return replace(self, kind=kind, reply=reply)


@dataclass(frozen=True)
class Result:
    """How one attempt ended for one recipient (or for every recipient of a connection)."""

    kind: Kind
    status: str  # RFC 3463, e.g. "2.0.0", "4.4.1", "5.7.10"
    diagnostic: str  # for the DSN and the log: "smtp; 550 5.1.1 ..." or "mx1[...]: ..."
    insecure: Insecure | None = None  # set exactly when kind is INSECURE
    evidence: tuple[Evidence, ...] = ()  # every connection tried for it, in order
    # A transient failure that says nothing about the destination: this host has no route to
    # the address at all (an IPv6 MX address on an IPv4-only host). It must not keep a
    # destination whose reachable MX hosts are all insecure from bouncing.
    no_route: bool = False
    # The attempt's TLS sessions as TLS-RPT (RFC 8460) counts them; the same tuple on every
    # recipient's result of one attempt, so the runner records them once.
    reports: tuple[tlsrpt.Session, ...] = ()

    def __post_init__(self) -> None:
        if (self.kind is Kind.INSECURE) != (self.insecure is not None):
            raise ValueError(f"an {self.kind} result with insecure={self.insecure!r}")

    @classmethod
    def refused(cls, reason: Insecure, diagnostic: str, evidence: Evidence) -> Result:
        return cls(Kind.INSECURE, reason.status, diagnostic, reason, (evidence,))

    def with_evidence(self, earlier: tuple[Evidence, ...]) -> Result:
        """This result, preceded by what earlier connections of the same attempt showed."""
        return replace(self, evidence=(*earlier, *self.evidence))


def most_telling(results: list[Result]) -> Result:
    """Among insecure refusals, the one that decides: a refusal that defers (a published
    policy failed) before any other, so that one MX with a rolled-over DANE key and one with
    TLS 1.0 wait rather than bounce; then the reason that says most about the destination."""
    return min(
        results,
        key=lambda r: (not (r.insecure and r.insecure.defers), _TELLING.get(r.status, 3)),
    )
