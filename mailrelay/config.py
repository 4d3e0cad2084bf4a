"""Configuration: embedded defaults, then one TOML file, then validation, into frozen dataclasses.

Every key has a default that works on a laptop, so an empty file is valid. Unknown keys and bad
values fail at load time with a `ConfigError` that names the key and the value, so a typo never
surfaces hours later as a delivery failure.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

# "encrypt": any certificate; "verify": WebPKI; "dane": DANE must apply and match (RFC 7672).
# Where the recipient publishes DANE or MTA-STS, every level is raised to it automatically.
SecurityLevel = Literal["encrypt", "verify", "dane"]
CipherProfile = Literal["ncsc-2025", "nist-800-52r2", "tls13-only"]
InsecureAction = Literal["bounce", "defer"]
AddressFamily = Literal["ipv4", "ipv6", "both"]
LogFormat = Literal["kv", "json"]
DkimAlgorithm = Literal["rsa", "rsa+ed25519"]


# Where the systemd unit and the CLI look when neither --config nor MAILRELAY_CONFIG says.
DEFAULT_PATH = "/etc/mailrelay/mailrelay.toml"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the bad value."""


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SubmissionConfig:
    # A submission server serves the organisation's network: all interfaces, as DESIGN.md says.
    listen: tuple[ListenAddress, ...] = (ListenAddress("0.0.0.0", 587),)  # noqa: S104
    implicit_tls_listen: tuple[ListenAddress, ...] = ()
    cert_file: str = "/etc/mailrelay/tls/fullchain.pem"
    key_file: str = "/etc/mailrelay/tls/privkey.pem"
    # Development only: make a self-signed certificate at cert_file/key_file when both are missing.
    self_signed_if_missing: bool = False
    max_message_size: int = 26_214_400
    max_recipients: int = 100
    # Development only: let domains that have not passed `domain check` send.
    allow_unverified_domains: bool = False
    max_auth_failures: int = 3
    timeout_seconds: float = 300.0


@dataclass(frozen=True)
class StorageConfig:
    path: str = "/var/lib/mailrelay/mailrelay.sqlite3"
    # Several relays on one queue (issue 16): a PostgreSQL URL puts the store there instead of
    # the SQLite file at `path` ("" keeps SQLite, the embedded default).
    url: str = ""

    @property
    def database(self) -> str:
        """What the store opens: the PostgreSQL URL if one is set, else the SQLite file."""
        return self.url or self.path


