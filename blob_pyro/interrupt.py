"""Stop a training loop cleanly on SIGTERM / SIGINT: finish the current step, checkpoint, exit.

Inside ``with stop_on_signals() as stop:`` the first SIGTERM or SIGINT only records itself in
``stop.signum``; the loop checks it after each step, writes a checkpoint and raises :class:`Interrupted`.
The previous handlers come back at once, so a second signal acts as usual (Ctrl-C twice aborts).
Outside the main thread (where Python cannot install handlers) nothing is installed.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

__all__ = ["StopRequest", "stop_on_signals", "Interrupted", "SIGNALS"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """``signum``: the first signal received inside the block, or ``None``."""

    def __init__(self):
        self.signum: Optional[int] = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


class Interrupted(SystemExit):
    """Raised after the checkpoint is written; exit status 128 + signal number (the shell convention)."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    def record(signum, frame) -> None:
        request.signum = signum
        restore()  # a second signal is not deferred

    for s in SIGNALS:
        signal.signal(s, record)
    try:
        yield request
    finally:
        restore()
