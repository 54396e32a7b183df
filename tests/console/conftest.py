"""The operator console in a real browser: Debian's headless Chromium driven by Playwright for
Python, axe-core for accessibility, and a real ``pneumo serve`` child process behind it.

Everything here comes from ``make test``: ``chromium`` from ``make system-deps`` (APT_PACKAGES),
Playwright for Python from the ``test`` extra (launched with ``executable_path``, so no
``playwright install`` and no downloaded browser), axe-core from ``make console-deps``
(tests/console/axe/package-lock.json). A missing piece fails the tests; it never skips them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from inference.manifest import BUNDLED_MODEL_DIR
from tests.conftest import copy_with_new_uids, dcmtk, sample
from tests.dicom_peers import free_port
from tests.gateway.serve_process import ServeProcess, pneumo, write_config

#: Debian's ``chromium`` package; PNEUMO_TEST_CHROMIUM points elsewhere (another distribution's build).
CHROMIUM = Path(os.environ.get("PNEUMO_TEST_CHROMIUM", "/usr/bin/chromium"))
#: axe-core pinned by tests/console/axe/package-lock.json, installed by ``make console-deps``.
AXE_JS = Path(__file__).parent / "axe" / "node_modules" / "axe-core" / "axe.min.js"
#: Full-page screenshots of each console page, rewritten on every run (the README shows one).
SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / "docs" / "images" / "console"
#: The WCAG 2.1 A and AA rules; violations of these rated "serious" or "critical" fail a page.
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
FAILING_IMPACTS = {"serious", "critical"}

#: The chest radiograph sent over DICOM (the same pydicom-data sample as tests/gateway/test_end_to_end.py).
RADIOGRAPH = "RG1_UNCR.dcm"
#: A study's result and both its reports (SR and summary-image SC) dead-lettered: first run ~10 s.
READY_TIMEOUT_S = 120.0


# ------------------------------------------------------------------------------------ browser


@pytest.fixture(scope="session")
def playwright() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        pytest.fail(f"Playwright for Python is not installed ({exc}): run `make install-test`", pytrace=False)
    manager = sync_playwright().start()
    yield manager
    manager.stop()


@pytest.fixture(scope="session")
def browser(playwright: Any) -> Iterator[Any]:
    """Headless Chromium from Debian's package (never a browser Playwright downloaded)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: the console tests need Debian's chromium (`make system-deps`)", pytrace=False)
    # --no-sandbox: the tests (and CI) run as root, where Chromium's sandbox refuses to start.
    launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
    yield launched
    launched.close()