@dataclass(frozen=True)
class DomainPolicy:
    """Per-destination overrides; None means "as in [delivery]"."""

    security_level: SecurityLevel | None = None
    cipher_profile: CipherProfile | None = None
    insecure_action: InsecureAction | None = None
    # RFC 8689 §4.2.1: let a message with "TLS-Required: No" to this domain set its DANE and
    # MTA-STS policies aside (it still goes only over TLS). Off: the header is kept and logged.
    honour_tls_required_no: bool = False


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = 25
    nameservers: tuple[str, ...] = ()
    security_level: SecurityLevel = "encrypt"
    cipher_profile: CipherProfile = "ncsc-2025"
    ca_file: str = ""
    insecure_action: InsecureAction = "bounce"
    max_queue_lifetime: float = 5 * 86400.0
    workers: int = 16
    # Accept and queue, but deliver nothing (maintenance, or a new install not yet trusted).
    hold: bool = False
    # Deliver from a process of its own (a second core) beside the submission process; false
    # keeps everything in one process (small machines, tests, debugging).
    separate_process: bool = True
    connect_timeout: float = 30.0
    command_timeout: float = 120.0
    # Bounds on one attempt, so that a domain with dozens of MX records (or a hostile one)
    # cannot hold a worker for hours: MX hosts tried (chasquid: 5), addresses tried in all
    # (Postfix smtp_mx_address_limit), and a deadline for the whole attempt.
    max_mx_hosts: int = 5
    max_mx_addresses: int = 10
    attempt_deadline: float = 600.0
    # Which addresses to connect to: a host without IPv6 should say "ipv4" rather than try
    # every AAAA record and wait for each to fail.
    address_family: AddressFamily = "both"
    dns_timeout: float = 10.0
    # MTA-STS policy fetches (RFC 8461 §3.3): the HTTPS port (tests point it elsewhere) and a
    # deadline for the whole fetch, short because it delays delivery to that domain.
    mta_sts_port: int = 443
    mta_sts_timeout: float = 10.0
    # How often an idle runner looks at the queue; new mail wakes it at once (on PostgreSQL,
    # mail queued by another instance too, through LISTEN/NOTIFY).
    poll_interval: float = 1.0
    domains: dict[str, DomainPolicy] = field(default_factory=dict)

    def security_level_for(self, domain: str) -> SecurityLevel:
        override = self.domains.get(domain.lower())
        return (
            override.security_level if override and override.security_level else self.security_level
        )

    def cipher_profile_for(self, domain: str) -> CipherProfile:
        override = self.domains.get(domain.lower())
        return (
            override.cipher_profile if override and override.cipher_profile else self.cipher_profile
        )

    def honours_tls_required_no(self, domain: str) -> bool:
        override = self.domains.get(domain.lower())
        return bool(override and override.honour_tls_required_no)

    def insecure_action_for(self, domain: str) -> InsecureAction:
        override = self.domains.get(domain.lower())
        if override and override.insecure_action:
            return override.insecure_action
        return self.insecure_action


@dataclass(frozen=True)
class InstanceConfig:
    """This relay among several on one PostgreSQL database (issue 16)."""

    # Names this instance's claims (`queue list`) and metrics; two instances on one database
    # need distinct ids, and an instance must keep its id across restarts (at start it takes
    # back only what its own id claimed).
    id: str = field(default_factory=socket.gethostname)
    # A claim's lease lasts delivery.attempt_deadline plus this: the runner gives up at the
    # deadline, so a live instance's lease never runs out while it delivers; once an instance
    # died, another one takes its recipients back when the lease has run out.
    lease_margin: float = 60.0


@dataclass(frozen=True)
class DkimConfig:
    key_dir: str = "/var/lib/mailrelay/dkim"
    algorithm: DkimAlgorithm = "rsa"
    rsa_bits: int = 2048
    # With storage.url: the file holding the key (32 random bytes, base64) that seals the DKIM
    # private keys kept in the database; the same file on every instance. "" : none.
    master_key_file: str = ""


@dataclass(frozen=True)
class RecordsConfig:
    """What `domain records` asks a domain to publish."""

    # SPF mechanisms naming this relay; empty means "a:<hostname>".
    spf_mechanisms: tuple[str, ...] = ()
    # Where DMARC aggregate reports go; empty means "mailto:dmarc-reports@<domain>".
    dmarc_rua: str = ""


@dataclass(frozen=True)
class LimitsConfig:
    """What one client or one credential may take; 0 means no limit for the counts.

    Connections (like Postfix's smtpd_client_connection_count_limit / anvil): past a cap a new
    connection is answered `421 4.7.0` and closed. Sessions that have not authenticated get a
    shorter timeout. Rates and quotas are per authenticated user, counted in the store so that
    a restart does not reset them, answered `451 4.7.1` (messages) or `452 4.5.3` (recipients)
    with the window in the text. AUTH failures back off per client address and per login name
    across sessions, doubling up to `auth_backoff_max`.
    """

    max_connections: int = 1000
    max_connections_per_ip: int = 50
    max_unauthenticated_per_ip: int = 20
    pre_auth_timeout: float = 60.0
    messages_per_minute: int = 600
    recipients_per_hour: int = 10_000
    recipients_per_day: int = 50_000
    auth_backoff_max: float = 16.0


