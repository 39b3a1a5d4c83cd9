"""How a run hears that it should stop.

SIGTERM and SIGINT become a request to stop after the step (``StopOnSignals``); the parent of
``--devices N`` sends them on to its processes (``ForwardStopSignals``).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
"""Signals that stop a run after its step, with a checkpoint: preemption and ``kill`` (SIGTERM),
Ctrl-C and torch's parent-death signal to the processes of ``--devices N`` (SIGINT)."""


class StopOnSignals:
    """Turns SIGTERM and SIGINT into a request to stop after this step.

    The loop then saves a checkpoint and exits; ``--resume`` continues exactly (more signals
    while it does so change nothing: SIGKILL ends a run at once, without a checkpoint). Only
    installed in the main thread (signal handlers cannot be set elsewhere); installing replaces
    an inherited "ignore" (a background job's SIGINT), so that the processes of ``--devices N``
    take torch's parent-death SIGINT and never outlive the parent that started them.

    The kernel delivers a process-directed signal to any thread that does not block it, and a
    signal delivered to one of gloo's communication threads interrupts its socket calls and
    aborts the process ("terminate called without an active exception"). So, while installed,
    both signals are blocked in the main thread, and in every thread started from then on
    (threads inherit the mask), and one thread takes them with ``sigtimedwait``: no
    communication thread started during training can receive them (those of
    ``init_process_group`` block them too, see ``neco_loss.training.distributed``). Threads
    started earlier that leave them unblocked get the Python handler, which makes the same
    request.

    Attributes:
        requested: The name of the first signal received (``"SIGTERM"``), else ``None``.

    """

    WAIT_S = 0.2  # how often the waiting thread checks whether it should end

    def __init__(self) -> None:
        self.requested: str | None = None
        self.previous: dict[int, Any] = {}
        self._mask: set[int | signal.Signals] | None = None
        self._done = threading.Event()
        self._waiter: threading.Thread | None = None
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self.previous[number] = signal.signal(number, self._request)
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
            self._waiter = threading.Thread(target=self._wait, name="neco-signals", daemon=True)
            self._waiter.start()  # after the block: it inherits it, as sigtimedwait needs

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = self.requested or STOP_SIGNALS[signal.Signals(signum)]

    def _wait(self) -> None:
        while not self._done.is_set():
            info = signal.sigtimedwait(set(STOP_SIGNALS), self.WAIT_S)
            # After SIGSTOP / SIGCONT (a job scheduler's suspend and resume) the interrupted
            # wait can return garbage in si_signo: only a stop signal is a request.
            if info is not None and info.si_signo in STOP_SIGNALS:
                self._request(info.si_signo, None)

    def restore(self) -> None:
        """Stop waiting, unblock the signals and reinstall the previous handlers.

        A signal still pending is delivered on unblocking, to this object's handler.
        """
        if self._waiter is not None:
            self._done.set()
            self._waiter.join()
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        for number, previous in self.previous.items():
            signal.signal(number, previous)


def unblock_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM and SIGINT unblocked in a worker.

    Workers forked during training inherit ``StopOnSignals``'s blocked signals; unblocked,
    ``kill`` still ends them.
    """
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))


class ForwardStopSignals:
    """In the parent of ``--devices N``: SIGTERM or SIGINT to it is sent on to every process.

    Each process then stops after the same step with one checkpoint (``StopOnSignals``), and
    the parent reports their stop, so that signalling the parent (as a job scheduler or a
    shell does) saves the run like signalling a process does. Installed in the main thread
    only; a signal to the whole process group reaches the processes twice, which is harmless.

    Args:
        processes: The started processes (``multiprocessing.Process``).

    """

    def __init__(self, processes: list[Any]) -> None:
        self.processes = processes
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self.previous[number] = signal.signal(number, self._forward)

    def _forward(self, signum: int, frame: Any) -> None:
        for process in self.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def restore(self) -> None:
        """Reinstall the previous handlers."""
        for number, previous in self.previous.items():
            signal.signal(number, previous)
