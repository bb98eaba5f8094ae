"""Stop a long job cleanly when the cluster asks it to: SLURM preemption, the time limit, ``scancel``.

SLURM sends SIGTERM on preemption, at the time limit and on ``scancel`` (then SIGKILL after its KillWait, 30 s by
default); with ``#SBATCH --signal=USR1@120`` it also sends SIGUSR1 120 s before the limit. Inside
``stop_on_signals()`` such a signal is recorded instead of ending the process. The job's loop looks at the flag
between units of work (a training step, a batch of pairs), keeps what it has finished and raises ``Preempted``.
``libs.cli`` prints its message as one line and exits with ``PREEMPTED_EXIT`` (75, ``EX_TEMPFAIL`` of sysexits.h:
"try again later"), which ``scripts/slurm_train.sh`` answers with a requeue.

    with preemption.stop_on_signals() as stop:
        for batch in batches:
            work(batch)
            if stop.requested:
                save()
                raise preemption.Preempted(f'{stop.signal_name} after batch {i}: finished work kept; run again')
"""
import contextlib
import signal
import threading
from typing import Iterator, Optional, Sequence

PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A job stopped by a signal after keeping its finished work; the message says what was kept."""
    exit_code = PREEMPTED_EXIT


class StopFlag:
    """Set by the signal handler; read by the job between units of work."""

    def __init__(self):
        self.signal_name: Optional[str] = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = SIGNALS) -> Iterator[StopFlag]:
    """Record SIGTERM/SIGUSR1 in a flag while the block runs; the previous handlers come back afterwards.

    Python installs signal handlers in the main thread only; elsewhere the flag is never set and the signals keep
    their previous effect.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def record(signum, frame):
        flag.signal_name = signal.Signals(signum).name

    previous = {s: signal.signal(s, record) for s in signals}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
