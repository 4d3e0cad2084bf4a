"""The bounce for recipients that failed: an RFC 3464 DSN to the envelope sender, with a copy to
the sending domain's notification address, queued like any other message."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from mailrelay.config import Config
from mailrelay.delivery.dsn import RecipientStatus, build_dsn
from mailrelay.delivery.result import Insecure
from mailrelay.store.claims import Job, RecipientUpdate
from mailrelay.store.queue import NewMessage


def header_section(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def bounce_for(
    config: Config,
    job: Job,
    bounced: list[RecipientUpdate],
    notify: str | None,
    insecure: Mapping[int, Insecure] | None = None,
) -> NewMessage | None:
    """None when no DSN is due: a bounce is never bounced (RFC 3464 §2.2.1 null sender).

    `insecure` maps the recipient ids that bounced because no MX met the transport policy to
    the reason, so the bounce can say so rather than guess from the status code."""
    insecure = insecure or {}
    if job.is_bounce or not bounced:
        return None
    to = [a for a in dict.fromkeys([job.sender, notify or ""]) if a]
    if not to:
        return None
    statuses = []
    for o in bounced:
        last = o.evidence[-1] if o.evidence else None
        statuses.append(
            RecipientStatus(
                final_recipient=o.address,
                action="failed",
                status=o.status,
                diagnostic_code=o.diagnostic,
                remote_mta=last.mx_host if last else None,
                last_attempt_date=dt.datetime.fromtimestamp(
                    last.at if last else job.created_at, dt.UTC
                ),
                insecure=insecure.get(o.recipient_id),
            )
        )
    data = build_dsn(
        reporting_mta=config.hostname,
        original_envelope_from=job.sender,
        original_headers=header_section(job.data),
        recipients=statuses,
        arrival_date=dt.datetime.fromtimestamp(job.created_at, dt.UTC),
        to=to,
        message_id_domain=config.hostname,
    )
    return NewMessage(
        sender="",
        recipients=tuple(to),
        data=data,
        auth_user=None,
        client_ip=None,
        sender_domain=job.sender_domain,
        is_bounce=True,
        # RFC 8689 §5: the bounce quotes the message's headers, so it is held to REQUIRETLS too.
        requiretls=job.requiretls,
    )
