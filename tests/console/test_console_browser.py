"""The operator console (/console) in headless Chromium against a real ``pneumo serve``.

An operator signs in (development sign-in), finds the study DCMTK storescu sent by its Study
Instance UID, opens it (result label, per-image results, the summary image actually decoded by
the browser), retries a dead-lettered report in the outbox, finds that retry in the audit log
under their own name and verifies the audit chain from the page. Every page is screenshotted to
docs/images/console/ and checked with axe-core (WCAG 2.1 A/AA: no serious or critical violation).
A read-only user sees no Retry button, and the server refuses a POST without the CSRF token.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import expect

from tests.console.conftest import ConsoleGateway, axe_check, new_context, screenshot
from tests.gateway.serve_process import pneumo

OPERATOR = "Olivia Operator"
READER = "Rita Reader"
#: A dead letter's button ("Retry", or "Retry delivery 12" by its accessible name).
RETRY = re.compile(r"^Retry\b")
#: `pneumo studies` label -> the words the console shows.
LABEL_TEXT = {"PNEUMONIA": "positive", "NORMAL": "negative"}


class PageProblems:
    """What went wrong in the browser while the pages loaded: script errors and same-origin
    requests that failed or were answered >= 400 (a stylesheet or image the console forgot)."""

    def __init__(self, page: Any, base_url: str) -> None:
        self.base_url = base_url
        self.items: list[str] = []
        page.on("pageerror", lambda error: self.items.append(f"script error on {page.url}: {error}"))
        page.on("requestfailed", lambda request: self._failed(request))
        page.on("response", lambda response: self._response(response))

    def _failed(self, request: Any) -> None:
        if request.url.startswith(self.base_url):
            self.items.append(f"request failed: {request.method} {request.url} ({request.failure})")

    def _response(self, response: Any) -> None:
        request = response.request
        # Documents are checked by the test itself (the forged POST's 403 is expected).
        if response.url.startswith(self.base_url) and response.status >= 400 and request.resource_type != "document":
            self.items.append(f"{response.status} for {request.resource_type} {response.url}")


@pytest.fixture
def context(browser: Any, console_gateway: ConsoleGateway) -> Iterator[Any]:
    opened = new_context(browser, console_gateway.base_url)
    yield opened
    opened.close()


def sign_in(page: Any, name: str, role: str) -> None:
    page.goto("/console/login")
    page.get_by_label("Name").fill(name)
    page.get_by_label("Role").select_option(role)
    page.get_by_role("button", name="Sign in").click()
    try:
        page.wait_for_url(re.compile(r"/console/$"), timeout=10_000)
        return
    except PlaywrightTimeoutError:
        pass
    main = page.locator("main").inner_text() if page.locator("main").count() else page.content()
    pytest.fail(f"signing in as {name!r} ({role}) did not reach /console/ (at {page.url}):\n{main[:800]}", pytrace=False)


def heading1(page: Any, name: str | re.Pattern[str]) -> Any:
    return page.get_by_role("heading", level=1, name=name)


def check_page(page: Any, name: str) -> None:
    """Screenshot (docs/images/console/<name>.png) and axe-check the page as it is now."""
    screenshot(page, name)
    axe_check(page)


def attempts_at(gateway: ConsoleGateway, job_id: int) -> int:
    """Attempts ever made at delivery *job_id* (its attempt history: a retry resets the job's own count)."""
    shown = pneumo(gateway.config, "deliveries", "show", str(job_id))
    assert shown.returncode == 0, shown.stderr
    return len(json.loads(shown.stdout)["attempt_history"])


def all_attempts(gateway: ConsoleGateway) -> int:
    return sum(attempts_at(gateway, int(d["id"])) for d in gateway.dead_letters)


def test_operator_finds_study_retries_dead_letter_and_verifies_chain(context: Any, console_gateway: ConsoleGateway) -> None:
    gateway = console_gateway
    uid = gateway.study_uid
    page = context.new_page()
    problems = PageProblems(page, gateway.base_url)

    # Sign in (development sign-in: name and role, loopback only).
    page.goto("/console/login")
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    check_page(page, "login")
    sign_in(page, OPERATOR, "operate")
    expect(heading1(page, "Overview")).to_be_visible()
    check_page(page, "overview")

    # Studies: find the study by its Study Instance UID with the search form.
    page.goto("/console/studies")
    expect(heading1(page, "Studies")).to_be_visible()
    page.get_by_label("Patient ID, accession or Study UID").fill(uid)
    page.get_by_role("button", name="Search").click()
    study_link = page.locator(f'a[href$="/console/studies/{uid}"]')
    expect(study_link.first).to_be_visible()
    check_page(page, "studies")

    # The study: its result, per-image results, the summary image, the report links, the audit trail.
    study_link.first.click()
    page.wait_for_url(re.compile(rf"/console/studies/{re.escape(uid)}$"))
    expect(heading1(page, re.compile(r"^\s*Study"))).to_be_visible()
    result = page.get_by_role("heading", name="Result", exact=True).locator("xpath=ancestor::section[1]")
    expect(result).to_contain_text(LABEL_TEXT.get(str(gateway.study["label"]), "not analysed"))
    images = page.get_by_role("heading", name="Images", exact=True).locator("xpath=following::table[1]")
    expect(images.locator("tbody tr")).to_have_count(int(gateway.study["images"]))
    summary = page.get_by_role("img", name=re.compile(r"^Summary image"))
    expect(summary).to_be_visible()
    assert (summary.get_attribute("src") or "").endswith(f"/console/studies/{uid}/summary.png")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=summary.element_handle(), timeout=15_000)
    download_sr = page.get_by_role("link", name="Download SR")
    expect(download_sr).to_be_visible()
    sr = context.request.get(download_sr.get_attribute("href"))
    assert sr.status == 200 and sr.body()[128:132] == b"DICM", (sr.status, sr.headers)
    expect(page.get_by_role("link", name="FHIR DiagnosticReport")).to_be_visible()
    expect(page.get_by_role("heading", name="Audit trail")).to_be_visible()
    check_page(page, "study")

    # Outbox: the dead letters, one retried.
    page.goto("/console/outbox?state=failed")
    expect(heading1(page, "Outbox")).to_be_visible()
    retry = page.get_by_role("button", name=RETRY)
    expect(retry).to_have_count(len(gateway.dead_letters))
    check_page(page, "outbox-failed")
    action = page.locator("form", has=retry.first).first.get_attribute("action") or ""
    job_id = int(re.findall(r"\d+", action)[-1])  # the delivery this Retry re-queues
    assert job_id in {int(d["id"]) for d in gateway.dead_letters}, (action, gateway.dead_letters)
    retry.first.click()
    expect(page.get_by_role("status")).to_contain_text(re.compile(r"retr|re-?queued", re.IGNORECASE))
    check_page(page, "outbox")
    # The retry reached the delivery worker: a second attempt at the (still closed) PACS port.
    deadline = time.monotonic() + 30
    while attempts_at(gateway, job_id) < 2:
        assert time.monotonic() < deadline, f"delivery {job_id} was not attempted again after the retry"
        time.sleep(0.2)

    # Audit log: the retry, an operator action under the operator's name; the chain verified from the page.
    page.goto("/console/audit")
    expect(heading1(page, "Audit log")).to_be_visible()
    # The retry: an operator action (re-queued deliveries) under the operator's name, not just their sign-in.
    retried = page.locator("tr").filter(has_text=OPERATOR).filter(has_text=re.compile(r"re-?queued", re.IGNORECASE))
    expect(retried.first).to_be_visible()
    export = page.get_by_role("link", name=re.compile(r"^Export")).or_(page.get_by_role("button", name=re.compile(r"^Export")))
    expect(export.first).to_be_visible()
    page.get_by_role("button", name="Verify chain").click()
    expect(page.get_by_role("status")).to_contain_text("Chain intact")
    check_page(page, "audit")

    page.goto("/console/model")
    expect(heading1(page, "Model")).to_be_visible()
    check_page(page, "model")

    # Sign out: the session is gone.
    page.get_by_role("button", name="Sign out").click()
    response = page.goto("/console/studies")
    assert "/console/login" in page.url or (response is not None and response.status in (401, 403)), page.url
    assert problems.items == []


