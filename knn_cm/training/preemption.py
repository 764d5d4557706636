"""Graceful stops: a termination signal becomes a checkpoint at the end of the running step.

Clusters announce preemption and time limits with a signal shortly before killing a job (SLURM:
``--signal``; submitit: SIGUSR2, ``signal_delay_s`` ahead; ``scontrol requeue`` and torchrun's
shutdown: SIGTERM). Without a handler the work since the last periodic checkpoint is lost. With
:class:`PreemptionGuard` the trainer finishes its step, all ranks agree to stop, the checkpoint is
written, and then the signal's previous handler runs (submitit's requeue), or the process exits with
status 128 + signal number.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence


def parse_signal(name: str) -> signal.Signals:
    """``"SIGUSR1"`` or ``"USR1"`` -> signal.SIGUSR1; a ValueError names the allowed names otherwise."""
    key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    allowed = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")
    if key not in allowed or not hasattr(signal, key):
        raise ValueError(f"unknown or unsupported preemption signal {name!r}; allowed: {', '.join(allowed)}")
    return signal.Signals[key]


class PreemptionGuard:
    """Records termination signals while training runs (a context manager around the training loop).

    Handlers are installed on entry and the previous ones restored on exit. Signals the process ignores
    stay ignored, and in a thread other than the main one (where Python cannot install handlers) the
    guard does nothing.

    Args:
        signal_names: e.g. ``["SIGTERM", "SIGUSR1", "SIGUSR2"]``; empty disables the guard.
    """

    def __init__(self, signal_names: Sequence[str]):
        self.signals = [parse_signal(name) for name in signal_names]
        self.received: int | None = None
        self._previous: dict[int, Callable | int | None] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                if signal.getsignal(sig) is signal.SIG_IGN:  # ignored on purpose (e.g. nohup): keep it so
                    continue
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _record(self, signum: int, frame) -> None:
        # Only a flag (no I/O in a signal handler): the running step, possibly inside a collective,
        # must finish first.
        self.received = signum

    @property
    def received_name(self) -> str:
        """The received signal's name, or "a signal to another rank"."""
        return signal.Signals(self.received).name if self.received is not None else "a signal to another rank"

    def hand_over(self) -> None:
        """After the checkpoint: run the signal's previous handler, or exit with 128 + signal number.

        A Python handler (submitit's requeue on rank 0) runs as if it had received the signal. When it
        returns after SIGTERM (submitit only logs SIGTERM: SLURM sends it because the job is being requeued,
        preempted or cancelled), the process still exits with 128 + 15: ending normally would report the
        unfinished run as a successful result while SLURM runs the job again. After another signal (USR2 on a
        rank other than 0, where submitit leaves the requeue to rank 0) this method returns and the caller
        ends training normally.
        """
        signum = self.received
        previous = self._previous.get(signum)
        self.__exit__()
        if callable(previous):
            previous(signum, None)
            if signum != signal.SIGTERM:
                return
        raise SystemExit(128 + signum)
