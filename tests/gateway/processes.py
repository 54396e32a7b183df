"""Helpers for the tests of `pneumo serve`'s child processes (acceptors, workers) and `/ready`."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

from tests.gateway.serve_process import ServeProcess


def child_pids(parent: int) -> list[int]:
    """PIDs of *parent*'s live child processes."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True, check=False)
    return [int(pid) for pid in out.stdout.split()]


def alive(pid: int) -> bool:
    """True while *pid* runs (a zombie has exited: an init that does not reap leaves some)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_for(condition: Any, timeout: float, interval: float = 0.05) -> Any:
    """Poll *condition* until it returns something truthy (returned) or *timeout* passes (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    return None


def wait_gone(pids: list[int], timeout: float) -> bool:
    return bool(wait_for(lambda: not any(alive(pid) for pid in pids), timeout, 0.1))


def ready(server: ServeProcess) -> tuple[int, dict[str, Any]]:
    """``GET /ready``: the status code and the JSON body (503 included)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/ready", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