def test_read_only_user_cannot_retry_and_forged_post_is_refused(browser: Any, console_gateway: ConsoleGateway) -> None:
    gateway = console_gateway
    operator = new_context(browser, gateway.base_url)
    reader = new_context(browser, gateway.base_url)
    try:
        # The retry form as an operator sees it: where it posts, and its CSRF token field.
        op_page = operator.new_page()
        sign_in(op_page, OPERATOR, "operate")
        op_page.goto("/console/outbox?state=failed")
        form = op_page.locator("form", has=op_page.get_by_role("button", name=RETRY)).first
        expect(form).to_be_attached()
        action = form.get_attribute("action") or "/console/outbox?state=failed"
        assert (form.get_attribute("method") or "").lower() == "post"
        fields = {
            str(el.get_attribute("name")): str(el.get_attribute("value") or "")
            for el in form.locator("input[type=hidden][name]").all()
        }
        token_fields = [name for name in fields if "csrf" in name.lower()]
        assert token_fields, f"the retry form carries no CSRF token field: {fields}"
        attempts_before = all_attempts(gateway)

        # A forged POST from the operator's own session, without the token: refused.
        forged = {k: v for k, v in fields.items() if k not in token_fields}
        refused = operator.request.post(action, form=forged, max_redirects=0)
        assert refused.status == 403, (refused.status, refused.text()[:500])

        # The read-only user: sees the dead letters but no Retry button; a retry POST is refused.
        page = reader.new_page()
        problems = PageProblems(page, gateway.base_url)
        sign_in(page, READER, "read")
        page.goto("/console/outbox?state=failed")
        expect(heading1(page, "Outbox")).to_be_visible()
        expect(page.get_by_role("button", name=RETRY)).to_have_count(0)
        check_page(page, "outbox-read-only")
        expect(page.locator("tbody tr").filter(has_text="dead letter")).to_have_count(len(gateway.dead_letters))
        reader_tokens = {
            str(el.get_attribute("name")): str(el.get_attribute("value") or "")
            for el in page.locator("form input[type=hidden][name]").all()
            if "csrf" in str(el.get_attribute("name")).lower()
        }
        for posted in ({**forged}, {**forged, **reader_tokens}):  # without a token, and with the reader's own
            answer = reader.request.post(action, form=posted, max_redirects=0)
            assert answer.status == 403, (posted.keys(), answer.status, answer.text()[:500])
        assert problems.items == []

        # Nothing was retried by any of it.
        time.sleep(1.0)
        assert all_attempts(gateway) == attempts_before
    finally:
        operator.close()
        reader.close()