@dataclass(frozen=True)
class TlsRptConfig:
    """TLS reporting (RFC 8460): a daily report of what delivery saw of each recipient domain's
    TLS, sent to the domains that ask for one in `_smtp._tls`. Off by default: sending reports to
    third parties is the operator's choice, and a mailed report needs a From: address at one of
    our domains (it must be DKIM-signed). Empty names are derived (`tlsrpt.report.identity`).
    """

    enabled: bool = False
    organization_name: str = ""  # "": the hostname
    contact_info: str = ""  # "": postmaster@<hostname>
    from_address: str = ""  # "": noreply-tlsrpt@<the contact address's domain>
    # Reports for a UTC day go out the next day from this hour (UTC) on: RFC 8460 §4.1 asks
    # for a delay, so that every sender's reports do not reach the receivers at midnight.
    send_hour: int = 2
    # The most rua URIs one domain's record may have us send to (RFC 8460 sets no bound).
    max_rua: int = 5
    https_timeout: float = 30.0


@dataclass(frozen=True)
class SuppressionConfig:
    """The suppression list (README, "Suppression list"): a hard bounce (unknown user, no such
    domain, mailbox disabled) stops the sending domain from mailing that address again for
    `expiry` seconds (0: for good); submission refuses it at RCPT with 550 5.7.1."""

    enabled: bool = True
    expiry: float = 30 * 86400.0  # 0: never expires


@dataclass(frozen=True)
class WebhooksConfig:
    """Webhooks (docs/webhooks.md): each recipient's outcome POSTed, signed, to the HTTPS
    endpoints its sending domain subscribed (`mailrelay webhook add`), retried for a day."""

    enabled: bool = True
    timeout: float = 10.0  # seconds for one POST: connect, TLS, request and answer
    first_retry: float = 5.0  # the first retry's delay; later ones follow a fixed schedule
    # Whoever holds a manage key chooses the URL: without this, an endpoint that resolves to a
    # loopback, private, link-local or otherwise special address is refused, so that a key
    # cannot make the relay POST into the network it sits in.
    allow_private_addresses: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    listen: ListenAddress | None = ListenAddress("127.0.0.1", 9187)


@dataclass(frozen=True)
class ApiConfig:
    # The HTTP API (issue 15): loopback by default; anywhere else it speaks HTTPS only, with the
    # submission certificate. None: off.
    listen: ListenAddress | None = ListenAddress("127.0.0.1", 8025)

    @property
    def tls(self) -> bool:
        """Whether the listener needs TLS: every address but a loopback one."""
        if self.listen is None:
            return False
        try:
            return not ipaddress.ip_address(self.listen.host).is_loopback
        except ValueError:
            return self.listen.host.lower() != "localhost"


@dataclass(frozen=True)
class LogConfig:
    format: LogFormat = "kv"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class Config:
    hostname: str = field(default_factory=socket.getfqdn)
    # Development only: accept a hostname such as "localhost" that receivers would refuse in EHLO.
    allow_local_hostname: bool = False
    submission: SubmissionConfig = SubmissionConfig()
    storage: StorageConfig = StorageConfig()
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    instance: InstanceConfig = field(default_factory=InstanceConfig)
    dkim: DkimConfig = DkimConfig()
    records: RecordsConfig = RecordsConfig()
    limits: LimitsConfig = LimitsConfig()
    tlsrpt: TlsRptConfig = TlsRptConfig()
    suppression: SuppressionConfig = SuppressionConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    metrics: MetricsConfig = MetricsConfig()
    api: ApiConfig = ApiConfig()
    log: LogConfig = LogConfig()

    @property
    def spf_mechanisms(self) -> tuple[str, ...]:
        return self.records.spf_mechanisms or (f"a:{self.hostname}",)


