"""Preemption: Kubernetes sends SIGTERM and waits a grace period before it kills a pod.

Training finishes the step it is in, saves a checkpoint, and exits with :data:`eupe.errors.EXIT_PREEMPTED`
(143, as a process killed by SIGTERM): the orchestrators retry it and the retry resumes from that checkpoint.
``result.json`` is not written. All ranks stop at the same step (the flag is all-reduced every step).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


class Preemption:
    """A context that turns SIGTERM into a request to stop after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            log.warning("SIGTERM: finishing this step, saving a checkpoint, then exiting (%d)", 143)
        self.requested = True

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
