"""Rate-limits Security Alerts about limit breaches, so an attack cannot flood the audit log.

A peer that breaks a limit (too many requests, too large a body or data set, too many
associations) is refused every time with its protocol's error, but recording every refusal would
hand the attacker a lever on the audit log and its hash chain: each record serialises on the chain
head (``audit.store``). PS3.15 A.5.3.11 asks for the *alert*, not one record per packet. So per
``(peer, kind)`` at most one Security Alert is written every ``interval`` seconds; the first
breach is recorded at once, and the next recorded alert says how many were refused since
("… 312 times in the last 60 s"). The same gate throttles the WARN log line.

The table of ``(peer, kind)`` keys is bounded (oldest forgotten first): spoofed source addresses
cannot grow it without limit, and a forgotten key only means its next breach is recorded at once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Breach:
    """What the caller should record now: *count* breaches of *kind* by *peer* since the last record
    (1 for the first), over *seconds* (0.0 for the first)."""

    peer: str
    kind: str
    count: int
    seconds: float

    def describe(self, what: str) -> str:
        """*what* plus, after the first, how often it happened since the last alert."""
        if self.count <= 1:
            return what
        return f"{what} ({self.count} times in the last {self.seconds:.0f} s)"


#: One Security Alert per (peer, kind) per minute at most, on every port.
ALERT_INTERVAL_SECONDS = 60.0


class AlertThrottle:
    """At most one :class:`Breach` per ``(peer, kind)`` every *interval* seconds; thread-safe."""

    def __init__(
        self, interval: float = ALERT_INTERVAL_SECONDS, *, max_keys: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if interval < 0:
            raise ValueError("interval must not be negative")
        self._interval = interval
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        #: (peer, kind) -> [time of the last record, breaches not yet recorded]
        self._seen: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def breach(self, peer: str, kind: str) -> Breach | None:
        """Count one breach; return the :class:`Breach` to record now, or None (suppressed)."""
        now = self._clock()
        key = (peer, kind)
        with self._lock:
            entry = self._seen.get(key)
            if entry is None:
                self._seen[key] = [now, 0.0]
                while len(self._seen) > self._max_keys:
                    self._seen.popitem(last=False)
                return Breach(peer, kind, 1, 0.0)
            self._seen.move_to_end(key)
            entry[1] += 1
            if now - entry[0] < self._interval:
                return None
            count, seconds = int(entry[1]), now - entry[0]
            entry[0], entry[1] = now, 0.0
            return Breach(peer, kind, count, seconds)