def load(path: str | Path) -> Config:
    """Read the file at `path` and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse(raw, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def parse(raw: dict[str, Any], *, base_dir: Path) -> Config:
    """Build a Config from a parsed TOML table; relative paths are relative to `base_dir`."""
    top = _Table(raw, "")
    hostname = top.string("hostname", socket.getfqdn())
    if not _is_hostname(hostname):
        raise ConfigError(f"hostname: {hostname!r} is not a host name")
    allow_local_hostname = top.boolean("allow_local_hostname", False)

    sub_t = top.table("submission")
    defaults = SubmissionConfig()
    submission = SubmissionConfig(
        listen=tuple(_listen(k, v) for k, v in sub_t.strings("listen", ["0.0.0.0:587"])),
        implicit_tls_listen=tuple(
            _listen(k, v) for k, v in sub_t.strings("implicit_tls_listen", [])
        ),
        cert_file=_path(sub_t.string("cert_file", defaults.cert_file), base_dir),
        key_file=_path(sub_t.string("key_file", defaults.key_file), base_dir),
        self_signed_if_missing=sub_t.boolean("self_signed_if_missing", False),
        max_message_size=sub_t.integer("max_message_size", defaults.max_message_size, 1024),
        max_recipients=sub_t.integer("max_recipients", defaults.max_recipients, 1),
        allow_unverified_domains=sub_t.boolean("allow_unverified_domains", False),
        max_auth_failures=sub_t.integer("max_auth_failures", 3, 1),
        timeout_seconds=sub_t.duration("timeout", defaults.timeout_seconds),
    )
    sub_t.done()
    if not submission.listen and not submission.implicit_tls_listen:
        raise ConfigError("submission.listen: no listener; give at least one address")

    storage_t = top.table("storage")
    storage = StorageConfig(
        path=_path(storage_t.string("path", StorageConfig.path), base_dir),
        url=_storage_url(storage_t.string("url", StorageConfig.url)),
    )
    storage_t.done()

    del_t = top.table("delivery")
    d = DeliveryConfig()
    overrides: dict[str, DomainPolicy] = {}
    domains_t = del_t.table("domains")
    for name in list(domains_t.raw):
        one = domains_t.table(name)
        overrides[name.lower().rstrip(".")] = DomainPolicy(
            security_level=one.choice("security_level", SecurityLevel, None),
            cipher_profile=one.choice("cipher_profile", CipherProfile, None),
            insecure_action=one.choice("insecure_action", InsecureAction, None),
            honour_tls_required_no=one.boolean("honour_tls_required_no", False),
        )
        one.done()
    domains_t.done()
    nameservers = tuple(v for _k, v in del_t.strings("nameservers", []))
    for i, ns in enumerate(nameservers):
        _nameserver(f"delivery.nameservers[{i}]", ns)
    delivery = DeliveryConfig(
        port=del_t.integer("port", d.port, 1, 65535),
        nameservers=nameservers,
        security_level=del_t.choice("security_level", SecurityLevel, d.security_level),
        cipher_profile=del_t.choice("cipher_profile", CipherProfile, d.cipher_profile),
        ca_file=_path(del_t.string("ca_file", ""), base_dir),
        insecure_action=del_t.choice("insecure_action", InsecureAction, d.insecure_action),
        max_queue_lifetime=del_t.duration("max_queue_lifetime", d.max_queue_lifetime),
        workers=del_t.integer("workers", d.workers, 1, 1000),
        hold=del_t.boolean("hold", False),
        separate_process=del_t.boolean("separate_process", d.separate_process),
        connect_timeout=del_t.duration("connect_timeout", d.connect_timeout),
        command_timeout=del_t.duration("command_timeout", d.command_timeout),
        max_mx_hosts=del_t.integer("max_mx_hosts", d.max_mx_hosts, 1, 100),
        max_mx_addresses=del_t.integer("max_mx_addresses", d.max_mx_addresses, 1, 1000),
        attempt_deadline=del_t.duration("attempt_deadline", d.attempt_deadline),
        address_family=del_t.choice("address_family", AddressFamily, d.address_family),
        dns_timeout=del_t.duration("dns_timeout", d.dns_timeout),
        mta_sts_port=del_t.integer("mta_sts_port", d.mta_sts_port, 1, 65535),
        mta_sts_timeout=del_t.duration("mta_sts_timeout", d.mta_sts_timeout),
        poll_interval=del_t.duration("poll_interval", d.poll_interval),
        domains=overrides,
    )
    del_t.done()
    if delivery.ca_file and not Path(delivery.ca_file).is_file():
        raise ConfigError(f"delivery.ca_file: {delivery.ca_file!r} is not a readable file")

    inst_t = top.table("instance")
    instance = InstanceConfig(
        id=inst_t.string("id", socket.gethostname()),
        lease_margin=inst_t.duration("lease_margin", InstanceConfig.lease_margin),
    )
    inst_t.done()
    if not _INSTANCE_ID.fullmatch(instance.id):
        raise ConfigError(
            f"instance.id: {instance.id!r} is not 1-64 letters, digits and '.', '-', '_'"
        )

    dkim_t = top.table("dkim")
    dkim = DkimConfig(
        key_dir=_path(dkim_t.string("key_dir", DkimConfig.key_dir), base_dir),
        algorithm=dkim_t.choice("algorithm", DkimAlgorithm, "rsa"),
        rsa_bits=dkim_t.integer("rsa_bits", 2048, 1024, 4096),
        master_key_file=_path(dkim_t.string("master_key_file", ""), base_dir),
    )
    dkim_t.done()

    rec_t = top.table("records")
    records = RecordsConfig(
        spf_mechanisms=tuple(_spf(k, v) for k, v in rec_t.strings("spf_mechanisms", [])),
        dmarc_rua=rec_t.string("dmarc_rua", ""),
    )
    rec_t.done()

    lim_t = top.table("limits")
    lim = LimitsConfig()
    limits = LimitsConfig(
        max_connections=lim_t.integer("max_connections", lim.max_connections, 1, 1_000_000),
        max_connections_per_ip=lim_t.integer(
            "max_connections_per_ip", lim.max_connections_per_ip, 1, 1_000_000
        ),
        max_unauthenticated_per_ip=lim_t.integer(
            "max_unauthenticated_per_ip", lim.max_unauthenticated_per_ip, 1, 1_000_000
        ),
        pre_auth_timeout=lim_t.duration("pre_auth_timeout", lim.pre_auth_timeout),
        messages_per_minute=lim_t.integer("messages_per_minute", lim.messages_per_minute, 0),
        recipients_per_hour=lim_t.integer("recipients_per_hour", lim.recipients_per_hour, 0),
        recipients_per_day=lim_t.integer("recipients_per_day", lim.recipients_per_day, 0),
        auth_backoff_max=lim_t.duration("auth_backoff_max", lim.auth_backoff_max),
    )
    lim_t.done()
    if limits.max_unauthenticated_per_ip > limits.max_connections_per_ip:
        raise ConfigError(
            "limits.max_unauthenticated_per_ip: "
            f"{limits.max_unauthenticated_per_ip!r} is more than limits.max_connections_per_ip"
        )

    tlsrpt = _tlsrpt(top.table("tlsrpt"))

    sup_t = top.table("suppression")
    suppression = SuppressionConfig(
        enabled=sup_t.boolean("enabled", SuppressionConfig.enabled),
        expiry=sup_t.duration("expiry", SuppressionConfig.expiry, zero=True),
    )
    sup_t.done()

    hook_t = top.table("webhooks")
    webhooks = WebhooksConfig(
        enabled=hook_t.boolean("enabled", WebhooksConfig.enabled),
        timeout=hook_t.duration("timeout", WebhooksConfig.timeout),
        first_retry=hook_t.duration("first_retry", WebhooksConfig.first_retry),
        allow_private_addresses=hook_t.boolean(
            "allow_private_addresses", WebhooksConfig.allow_private_addresses
        ),
    )
    hook_t.done()

    met_t = top.table("metrics")
    metrics_listen = met_t.string("listen", "127.0.0.1:9187")
    metrics = MetricsConfig(
        listen=_listen("metrics.listen", metrics_listen) if metrics_listen else None
    )
    met_t.done()

    api_t = top.table("api")
    api_listen = api_t.string("listen", "127.0.0.1:8025")
    api = ApiConfig(listen=_listen("api.listen", api_listen) if api_listen else None)
    api_t.done()

    log_t = top.table("log")
    log = LogConfig(
        format=log_t.choice("format", LogFormat, "kv"),
        level=log_t.choice("level", Literal["debug", "info", "warning", "error"], "info"),
    )
    log_t.done()
    top.done()
    return Config(
        hostname=hostname,
        allow_local_hostname=allow_local_hostname,
        submission=submission,
        storage=storage,
        delivery=delivery,
        instance=instance,
        dkim=dkim,
        records=records,
        limits=limits,
        tlsrpt=tlsrpt,
        suppression=suppression,
        webhooks=webhooks,
        metrics=metrics,
        api=api,
        log=log,
    )


_HOSTNAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
# A plain ASCII address (RFC 5322 dot-atom), enough to refuse a display name or a second
# address in a header we write.
_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class _Table:
    """One TOML table being consumed; whatever is left over at `done()` is an unknown key."""

    def __init__(self, raw: Any, prefix: str) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{prefix.rstrip('.')}: expected a table, got {raw!r}")
        self.raw: dict[str, Any] = dict(raw)
        self.prefix = prefix
        self._seen: set[str] = set()

    def _take(self, key: str) -> Any:
        self._seen.add(key)
        return self.raw.get(key)

    def key(self, key: str) -> str:
        return f"{self.prefix}{key}" if "." not in key else f'{self.prefix}"{key}"'

    def table(self, key: str) -> _Table:
        value = self._take(key)
        return _Table({} if value is None else value, f"{self.key(key)}.")

    def string(self, key: str, default: str) -> str:
        value = self._take(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ConfigError(f"{self.key(key)}: expected a string, got {value!r}")
        return value

    def strings(self, key: str, default: list[str]) -> list[tuple[str, str]]:
        value = self._take(key)
        if value is None:
            value = default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key(key)}: expected a list of strings, got {value!r}")
        return [(f"{self.key(key)}[{i}]", v) for i, v in enumerate(value)]

    def boolean(self, key: str, default: bool) -> bool:
        value = self._take(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(key)}: expected true or false, got {value!r}")
        return value

    def integer(self, key: str, default: int, low: int, high: int | None = None) -> int:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.key(key)}: expected an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"from {low} to {high}"
            raise ConfigError(f"{self.key(key)}: {value!r} is out of range ({bounds})")
        return value

    def duration(self, key: str, default: float, *, zero: bool = False) -> float:
        """A number of seconds, or a string such as "90s", "5m", "5d" (`zero`: 0 allowed too)."""
        value = self._take(key)
        if value is None:
            return default
        seconds = parse_duration(value, zero=zero)
        if seconds is None:
            what = "a duration (0 or more, e.g." if zero else "a positive duration (e.g."
            raise ConfigError(f'{self.key(key)}: {value!r} is not {what} 30, "90s", "5m", "5d")')
        return seconds

    def choice(self, key: str, allowed: Any, default: Any) -> Any:
        value = self._take(key)
        if value is None:
            return default
        options = get_args(allowed)
        if value not in options:
            names = ", ".join(repr(o) for o in options)
            raise ConfigError(f"{self.key(key)}: {value!r} is not one of {names}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self._seen)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def parse_duration(value: object, *, zero: bool = False) -> float | None:
    """Seconds from a number or a string such as "90s", "5m", "30d" (no unit: seconds), or None
    if `value` is none of these. Positive only, unless `zero` lets 0 through (it means "never"
    where a key says so)."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds is None or seconds < 0 or (seconds == 0 and not zero) or seconds != seconds:
        return None
    return seconds


