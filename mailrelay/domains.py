"""The DNS records a sending domain must publish (DKIM, SPF, DMARC), and a check that it has.

Record names are fully qualified but written without the root dot ("_dmarc.example.org"), as
DNS providers' web forms expect them; `Record.zone_line` gives the zone-file form. The check
reads what is published and judges it by what receivers would do with it, not by string
equality with our suggestion: a domain that already has an SPF or DMARC record only needs it to
include what makes our mail pass.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.TXT import TXT

from mailrelay.dkim import DkimKey
from mailrelay.resolver import make_resolver

Purpose = Literal["dkim", "spf", "dmarc"]

_TXT_STRING_MAX = 255
_DMARC_POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True)
class Record:
    type: str
    name: str
    value: str
    purpose: Purpose

    def zone_line(self, ttl: int | None = 3600) -> str:
        """The record in zone-file syntax: `name. [ttl] IN TXT ( "..." "..." )`, the value split
        into strings of at most 255 bytes as TXT needs (RFC 1035 §3.3.14); ttl None omits it."""
        strings = txt_strings(self.value)
        quoted = " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in strings)
        # Parentheses let the strings continue on other lines when the operator re-wraps them.
        rdata = quoted if len(strings) == 1 else f"( {quoted} )"
        ttl_part = "" if ttl is None else f" {ttl}"
        return f"{self.name}.{ttl_part} IN {self.type} {rdata}"


def txt_strings(value: str) -> list[str]:
    """`value` as the character-strings of one TXT record, each at most 255 bytes.

    A DKIM record keeps its tags before p= in a string of their own, so that the key is easy to
    tell apart and compare in a DNS provider's form. Our values are ASCII: characters are bytes.
    """
    head, sep, key = value.partition("p=")
    if len(value) <= _TXT_STRING_MAX:
        return [value]
    strings = [head] if sep and head and len(head) <= _TXT_STRING_MAX else []
    rest = sep + key if strings else value
    strings += [rest[i : i + _TXT_STRING_MAX] for i in range(0, len(rest), _TXT_STRING_MAX)]
    return strings


@dataclass(frozen=True)
class RecordCheck:
    record: Record
    found: list[str]
    valid: bool
    reason: str | None = None
    # The lookup itself failed (SERVFAIL, timeout): this says nothing about what is published.
    lookup_failed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.record.type,
            "name": self.record.name,
            "expected": self.record.value,
            "found": list(self.found),
            "valid": self.valid,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class CheckReport:
    domain: str
    records: list[RecordCheck]
    # The next DKIM key's records (`rotate-dkim`): reported, but not needed for `valid` yet.
    next_dkim: list[RecordCheck] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return bool(self.records) and all(r.valid for r in self.records)

    @property
    def conclusive(self) -> bool:
        """False when a lookup failed, so that the published state is unknown."""
        return not any(r.lookup_failed for r in self.records)

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "valid": self.valid,
            "records": [r.to_json() for r in self.records],
            # Only while `rotate-dkim` has made a key that does not sign yet.
            **({"next_dkim": [r.to_json() for r in self.next_dkim]} if self.next_dkim else {}),
        }


def expected_records(
    domain: str, keys: list[DkimKey], *, spf_mechanisms: tuple[str, ...], dmarc_rua: str
) -> list[Record]:
    """What `domain` should publish: one DKIM TXT per key given, then SPF, then DMARC.

    SPF ends in "~all" (softfail), not "-all": DMARC is what tells receivers to reject, and it
    passes on DKIM alone, whereas some receivers reject an SPF -all failure outright before
    looking at DKIM, which loses forwarded mail that DMARC would have accepted. DMARC starts at
    p=none, the standard safe first step: receivers report without acting, so the owner can see
    every source of their mail in the rua reports before tightening to quarantine or reject.
    An empty `dmarc_rua` means mailto:dmarc-reports@<domain>; a bare address gets "mailto:".
    A rua at another domain only works if that domain authorizes it (RFC 7489 §7.1).
    """
    domain = _normalize(domain)
    records = [
        Record("TXT", f"{key.selector}._domainkey.{domain}", key.public_record, "dkim")
        for key in keys
    ]
    records.append(Record("TXT", domain, f"v=spf1 {' '.join(spf_mechanisms)} ~all", "spf"))
    rua = dmarc_rua or f"dmarc-reports@{domain}"
    if not rua.lower().startswith(("mailto:", "https:", "http:")):
        rua = f"mailto:{rua}"
    records.append(
        Record("TXT", f"_dmarc.{domain}", f"v=DMARC1; p=none; rua={rua}; adkim=r; aspf=r", "dmarc")
    )
    return records


async def check(
    domain: str,
    expected: list[Record],
    *,
    nameservers: tuple[str, ...],
    # Not asyncio.timeout around the call: a lookup that times out is one record's result,
    # reported next to the others, so the budget goes to the resolver of each lookup.
    timeout: float,  # noqa: ASYNC109
    next_dkim: tuple[Record, ...] = (),
) -> CheckReport:
    """Look up every expected record's name (concurrently) and judge what is published.

    `next_dkim` are records of keys that do not sign yet: judged alike, reported apart, and not
    part of `valid`.

    `nameservers` are "ip" or "ip:port"; empty means the system's resolver configuration.
    `found` lists the TXT strings at the name (each record's strings joined); for SPF and DMARC
    only the records that declare that version (v=spf1, v=DMARC1), since other TXT records
    (site verifications and the like) legitimately share the name.
    """
    resolver = make_resolver(nameservers, timeout)
    names = sorted({r.name for r in [*expected, *next_dkim]})
    answers = await asyncio.gather(*(_lookup(resolver, name) for name in names))
    by_name = dict(zip(names, answers, strict=True))
    return CheckReport(
        _normalize(domain),
        [_judge(r, *by_name[r.name]) for r in expected],
        [_judge(r, *by_name[r.name]) for r in next_dkim],
    )


def _judge(record: Record, texts: list[str], failure: str | None) -> RecordCheck:
    if failure is not None:
        return RecordCheck(record, [], False, f"DNS lookup failed: {failure}", lookup_failed=True)
    if record.purpose == "dkim":
        return _judge_dkim(record, texts)
    if record.purpose == "spf":
        return _judge_spf(record, [t for t in texts if _is_version(t, "v=spf1")])
    return _judge_dmarc(record, [t for t in texts if _is_version(t, "v=DMARC1")])


# -- judging -------------------------------------------------------------------------------------


def _judge_dkim(record: Record, found: list[str]) -> RecordCheck:
    if not found:
        return RecordCheck(record, found, False, "not published")
    if len(found) > 1:
        # RFC 6376 §3.6.2.2: with several TXT records at a selector the result is undefined;
        # receivers may use any one of them.
        return RecordCheck(record, found, False, f"{len(found)} TXT records; publish exactly one")
    ours = _tags(record.value)
    theirs = _tags(found[0])
    if "v" in theirs and theirs["v"] != "DKIM1":
        return RecordCheck(record, found, False, f"v={theirs['v']} is not DKIM1")
    if not theirs.get("p"):
        return RecordCheck(record, found, False, "no public key (p= missing or empty: revoked)")
    if theirs.get("k", "rsa").lower() != ours.get("k", "rsa").lower():
        return RecordCheck(
            record, found, False, f"k={theirs.get('k', 'rsa')}, expected k={ours.get('k', 'rsa')}"
        )
    if _squash(theirs["p"]) != _squash(ours.get("p", "")):
        return RecordCheck(record, found, False, "public key (p=) differs from this relay's key")
    return RecordCheck(record, found, True)


def _judge_spf(record: Record, found: list[str]) -> RecordCheck:
    if not found:
        return RecordCheck(record, found, False, "not published")
    if len(found) > 1:
        return RecordCheck(
            record,
            found,
            False,
            f"{len(found)} SPF records; RFC 7208 §3.2 forbids that (a permerror)",
        )
    terms = found[0].split()[1:]
    # Mechanisms after "all" are never evaluated (RFC 7208 §5.1), so only the part before counts.
    before_all: list[str] = []
    for term in terms:
        qualifier, mechanism = _qualified(term)
        if mechanism == "all":
            if qualifier == "+":
                return RecordCheck(
                    record, found, False, "+all authorizes every server on the internet"
                )
            break
        # Only a pass ("+", the default) authorizes; "~a:relay" or "-a:relay" would not.
        if qualifier == "+":
            before_all.append(mechanism)
    # Includes, redirect= and a/mx names that resolve to our address could also cover the relay,
    # but following them means evaluating SPF; we ask for our mechanism literally instead.
    missing = [m for m in _expected_mechanisms(record.value) if not _covered(m, before_all)]
    if missing:
        return RecordCheck(record, found, False, f"does not authorize {' '.join(missing)}")
    return RecordCheck(record, found, True)


def _judge_dmarc(record: Record, found: list[str]) -> RecordCheck:
    if not found:
        return RecordCheck(record, found, False, "not published")
    if len(found) > 1:
        # RFC 7489 §6.6.3: more than one record means receivers apply no policy at all.
        return RecordCheck(record, found, False, f"{len(found)} DMARC records; publish one")
    policy = _tags(found[0]).get("p", "").lower()
    if policy not in _DMARC_POLICIES:
        return RecordCheck(record, found, False, "no valid p= policy (none, quarantine, reject)")
    return RecordCheck(record, found, True)


# -- parsing -------------------------------------------------------------------------------------


def _tags(text: str) -> dict[str, str]:
    """A DKIM/DMARC tag=value list (RFC 6376 §3.2); the first occurrence of a tag wins."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def _squash(value: str) -> str:
    # Base64 in p= may contain folding whitespace (RFC 6376 §3.6.1); it is not part of the key.
    return "".join(value.split())


def _is_version(text: str, version: str) -> bool:
    # "v=spf1" must be followed by a space or end the record (RFC 7208 §4.5); DMARC's v tag is
    # followed by ";" or the end. "v=spf10" is not SPF.
    head = text.lstrip()
    if version == "v=spf1":
        return head[:6].lower() == "v=spf1" and (len(head) == 6 or head[6] == " ")
    tag, _, _rest = head.partition(";")
    return "".join(tag.split()) == version


def _qualified(term: str) -> tuple[str, str]:
    if term and term[0] in "+-~?":
        return term[0], term[1:].lower()
    return "+", term.lower()


def _expected_mechanisms(spf_value: str) -> list[str]:
    return [t.lower() for t in spf_value.split()[1:] if _qualified(t)[1] != "all"]


def _covered(mechanism: str, published: list[str]) -> bool:
    kind, _, target = mechanism.partition(":")
    for other in published:
        other_kind, _, other_target = other.partition(":")
        if other_kind != kind:
            continue
        if kind in ("ip4", "ip6"):
            # A published range that contains our address or range authorizes it too.
            try:
                ours = ipaddress.ip_network(target, strict=False)
                theirs = ipaddress.ip_network(other_target, strict=False)
            except ValueError:
                continue
            if isinstance(ours, ipaddress.IPv4Network) and isinstance(
                theirs, ipaddress.IPv4Network
            ):
                if ours.subnet_of(theirs):
                    return True
            elif (
                isinstance(ours, ipaddress.IPv6Network)
                and isinstance(theirs, ipaddress.IPv6Network)
                and ours.subnet_of(theirs)
            ):
                return True
        elif target.rstrip(".") == other_target.rstrip("."):
            return True
    return False


def _normalize(domain: str) -> str:
    return domain.strip().lower().rstrip(".")


# -- DNS -----------------------------------------------------------------------------------------


async def _lookup(resolver: dns.asyncresolver.Resolver, name: str) -> tuple[list[str], str | None]:
    """TXT strings at `name` (each record's strings joined), or a reason the lookup failed.

    NXDOMAIN and an empty answer both mean "nothing published", which is a fact about the
    domain; SERVFAIL and timeouts say nothing about it and are reported as failures.
    """
    try:
        answer = await resolver.resolve(dns.name.from_text(name), dns.rdatatype.TXT, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return [], None
    except dns.resolver.NoNameservers as exc:
        return [], _nameserver_errors(exc)
    except dns.exception.Timeout:
        return [], f"timed out after {resolver.lifetime:g}s"
    except dns.exception.DNSException as exc:
        return [], str(exc)
    texts: list[str] = []
    for rdata in answer:
        assert isinstance(rdata, TXT)
        texts.append(b"".join(rdata.strings).decode("utf-8", "replace"))
    return texts, None


def _nameserver_errors(exc: dns.resolver.NoNameservers) -> str:
    # dnspython's own message repeats the question and every server; "SERVFAIL" is what matters.
    errors = exc.kwargs.get("errors") or []
    reasons = []
    for error in errors:
        detail = str(error[3]) if len(error) > 3 else str(error)
        # A server's answer with a bad rcode reads "Server ... answered SERVFAIL".
        reason = detail.rsplit("answered ", 1)[-1] if "answered " in detail else detail
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) or "no nameserver answered"
