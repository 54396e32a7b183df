"""Run ``pneumo serve`` as a real child process (for CLI, signal and crash tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

#: ``[inference]`` keys widening the age rule for the adult pydicom samples (tests/conftest.py,
#: ADULT_SAMPLE_RULES); pass ``inference_rules=""`` to test the shipped rules.
ADULT_SAMPLE_TOML = 'min_age_years = 0\nmax_age_years = 150\nunknown_age = "analyse"'


def _with_inference_rules(extra: str, rules: str) -> str:
    """*extra* with *rules* inside its ``[inference]`` table (added when it has none): a TOML
    table may be defined only once."""
    if not rules:
        return extra
    lines = extra.splitlines()
    if "[inference]" in (line.strip() for line in lines):
        at = [line.strip() for line in lines].index("[inference]") + 1
        return "\n".join([*lines[:at], rules, *lines[at:]])
    return "\n".join([extra, "[inference]", rules])


def write_config(
    path: Path,
    data_dir: Path,
    *,
    database_url: str | None = None,
    dicom_extra: str = "",
    extra: str = "",
    workers: bool = False,
    inference_rules: str = ADULT_SAMPLE_TOML,
) -> Path:
    lines = [
        f'data_dir = "{data_dir}"',
        *([f'database_url = "{database_url}"'] if database_url else []),
        "[dicom]",
        'ae_title = "PNEUMO"',
        'bind = "127.0.0.1"',
        "port = 0",
        dicom_extra,
        "[[dicom.peers]]",
        'ae_title = "STORESCU"',
        'host = "127.0.0.1"',
        "[[dicom.peers]]",
        'ae_title = "ECHOSCU"',
        'host = "127.0.0.1"',
        "[[dicom.peers]]",
        'ae_title = "TESTSCU"',
        'host = "127.0.0.1"',
        "[fhir]",
        "port = 0",
        "[hl7]",
        "port = 0",
        "[worker]",
        f"enabled = {'true' if workers else 'false'}",
        _with_inference_rules(extra, inference_rules),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class ServeProcess:
    """``pneumo serve`` in a child process; ``start`` returns once it printed its ready line."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.dicom_port = 0
        self.http_port = 0
        #: The ready line (ports, TLS modes) of the last start.
        self.ready: dict[str, Any] = {}

    def start(self, timeout: float = 60.0) -> ServeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "--config", str(self.config), "serve"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        ready: dict[str, Any] = {}
        done = threading.Event()

        def _read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if message.get("event") == "ready":
                    ready.update(message)
                    done.set()
            done.set()

        threading.Thread(target=_read, daemon=True).start()
        if not done.wait(timeout) or not ready:
            self.kill()
            raise RuntimeError(f"pneumo serve did not become ready; see {self.log_path}")
        self.dicom_port = int(ready["dicom_port"])
        self.http_port = int(ready["http_port"])
        self.ready = ready
        return self

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def pneumo(config: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
