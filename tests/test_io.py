"""libs.io atomic writes: a file appears whole, with the permissions the umask gives any new file; a published
folder survives an error or a kill at every point of its replacement."""
import os
import shutil
import signal
import stat

import pytest

from libs import io
from libs.io import atomic_replace_dir, atomic_write_bytes, atomic_write_json, recover_replaced_dir


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    saved = []

    def set_umask(mask):
        saved.append(os.umask(mask))

    yield set_umask
    if saved:
        os.umask(saved[0])


@pytest.mark.skipif(os.name != 'posix', reason='POSIX permission bits')
@pytest.mark.parametrize('mask, mode', [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_write_respects_the_umask(umask, tmp_path, mask, mode):
    umask(mask)
    plain = tmp_path / 'plain.txt'
    plain.write_bytes(b'x')  # what open() makes under this umask: the reference
    atomic_write_bytes(str(tmp_path / 'out' / 'a.png'), b'\x89PNG')
    atomic_write_json(str(tmp_path / 'b.json'), {'a': 1})
    for path in (plain, tmp_path / 'out' / 'a.png', tmp_path / 'b.json'):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert (tmp_path / 'out' / 'a.png').read_bytes() == b'\x89PNG'


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / 'report.md'
    atomic_write_bytes(str(path), b'old')
    atomic_write_bytes(str(path), b'new')
    assert path.read_bytes() == b'new' and os.listdir(tmp_path) == ['report.md']
    with pytest.raises(TypeError):
        atomic_write_bytes(str(path), object())  # a write that fails: the old file stays, no temp file does
    assert path.read_bytes() == b'new' and os.listdir(tmp_path) == ['report.md']


# ----------------------------------------------------------------------------------------------------------------
# atomic_replace_dir
# ----------------------------------------------------------------------------------------------------------------

OLD = {'a.txt': 'old a', 'sub/b.txt': 'old b', 'c.txt': 'old c'}
NEW = {'a.txt': 'new a', 'sub/b.txt': 'new b', 'd.txt': 'new d'}


def write_tree(folder, files):
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), 'w') as f:
            f.write(text)
    return str(folder)


def read_tree(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path) as f:
                out[os.path.relpath(path, folder).replace(os.sep, '/')] = f.read()
    return out


@pytest.fixture
def published(tmp_path):
    """An output folder with a published ``mode`` folder (OLD) and a finished temp folder (NEW) to replace it."""
    final = write_tree(tmp_path / 'mode', OLD)
    return final, write_tree(tmp_path / '.mode-tmp', NEW)


def test_publishes_new_and_replaces_old(tmp_path, published):
    final, tmp = published
    first = write_tree(tmp_path / '.other-tmp', NEW)
    atomic_replace_dir(first, str(tmp_path / 'other'))   # nothing published yet
    assert read_tree(tmp_path / 'other') == NEW
    atomic_replace_dir(tmp, final)
    assert read_tree(final) == NEW
    assert sorted(os.listdir(tmp_path)) == ['mode', 'other']  # no temp or .old folder left


@pytest.mark.parametrize('failing_call', [1, 2])
def test_an_error_in_either_rename_keeps_the_published_folder(published, monkeypatch, failing_call):
    final, tmp = published
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == failing_call:
            raise OSError('disk trouble')
        return real(src, dst)
    monkeypatch.setattr(io.os, 'replace', replace)
    with pytest.raises(OSError, match='disk trouble'):
        atomic_replace_dir(tmp, final)
    assert read_tree(final) == OLD and read_tree(tmp) == NEW  # nothing lost; the caller can retry
    assert not os.path.exists(final + '.old')
    monkeypatch.setattr(io.os, 'replace', real)
    atomic_replace_dir(tmp, final)
    assert read_tree(final) == NEW


# A kill (no exception handler runs) at each point: before the first rename, between the two renames, after
# publishing but before the old folder is removed, and halfway through removing it.
KILL_POINTS = [('replace', 1, OLD), ('replace', 2, OLD), ('rmtree', 1, NEW), ('unlink', 2, NEW)]


@pytest.mark.parametrize('function, call, survivor', KILL_POINTS,
                         ids=['before-first-rename', 'between-renames', 'before-removing-old', 'while-removing-old'])
def test_a_kill_at_any_point_loses_nothing(published, function, call, survivor):
    final, tmp = published
    pid = os.fork()
    if pid == 0:  # child: die at the chosen call, as SIGKILL or a power cut would
        try:
            module, name = {'replace': (os, 'replace'), 'rmtree': (shutil, 'rmtree'), 'unlink': (os, 'unlink')}[function]
            real, seen = getattr(module, name), []

            def dying(*args, **kwargs):
                seen.append(args)
                if len(seen) == call:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)
            setattr(module, name, dying)
            atomic_replace_dir(tmp, final)
        finally:
            os._exit(1)  # never reached when killed; never run the parent's remaining tests in the child
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, 'the kill point was not reached'
    # A reader recovers a complete folder: the old one until the new one is in place, never a mix or nothing.
    assert read_tree(recover_replaced_dir(final)) == survivor
    assert os.path.isdir(tmp) == (survivor is OLD)   # an unpublished temp folder stays for a retry
    # The next publication cleans up and succeeds.
    again = write_tree(os.path.join(os.path.dirname(final), '.mode-tmp2'), {'e.txt': 'newest'})
    atomic_replace_dir(again, final)
    assert read_tree(final) == {'e.txt': 'newest'} and not os.path.exists(final + '.old')


def test_a_kill_between_the_renames_is_repaired_by_the_next_publication(published):
    """The state a kill between the two renames leaves: only ``<final>.old`` and the temp folder."""
    final, tmp = published
    os.replace(final, final + '.old')
    newer = write_tree(os.path.join(os.path.dirname(final), '.mode-tmp2'), {'e.txt': 'newest'})
    atomic_replace_dir(newer, final)
    assert read_tree(final) == {'e.txt': 'newest'} and not os.path.exists(final + '.old')
