"""The API fuzzed from its own OpenAPI document (issue 15) with schemathesis: a real service on
loopback, requests made from the document's schemas with a valid key, a bounded number of
examples per operation. Every answer must be a non-5xx one whose status, headers and body
the document declares."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation
from schemathesis import Case as AnyCase
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from tests.conftest import RelayFactory
from tests.test_api import start_api

# Examples per operation: enough to reach the send path's branches (JSON and message/rfc822,
# optional fields, the Idempotency-Key), few enough that the test stays within seconds.
EXAMPLES = 20
Case = AnyCase[Any]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@schemathesis.serializer("message/rfc822")
def _rfc822(ctx: schemathesis.SerializationContext, value: object) -> bytes:
    # The document says only "binary": whatever was drawn, as bytes.
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")


def fuzz(url: str, token: str, paths: tuple[str, ...]) -> list[str]:
    """Each operation under `paths`: the failures found (empty if none). Blocking: it runs in a
    worker thread while the service answers on the test's event loop."""
    schema = schemathesis.openapi.from_url(f"{url}/v1/openapi.json")
    failures: list[str] = []
    tested: list[APIOperation[Any, Any, Any, Any]] = []
    for found in schema.get_all_operations():
        # An operation the document describes wrongly is a failure of its own.
        assert isinstance(found, Ok), found
        if found.ok().path.startswith(paths):
            tested.append(found.ok())
    assert tested, "no operation to fuzz"
    for operation in tested:
        variants = [("", operation.as_strategy())]
        if operation.method.lower() == "post" and operation.path.startswith("/v1/messages"):
            # A random From: is refused before anything else; these cases get addresses the
            # key may use, so that building, checking, signing and committing are fuzzed too.
            variants.append((" (the key's sender)", variants[0][1].map(_from_the_keys_domain)))
        if operation.method.lower() == "post" and operation.path == "/v1/messages":
            raw = operation.as_strategy(media_type="message/rfc822")
            variants.append((" (rfc822)", raw))
            variants.append((" (rfc822 from the key's sender)", raw.map(_a_message_of_the_keys)))
        for label, strategy in variants:
            failures.extend(_run(operation.method, operation.path + label, strategy, url, token))
    return failures


def _run(
    method: str, label: str, strategy: st.SearchStrategy[Case], url: str, token: str
) -> list[str]:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Case) -> None:
        case.call_and_validate(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS
        )

    try:
        run()
    except Exception as exc:  # every failure is reported, with its operation
        return [f"{method.upper()} {label}: {exc}"]
    return []


def _a_message_of_the_keys(case: Case) -> Case:
    if case.media_type != "message/rfc822":
        return case
    drawn = case.body if isinstance(case.body, bytes) else str(case.body).encode()
    subject, _, text = drawn.partition(b"\n")
    case.body = (
        b"From: alice@example.org\r\nTo: r0@example.net\r\nSubject: " + subject + b"\r\n\r\n" + text
    )
    return case


def _from_the_keys_domain(case: Case) -> Case:
    body = case.body
    messages: list[Any] = []
    if isinstance(body, dict):
        items = body.get("messages")
        messages = [body, *(items if isinstance(items, list) else [])]
    for message in messages:
        if isinstance(message, dict):
            message["from"] = "alice@example.org"
            for name in ("to", "cc", "bcc", "reply_to"):
                if isinstance(message.get(name), list):
                    message[name] = [f"r{i}@example.net" for i, _ in enumerate(message[name][:2])]
    return case


async def test_the_api_answers_only_what_its_document_says(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    api = await start_api(tmp_path, relay_factory)
    failures = await asyncio.to_thread(fuzz, api.url, api.token, ("/v1/",))
    assert failures == []