def _is_hostname(name: str) -> bool:
    # A last label of digits only is no host name (RFC 3696 §2): "256.0.0.1" is a bad address.
    last = name.rstrip(".").rpartition(".")[2]
    return bool(_HOSTNAME.fullmatch(name)) and not last.isdigit()


def _listen(key: str, value: str) -> ListenAddress:
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"{key}: {value!r} is not an address:port")
    if not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: {value!r} has a bad port (from 1 to 65535)")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if bracketed or not host or not _is_hostname(host):
            raise ConfigError(
                f"{key}: {value!r} has no valid host (an IP address or a host name)"
            ) from None
    else:
        if ip.version == 6 and not bracketed:
            raise ConfigError(f"{key}: {value!r}: write an IPv6 address as [{host}]:{port_text}")
    return ListenAddress(host, int(port_text))


def _nameserver(key: str, value: str) -> None:
    host, port = split_nameserver(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{key}: {value!r} is not an IP address (optionally with :port)"
        ) from None
    if not 0 < port <= 65535:
        raise ConfigError(f"{key}: {value!r} has a bad port")


def split_nameserver(value: str) -> tuple[str, int]:
    """'127.0.0.53' -> ('127.0.0.53', 53); '127.0.0.1:5353' and '[::1]:5353' carry a port."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else 53
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, int(port) if port.isdigit() else -1
    return value, 53


def _tlsrpt(t: _Table) -> TlsRptConfig:
    d = TlsRptConfig()
    result = TlsRptConfig(
        enabled=t.boolean("enabled", d.enabled),
        organization_name=t.string("organization_name", d.organization_name),
        contact_info=t.string("contact_info", d.contact_info),
        from_address=t.string("from_address", d.from_address),
        send_hour=t.integer("send_hour", d.send_hour, 0, 23),
        max_rua=t.integer("max_rua", d.max_rua, 1, 20),
        https_timeout=t.duration("https_timeout", d.https_timeout),
    )
    t.done()
    for key in ("organization_name", "contact_info"):
        value = getattr(result, key)
        # Both go into the report and contact_info's domain into a mail header: one line each.
        if any(not c.isprintable() for c in value):
            raise ConfigError(f"tlsrpt.{key}: {value!r} has a control character")
    address = result.from_address
    if address and not _ADDRESS.fullmatch(address):
        raise ConfigError(f"tlsrpt.from_address: {address!r} is not an address (local@domain)")
    return result


def _spf(key: str, value: str) -> str:
    if not re.fullmatch(r"(include|a|mx|ip4|ip6):\S+", value):
        raise ConfigError(f"{key}: {value!r} is not an include:, a:, mx:, ip4: or ip6: mechanism")
    return value


def _path(value: str, base_dir: Path) -> str:
    return str((base_dir / value).resolve()) if value else value


def _storage_url(url: str) -> str:
    """A libpq URL (postgresql://user@host:port/dbname, or ?host=/socket/directory), checked for
    its form; whether the server answers is for the start to find out. A password in the URL is
    never repeated in an error."""
    if not url:
        return ""
    parts = urllib.parse.urlsplit(url)
    shown = repr(redact_url(url))
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"storage.url: {shown} is not a postgresql:// URL")
    try:
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        raise ConfigError(f"storage.url: {shown} has a bad port") from None
    if not parts.hostname and not urllib.parse.parse_qs(parts.query).get("host"):
        raise ConfigError(f"storage.url: {shown} names no host (or ?host=/socket/directory)")
    if not parts.path.strip("/"):
        raise ConfigError(f"storage.url: {shown} names no database (postgresql://HOST/DBNAME)")
    return url


def redact_url(url: str) -> str:
    """`url` with its password, if any, replaced by ***: for errors and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
