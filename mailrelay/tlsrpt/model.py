"""One delivery session as TLS-RPT (RFC 8460 §4) counts it; the delivery side makes these, the
store aggregates them per policy and UTC day."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PolicyType = Literal["tlsa", "sts", "no-policy-found"]

# RFC 8460 §4.3 result types (a failed session has exactly one).
RESULT_TYPES = frozenset(
    {
        "starttls-not-supported",
        "certificate-host-mismatch",
        "certificate-expired",
        "certificate-not-trusted",
        "validation-failure",
        "tlsa-invalid",
        "dnssec-invalid",
        "dane-required",
        "sts-policy-fetch-error",
        "sts-policy-invalid",
        "sts-webpki-invalid",
    }
)


@dataclass(frozen=True)
class AppliedPolicy:
    """The policy that applied to a session (§4.4 "policies" entry): its type, the policy
    domain, the policy text as strings (each TLSA record, or each line of the MTA-STS policy)
    and, for MTA-STS, the policy's mx patterns."""

    type: PolicyType
    domain: str
    strings: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Session:
    """One connection (or one policy failure before any connection) to a recipient domain.

    `result_type` is None for a successful session (TLS negotiated and the policy satisfied),
    else one of RESULT_TYPES.
    """

    at: float
    policy: AppliedPolicy
    result_type: str | None
    sending_ip: str | None = None
    receiving_mx_hostname: str | None = None
    receiving_ip: str | None = None
    failure_reason_code: str | None = None  # free text, e.g. the verification error
