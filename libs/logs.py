"""Console logging of the command-line scripts: quiet by default, ``-v`` / ``--verbose`` for more.

Quiet: this project's INFO lines in one short format; transformers and diffusers only report errors; the libraries
show no progress bars, except the downloads of libs/hub.py (a multi-GB download must show progress).
Verbose: this project's DEBUG lines, the libraries' INFO lines and all their progress bars. Nothing happens at import;
each script calls ``setup`` once at start-up (and ``define_flags`` / ``parse_flags`` when it defines its flags).
"""
import importlib
import logging
import os
import sys

FORMAT, DATE_FORMAT = '%(asctime)s %(name)s %(levelname)s: %(message)s', '%H:%M:%S'
# Loggers of libraries that log every request or file operation at INFO.
CHATTY = ('httpx', 'httpx2', 'httpcore', 'urllib3', 'filelock', 'PIL', 'matplotlib', 'accelerate')


def define_flags():
    """The --verbose flag (absl already owns -v, as --verbosity=<level>; parse_flags maps a bare -v to --verbose)."""
    from absl import flags
    flags.DEFINE_bool('verbose', False, 'more logs: DEBUG lines of this project, INFO lines and progress bars of '
                      'transformers, diffusers and huggingface_hub (a bare -v means the same)')


def bare_v_as_verbose(argv):
    """argv with a bare ``-v`` (not followed by a level, which absl's -v takes) replaced by ``--verbose``."""
    argv = list(argv)
    for i, arg in enumerate(argv[1:], 1):
        if arg == '--':
            break
        if arg == '-v' and not (i + 1 < len(argv) and argv[i + 1].isdigit()):
            argv[i] = '--verbose'
    return argv


def parse_flags(argv):
    """libs.cli's flag parser (for ``cli.run(main, flags_parser=...)``), with a bare ``-v`` read as ``--verbose``."""
    from libs import cli
    return cli.parse_flags(bare_v_as_verbose(argv))


def setup(verbose: bool = False) -> None:
    """Log format and levels for this process, and the verbosity and progress bars of the libraries."""
    import huggingface_hub.utils  # a lazy package: its utils are not loaded by `import huggingface_hub`
    root = logging.getLogger()
    if not root.handlers:  # absl's app.run installs its handler on the root logger; plain scripts get one here
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    root.setLevel(logging.INFO)
    for name in ('libs', '__main__'):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    # transformers and diffusers are imported lazily, after the weights are checked (importing them takes seconds):
    # those not imported yet read these variables when they are; those already imported are told directly.
    for name in ('transformers', 'diffusers'):
        os.environ[f'{name.upper()}_VERBOSITY'] = 'info' if verbose else 'error'
        if name in sys.modules:
            library = importlib.import_module(f'{name}.utils.logging')
            library.set_verbosity(logging.INFO if verbose else logging.ERROR)
            (library.enable_progress_bar if verbose else library.disable_progress_bar)()
    huggingface_hub.utils.logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
    # transformers takes its progress-bar setting from huggingface_hub's when it is imported. Downloads through
    # libs/hub.py show their progress either way.
    (huggingface_hub.utils.enable_progress_bars if verbose else huggingface_hub.utils.disable_progress_bars)()
