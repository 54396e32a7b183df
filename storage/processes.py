"""Whether a process of this host still exists (stale job holders, stale wake-up registrations)."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """True when *pid* exists (also when it belongs to another user: we may not signal it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
