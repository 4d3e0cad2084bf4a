"""The `mailrelay tlsrpt` commands: the TLS-RPT (RFC 8460) reports made, each one's JSON, and a
pass of the report task on demand."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING

from mailrelay.cli_output import UserError, open_existing_db, print_json, safe, when
from mailrelay.config import Config
from mailrelay.store import tlsrpt

if TYPE_CHECKING:
    from mailrelay.tlsrpt.reporter import Pass


def tlsrpt_list(cfg: Config, args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    reports = tlsrpt.list_reports(open_existing_db(cfg), limit=args.limit)
    if args.json:
        print_json(reports)
        return 0
    if not reports:
        print("no TLS reports" + ("" if cfg.tlsrpt.enabled else " (tlsrpt.enabled is false)"))
    for r in reports:
        print(f"{r['id']}  {r['day']}  {r['state']:<7}  {r['domain']}")
        for d in r["deliveries"]:  # type: ignore[attr-defined]
            detail = f" ({safe(d['detail'])})" if d["detail"] else ""
            queued = f" queue_id={d['message_id']}" if d["message_id"] else ""
            print(
                f"    {d['state']:<7} {safe(d['uri'])}, attempts {d['attempts']},"
                f" {when(d['updated_at'])}{queued}{detail}"
            )
    return 0


def tlsrpt_show(cfg: Config, args: argparse.Namespace) -> int:
    """The report exactly as sent, indented for reading (`--raw`: byte for byte as sent)."""
    report = tlsrpt.get_report(open_existing_db(cfg), args.id)
    if report is None:
        raise UserError(f"no TLS report {args.id}")
    if args.raw:
        sys.stdout.write(report + "\n")
    else:
        print(json.dumps(json.loads(report), indent=2))
    return 0


def tlsrpt_send_now(cfg: Config, args: argparse.Namespace) -> int:
    """Make every finished day's reports now (not waiting for send_hour) and send what is due.
    Mailed reports go into the queue, which the running service delivers."""
    if not cfg.tlsrpt.enabled:
        raise UserError("TLS reporting is off (set [tlsrpt] enabled = true)")
    open_existing_db(cfg).close()
    done = asyncio.run(_one_pass(cfg))
    print(
        f"{len(done.reports)} report(s) made; {done.queued} queued as mail, {done.sent} sent,"
        f" {done.failed} failed, {done.retrying} to retry"
    )
    return 0


async def _one_pass(cfg: Config) -> Pass:
    from mailrelay.metrics import Metrics  # only this command needs the report task
    from mailrelay.store import Store
    from mailrelay.tlsrpt.reporter import Reporter

    store = Store(cfg.storage.database)
    await store.start()
    try:
        # The service's queue runner notices the queued mail by itself (it polls the store).
        return await Reporter(cfg, store, Metrics(), asyncio.Event()).run_once(force=True)
    finally:
        await store.stop()
