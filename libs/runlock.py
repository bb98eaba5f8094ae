"""One job at a time per output folder (a training run, an evaluation, a feature cache).

    @runlock.scope
    def train(config):
        ...
        runlock.take(run_dir, 'training run')   # held until train() returns or raises

``take`` locks ``<folder>/.lock`` with filelock's OS lock (flock), which the OS releases when the holder dies however
it dies, so the lock of a killed run is taken over by the next one (``.lock.json``, the holder's pid, host, start time
and command, is then stale and replaced; the takeover is logged). A second job is refused with a UserError naming the
holder. In a multi-process (accelerate) run the main process takes the lock and every process learns the outcome, so
all of them stop together when it is refused.
"""
import contextlib
import contextvars
import functools
import json
import logging
import os
import socket
import sys
import time

from libs.errors import UserError

logger = logging.getLogger(__name__)

LOCK, HOLDER = '.lock', '.lock.json'
_scopes = contextvars.ContextVar('runlock_scopes', default=None)


def scope(fn):
    """Decorator: locks taken (``take``) while fn runs are released when it returns or raises."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            token = _scopes.set(stack)
            try:
                return fn(*args, **kwargs)
            finally:
                _scopes.reset(token)
    return wrapper


def read_holder(folder: str) -> dict:
    """The holder record of a folder's lock ({} if none or unreadable)."""
    try:
        with open(os.path.join(folder, HOLDER), encoding='utf-8') as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict) -> str:
    """'pid 123 on host h, started <time> (<command>)' for a holder record."""
    if not holder:
        return 'a process that has not recorded itself yet'
    return (f'pid {holder.get("pid")} on host {holder.get("host")}, started {holder.get("started")} '
            f'({holder.get("command")})')


def _acquire(folder: str, what: str):
    """(lock, None) when this process got the folder's lock, else (None, why not)."""
    import filelock

    from libs.cli import describe_os_error
    from libs.io import atomic_write_json
    try:
        os.makedirs(folder, exist_ok=True)
        lock = filelock.FileLock(os.path.join(folder, LOCK))
        lock.acquire(blocking=False)
    except filelock.Timeout:
        return None, (f'{folder} is in use by another {what}: {describe(read_holder(folder))}. Wait for it to finish '
                      'or stop it, or choose another folder (the lock of a process that died is taken over)')
    except OSError as err:
        return None, f'cannot lock {folder} for this {what}: {describe_os_error(err) or err}'
    previous = read_holder(folder)
    if previous:
        logger.warning('%s: taking over the lock of %s, which is no longer running', folder, describe(previous))
    try:
        atomic_write_json(os.path.join(folder, HOLDER), dict(
            pid=os.getpid(), host=socket.gethostname(), started=time.strftime('%Y-%m-%d %H:%M:%S %z'),
            command=' '.join(sys.argv), what=what))
    except OSError as err:
        lock.release()
        return None, f'cannot lock {folder} for this {what}: {describe_os_error(err) or err}'
    return lock, None


@contextlib.contextmanager
def hold(folder: str, what: str):
    """Hold the folder's lock for the block: taken by the main process, its outcome shared with every process."""
    from accelerate import PartialState
    state = PartialState()
    lock, refusal = _acquire(folder, what) if state.is_main_process else (None, None)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise UserError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, HOLDER))
            lock.release()


def take(folder: str, what: str) -> None:
    """Lock ``folder`` until the enclosing ``@scope`` function returns (see ``hold``); a held lock is a UserError."""
    stack = _scopes.get()
    if stack is None:
        raise RuntimeError('runlock.take() must be called inside a function decorated with @runlock.scope')
    stack.enter_context(hold(folder, what))
