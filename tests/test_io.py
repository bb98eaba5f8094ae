"""libs.io atomic writes: the file appears whole, and with the permissions the umask gives any new file."""
import os
import stat

import pytest

from libs.io import atomic_write_bytes, atomic_write_json


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