def new_context(browser: Any, base_url: str) -> Any:
    """A fresh browser profile (own cookies) on *base_url*. ``bypass_csp``: the console's strict
    Content-Security-Policy would refuse the injected axe-core script; the pages' own behaviour
    under that policy is what the console's HTTP tests check."""
    context = browser.new_context(base_url=base_url, bypass_csp=True, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    return context


# ------------------------------------------------------------------------- axe and screenshots


def _describe(violation: dict[str, Any]) -> str:
    nodes = violation.get("nodes", [])
    lines = [f"- {violation['id']} ({violation.get('impact')}): {violation.get('help')} [{violation.get('helpUrl')}]"]
    for node in nodes[:5]:
        summary = " ".join((node.get("failureSummary") or "").split())
        lines.append(f"    at {', '.join(map(str, node.get('target', [])))}: {summary}")
    if len(nodes) > 5:
        lines.append(f"    ... and {len(nodes) - 5} more elements")
    return "\n".join(lines)


def axe_check(page: Any) -> list[dict[str, Any]]:
    """Run axe-core's WCAG 2.1 A/AA rules on *page*; fail on any "serious" or "critical" violation.

    Returns every violation (the milder ones too) for a test that wants to look closer."""
    if not AXE_JS.is_file():
        pytest.fail(f"{AXE_JS} not found: run `make console-deps` (npm ci in tests/console/axe)", pytrace=False)
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(AXE_JS))
    results = page.evaluate(
        "async (tags) => { const r = await axe.run(document, {runOnly: {type: 'tag', values: tags}});"
        " return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help, helpUrl: v.helpUrl,"
        " nodes: v.nodes.map(n => ({target: n.target, failureSummary: n.failureSummary}))})); }",
        AXE_TAGS,
    )
    violations: list[dict[str, Any]] = list(results)
    failing = [v for v in violations if v.get("impact") in FAILING_IMPACTS]
    if failing:
        pytest.fail(
            f"axe-core: {len(failing)} serious/critical accessibility violation(s) on {page.url}:\n"
            + "\n".join(_describe(v) for v in failing),
            pytrace=False,
        )
    return violations


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page PNG of *page* as docs/images/console/<name>.png (overwritten each run)."""
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOT_DIR / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture(name="axe_check")
def axe_check_fixture() -> Callable[[Any], list[dict[str, Any]]]:
    return axe_check


@pytest.fixture(name="screenshot")
def screenshot_fixture() -> Callable[[Any, str], Path]:
    return screenshot


# ---------------------------------------------------------------------------- the gateway


@dataclass
class ConsoleGateway:
    """A running ``pneumo serve`` with one analysed study whose two reports are dead letters."""

    server: ServeProcess
    config: Path
    base_url: str
    study_uid: str
    #: ``pneumo studies --json`` row of the study (label, probability, status).
    study: dict[str, Any]
    #: ``pneumo deliveries list --state failed --json`` rows when the gateway was ready.
    dead_letters: list[dict[str, Any]]


def _json_lines(config: Path, *args: str) -> list[dict[str, Any]]:
    listed = pneumo(config, *args, "--json")
    assert listed.returncode == 0, listed.stderr
    return [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]


def _wait(condition: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; see {log}")
        time.sleep(0.2)


def _storescu(port: int, files: list[Path]) -> None:
    sent = subprocess.run(
        [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert sent.returncode == 0, sent.stderr


def _model_dir(tmp: Path) -> Path:
    """The bundled model when it has been exported, else the small contract test model."""
    if (BUNDLED_MODEL_DIR / "model.json").is_file():
        return BUNDLED_MODEL_DIR
    from tests.inference.tiny_model import write_model_dir

    return write_model_dir(tmp / "model")


def console_config(tmp: Path, closed_port: int) -> Path:
    extra = [
        # [worker] (write_config opened it): one worker process with one inference thread.
        "processes = 1",
        "threads = 1",
        "poll_interval = 0.1",
        "[delivery]",
        "max_attempts = 1",  # the first refused connection dead-letters the report
        "timeout_seconds = 5",
        "backoff_base_seconds = 0.2",
        "backoff_cap_seconds = 1.0",
        "[inference]",
        f'model_dir = "{_model_dir(tmp)}"',
        "[results]",
        "study_stable_seconds = 0.5",
        "[console]",
        "dev_login = true",
        # The results' DICOM destination: nothing listens there, so both reports become dead letters.
        "[[dicom.destinations]]",
        'name = "pacs"',
        'ae_title = "PACS"',
        'host = "127.0.0.1"',
        f"port = {closed_port}",
    ]
    return write_config(tmp / "pneumo.toml", tmp / "var", workers=True, extra="\n".join(extra))


@pytest.fixture(scope="module")
def console_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleGateway]:
    """``pneumo serve`` (console with the development sign-in, workers analysing) that received one
    chest radiograph over DICOM from DCMTK storescu; returns once the study has its result and the
    reports sent to the unreachable PACS are dead letters."""
    tmp = tmp_path_factory.mktemp("console")
    config = console_config(tmp, free_port())
    log = tmp / "serve.log"
    server = ServeProcess(config, log).start()
    try:
        chest = copy_with_new_uids(sample(RADIOGRAPH), tmp / "in")
        study_uid = str(pydicom.dcmread(chest, stop_before_pixels=True).StudyInstanceUID)
        _storescu(server.dicom_port, [chest])

        def study_final() -> bool:
            return any(s["study_instance_uid"] == study_uid and s["status"] == "final" for s in _json_lines(config, "studies"))

        def reports_dead() -> bool:  # the SR and the summary image's SC, each tried once
            rows = _json_lines(config, "deliveries", "list", "--channel", "dicom")
            return len(rows) >= 2 and all(r["state"] == "failed" for r in rows)

        _wait(study_final, READY_TIMEOUT_S, "the study result", log)
        _wait(reports_dead, READY_TIMEOUT_S, "both reports dead-lettered", log)
        [study] = [s for s in _json_lines(config, "studies") if s["study_instance_uid"] == study_uid]
        dead = _json_lines(config, "deliveries", "list", "--state", "failed")
        yield ConsoleGateway(server, config, f"http://127.0.0.1:{server.http_port}", study_uid, study, dead)
    finally:
        try:
            server.terminate(timeout=30)
        except Exception:  # noqa: BLE001 - a hung shutdown must not hide the test's own failure
            server.kill()
