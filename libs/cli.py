"""One error path for every command-line entry point.

    if __name__ == '__main__':
        define_flags()
        cli.run(main)                    # every entry point: absl flags, then main

A user error — a bad flag or config value, an unknown config key, a config file that is missing or raises, a
``UserError``, or an OS error the user can fix (full disk, read-only or unwritable folder, a file where a folder
should be, a missing file) — prints one line on stderr (``error: <what, where, how to fix>``), followed by the
``details`` lines of a UserError that carries some (one missing file per line, each with a command to copy), and exits
with code 2 (``UserError.exit_code``: train_empath.py's diverged run exits 3). Ctrl-C exits 130 without a traceback.
A job stopped by SIGTERM/SIGUSR1 after keeping its work (``libs.preemption.Preempted``) prints ``stopped: ...`` and
exits 75. Anything else is a bug in the code and keeps its traceback.

absl's own parser exits 1 on a flag error; ``parse_flags`` raises ``UserError`` instead. absl also exits 1 after
printing the help a user asked for (``--help``, ``-h``, ``--helpfull``...); ``run`` exits 0 then. Under
``accelerate launch`` or torchrun, ``run`` also makes the process end when its launcher dies, so a killed launcher
leaves no worker behind.
"""
import ctypes
import difflib
import errno
import functools
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from typing import Optional

from libs.errors import UserError
from libs.preemption import PREEMPTED_EXIT, Preempted

USER_EXIT, INTERRUPTED_EXIT = UserError.exit_code, 130

# OS errors caused by the user's paths or machine, with how to fix each; any other errno is reported as a bug.
OS_HINTS = {
    errno.ENOSPC: 'the disk is full: free space there or write somewhere else',
    errno.EDQUOT: 'the disk quota is used up: free space there or write somewhere else',
    errno.EROFS: 'that file system is read-only: choose a writable location',
    errno.EACCES: 'no permission: choose a location you can write, or fix its permissions',
    errno.EPERM: 'not permitted: choose a location you can write, or fix its permissions',
    errno.ENOTDIR: 'part of that path is a file, not a folder: choose another path',
    errno.EEXIST: 'a file is in the way where a folder is needed: remove it or choose another path',
    errno.EISDIR: 'that is a folder where a file is needed: choose another path',
    errno.ENOENT: 'no such file or folder: check the path',
    errno.ENAMETOOLONG: 'the path is too long: choose a shorter one',
    errno.ELOOP: 'the path has a symbolic-link loop: fix the links',
    errno.EMFILE: 'too many open files: raise the limit (ulimit -n) or use fewer data loader workers',
}


def describe_os_error(err: OSError) -> Optional[str]:
    """One line for an OS error the user can fix (naming the path), or None for any other."""
    if err.errno not in OS_HINTS:
        return None
    paths = ' -> '.join(str(p) for p in (err.filename, err.filename2) if p is not None)
    return f'{paths + ": " if paths else ""}{err.strerror or os.strerror(err.errno)}; {OS_HINTS[err.errno]}'


def one_line(message: str) -> str:
    """The message with its line breaks folded into spaces."""
    return re.sub(r'\s*\n\s*', ' ', str(message).strip())


def unwrap_worker_error(err: Exception) -> str:
    """The message of an error re-raised from a torch DataLoader worker, whose text embeds the worker's traceback."""
    message = str(err)
    if '\nOriginal Traceback' not in message:
        return message
    marker = f'{type(err).__name__}: '
    return message[message.rfind(marker) + len(marker):] + ' (in a data loader worker)'


def close_progress_bars() -> None:
    """Close the tqdm bars an error interrupted, so that the error line starts a line of its own."""
    tqdm = sys.modules.get('tqdm')
    for bar in list(getattr(getattr(tqdm, 'tqdm', None), '_instances', ())):
        bar.close()


