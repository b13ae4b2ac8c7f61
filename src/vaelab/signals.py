"""Ctrl-C and SIGTERM during training: turned into a flag the loop checks between steps, so a
step is never cut in half and the state saved is always one the run passed through."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def stop_on_signals():
    """Turn SIGINT/SIGTERM into a flag checked between steps, so a step is never cut in half.
    A second Ctrl-C interrupts at once."""
    flag = {"stop": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if flag.get("outlive_sigterm"):
            # Processes of a data-parallel job that agreed to stop: torchrun sends SIGTERM to the
            # others as soon as the first exits, which must not end process 0 before it has said
            # where it saved. The process is about to exit; nothing else waits on the signal.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
