"""What delivery tells TLS reporting (RFC 8460): each connection's TLS outcome as a report counts
it, under the recipient's policy that applied. The aggregation, the reports and their sending
are `mailrelay.tlsrpt`'s."""

from __future__ import annotations

from mailrelay.delivery.policy import Route
from mailrelay.delivery.result import Evidence, Insecure, Kind, Result
from mailrelay.tlsrpt.model import AppliedPolicy, Session

# RFC 8460 §4.3 result types for the refusals that name one kind of failure.
_RESULT_TYPE = {
    Insecure.NO_STARTTLS: "starttls-not-supported",
    Insecure.STARTTLS_REFUSED: "starttls-not-supported",
    Insecure.DANE: "tlsa-invalid",  # none of the TLSA records matches the certificate
    Insecure.DANE_REQUIRED: "dane-required",
    Insecure.HANDSHAKE: "validation-failure",
    Insecure.PROTOCOL: "validation-failure",
    Insecure.CIPHER: "validation-failure",
}


def succeeded(route: Route, domain: str, evidence: Evidence) -> Session:
    """A connection whose TLS satisfied the policy: one successful session."""
    return _session(route, domain, evidence, None, None)


def failed(route: Route, domain: str, result: Result) -> Session | None:
    """A connection (or a host refused before one) as a failed session; None when nothing about
    TLS failed (no connection, a 4xx greeting) or the failure is not the recipient's (the
    sender's REQUIRETLS asked for more than the destination publishes)."""
    evidence = result.evidence[-1] if result.evidence else None
    if evidence is None:
        return None
    if result.insecure is None:
        # A TLSA lookup that failed: DNSSEC could not vouch for the records (RFC 7672 §2.1.1).
        if result.kind is Kind.TRANSIENT and evidence.policy == "dane" and not evidence.mx_address:
            return _session(route, domain, evidence, "dnssec-invalid", result.diagnostic)
        return None
    if result.insecure is Insecure.REQUIRETLS:
        return None
    result_type = _RESULT_TYPE.get(result.insecure)
    if result_type is None:  # CERTIFICATE, MTA_STS: the words of the certificate check say which
        result_type = _certificate_failure(result.diagnostic, evidence)
    return _session(route, domain, evidence, result_type, result.diagnostic)


def _certificate_failure(diagnostic: str, evidence: Evidence) -> str:
    if evidence.tls_protocol is None:
        # Refused before any connection: the MX is not one the MTA-STS policy lists.
        return "validation-failure"
    if "certificate has expired" in diagnostic or "not yet valid" in diagnostic:
        return "certificate-expired"
    if "hostname mismatch" in diagnostic:
        return "certificate-host-mismatch"
    return "certificate-not-trusted"


def _session(
    route: Route, domain: str, evidence: Evidence, result_type: str | None, reason: str | None
) -> Session:
    return Session(
        at=evidence.at,
        policy=route.report or AppliedPolicy("no-policy-found", domain),
        result_type=result_type,
        sending_ip=evidence.local_address,
        receiving_mx_hostname=route.host.name,
        receiving_ip=evidence.mx_address,
        failure_reason_code=reason[:200] if reason else None,
    )