def report(message: str, details=()) -> None:
    """Print one error line on stderr, then each detail line as it is (line breaks inside one folded), and add them
    to this process's log files (e.g. a run's log.txt)."""
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    line = f'error: {one_line(message)}' if world <= 1 else f'error (process {rank} of {world}): {one_line(message)}'
    # A detail keeps its indentation: it is how a command line stands out from the line that names what it fetches.
    line = '\n'.join([line, *(re.match(r'\s*', d)[0] + one_line(d) for d in details)])
    close_progress_bars()
    print(line, file=sys.stderr, flush=True)
    record = logging.LogRecord('error', logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def report_user_error(err: UserError) -> None:
    """A UserError's one line, and its details one per line."""
    if err.details:
        report(err.headline, err.details)
    else:
        report(unwrap_worker_error(err))


def call(main, *args) -> int:
    """Run main(*args) and return the process exit status: main's own, or that of the user error it raised."""
    from absl import app
    try:
        return main(*args) or 0
    except Preempted as err:
        close_progress_bars()
        print(f'stopped: {one_line(err)}', file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except UserError as err:
        report_user_error(err)
        return err.exit_code
    except app.UsageError as err:
        report(err)
        return USER_EXIT
    except OSError as err:
        message = describe_os_error(err)
        if message is None:
            raise
        report(message)
        return USER_EXIT
    except KeyboardInterrupt:
        report('interrupted')
        return INTERRUPTED_EXIT


# ----------------------------------------------------------------------------------------------------------------
# Flags and config files
# ----------------------------------------------------------------------------------------------------------------

def config_file_flags(flag_values):
    """Names of the ml_collections config-file flags (--config=path[:arg]) among the defined flags."""
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser
    return [name for name in flag_values if isinstance(flag_values[name].parser, ConfigFileFlagParser)]


def flag_argument(argv, name: str) -> Optional[str]:
    """The last value given to --name on the command line (``--name=v`` or ``--name v``), or None."""
    value = None
    for i, arg in enumerate(argv[1:], 1):
        if arg == '--':
            break
        if re.fullmatch(rf'--?{re.escape(name)}', arg) and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith((f'--{name}=', f'-{name}=')):
            value = arg.split('=', 1)[1]
    return value


def load_config_file(name: str, argument: str):
    """(config, None) from a --name=path[:arg] config file, or (None, the one-line reason it cannot be loaded)."""
    path, _, parameter = argument.partition(':')
    if not os.path.isfile(path):
        return None, f'--{name}={argument}: no such config file {path} (the configs are in configs/)'
    spec = importlib.util.spec_from_file_location(f'_{name}_file', path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config(*([parameter] if parameter else []))
    except Exception as err:  # the user's config file is wrong: say where, not with a traceback
        frames = [f for f in traceback.extract_tb(err.__traceback__) if os.path.abspath(f.filename) ==
                  os.path.abspath(path)]
        where = f' at {path}:{frames[-1].lineno}' if frames else ''
        return None, f'--{name}={argument}: the config file raised {type(err).__name__}: {err}{where}'
    return config, None


def flat_keys(config, prefix: str = ''):
    """Every key path of a nested config ('train.n_steps', ...)."""
    for key, value in config.items():
        yield prefix + key
        if hasattr(value, 'items'):
            yield from flat_keys(value, f'{prefix}{key}.')


def has_key(config, path: str) -> bool:
    """Whether a dotted key path exists in a nested config."""
    node = config
    for part in re.sub(r'\[.*?\]', '', path).split('.'):
        if not hasattr(node, 'items') or part not in node:
            return False
        node = node[part]
    return True


def config_problem(argv, flag_values, only_unloaded: bool = False) -> Optional[str]:
    """What is wrong with the config files or --config.key overrides on the command line, or None."""
    from ml_collections import ConfigDict
    for name in config_file_flags(flag_values):
        flag = flag_values[name]
        if only_unloaded and (flag.value is None or isinstance(flag.value, ConfigDict)):
            continue
        argument, config = flag_argument(argv, name), None
        if argument is None:
            if isinstance(flag.default, ConfigDict):
                config = flag.default
            elif flag.default is None:
                continue
            else:  # the default config file did not load (e.g. a relative path run from another folder)
                argument = flag.default_as_str.strip("'")
        if config is None:
            config, problem = load_config_file(name, argument)
            if problem:
                return problem
        for arg in argv[1:]:
            match = re.match(rf'--?(?:no)?{re.escape(name)}\.([^=]+)', arg)
            if match and not has_key(config, match[1]):
                close = difflib.get_close_matches(match[1], list(flat_keys(config)), n=1)
                hint = f'; did you mean --{name}.{close[0]}?' if close else ''
                return f'--{name}.{match[1]}: {argument or "the config"} has no key {match[1]}{hint}'
    return None


HELP = re.compile(r'--?(help|helpshort|helpfull|helpxml|\?|h)')  # absl's help flags, and -h for --help


def asks_for_help(argv) -> bool:
    """Whether the command line asks for absl's help (before any ``--``)."""
    for arg in argv[1:]:
        if arg == '--':
            return False
        if HELP.fullmatch(arg):
            return True
    return False


def parse_flags(argv):
    """absl's flag parsing (``FLAGS(argv)``), raising a one-line UserError for bad flags and config files."""
    from absl import flags
    flag_values = flags.FLAGS
    # absl has no -h; it means --help in nearly every other command-line tool.
    argv = [argv[0], *('--help' if arg == '-h' else arg for arg in argv[1:])] if '-h' in argv[1:] else argv
    try:
        rest = flag_values(argv)
    except flags.Error as err:
        raise UserError(f'{err} (--helpfull lists every flag)') from err
    except Exception as err:  # raised while loading a config file or applying --config.key overrides
        problem = config_problem(argv, flag_values)
        if problem is None:
            raise
        raise UserError(problem) from err
    # A config file that cannot be read only fails when first used; report it now.
    problem = config_problem(argv, flag_values, only_unloaded=True)
    if problem:
        raise UserError(problem)
    return rest


def _parse_or_exit(argv, flags_parser):
    """Run the flags parser inside absl's app.run; a user error prints one line and exits 2 before main runs, and
    help that was asked for exits 0 (absl's help flags exit 1 after printing it)."""
    try:
        return flags_parser(argv)
    except UserError as err:
        report_user_error(err)
        sys.exit(err.exit_code)
    except SystemExit as exit_:
        if exit_.code == 1 and asks_for_help(argv):
            sys.exit(0)
        raise


def run(main, argv=None, flags_parser=parse_flags) -> None:
    """Parse the flags, run main(argv) through ``call`` under absl's app.run, and exit with its status.

    ``flags_parser`` must raise UserError (or absl's flags.Error) on bad flags, as ``parse_flags`` does.
    """
    from absl import app
    exit_with_launcher()
    argv = list(sys.argv if argv is None else argv)
    saved, sys.argv = sys.argv, argv  # ml_collections reads the --config.key overrides from sys.argv
    try:
        app.run(functools.partial(call, main), argv=argv,
                flags_parser=functools.partial(_parse_or_exit, flags_parser=flags_parser))
    finally:
        sys.argv = saved


# ----------------------------------------------------------------------------------------------------------------
# Workers end with their launcher
# ----------------------------------------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def launched_by_launcher() -> bool:
    """Whether this process is a worker of torchrun / ``accelerate launch`` (multi-process or the simple launcher)."""
    if 'TORCHELASTIC_RUN_ID' in os.environ:
        return True
    try:
        with open(f'/proc/{os.getppid()}/cmdline', 'rb') as f:
            parent = f.read().replace(b'\0', b' ')
    except OSError:
        return False
    return b'accelerate' in parent


def watch_parent(parent: int, period: float = 1.) -> None:
    """End this process (SIGTERM) once its parent has gone (the process is then re-parented)."""
    while os.getppid() == parent:
        time.sleep(period)
    os.kill(os.getpid(), signal.SIGTERM)


def exit_with_launcher() -> None:
    """Under a launcher, get SIGTERM when it dies (Linux: prctl PR_SET_PDEATHSIG; elsewhere a watcher thread).

    Otherwise `kill -9` of `accelerate launch` leaves its workers running as orphans, holding GPUs and racing a rerun.
    """
    if not launched_by_launcher():
        return
    if sys.platform.startswith('linux'):
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
            return
    threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True, name='watch-launcher').start()
