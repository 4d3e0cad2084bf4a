"""The one vocabulary of delivery results: how an attempt on a recipient ended, and the evidence.

Every attempt ends as exactly one `Kind`, decided where the reply code, the error or the policy
verdict is known (the session, the policy), never by comparing strings later. The queue runner
turns a `Result` into the recipient's next state; the store records the `Kind` and `Evidence`
as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


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

    @property
    def status(self) -> str:
        """The RFC 3463 enhanced status code a bounce for this reason carries."""
        return _INSECURE_STATUS[self]


_INSECURE_STATUS = {
    Insecure.NO_STARTTLS: "5.7.4",
    Insecure.STARTTLS_REFUSED: "5.7.4",
    Insecure.CERTIFICATE: "5.7.5",
    Insecure.HANDSHAKE: "5.7.5",
    Insecure.PROTOCOL: "5.7.10",
    Insecure.CIPHER: "5.7.10",
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
    cert_verified: bool | None = None  # chain to a trusted root for the MX name
    policy: str | None = None  # which policy decided: "encrypt", "verify", later DANE, MTA-STS
    policy_detail: str | None = None  # e.g. the TLSA record that matched

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
    """Among insecure refusals, the one whose reason says most about the destination."""
    return min(results, key=lambda r: _TELLING.get(r.status, 3))
