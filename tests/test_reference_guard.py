"""The conftest hook: a skipped ``reference`` test fails the run, so a clone can never pass with them unrun."""
import os
import subprocess
import sys

CONFTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'conftest.py')

TESTS = '''
import pytest

@pytest.mark.reference
def test_skipped_inside():
    pytest.skip('fixture missing')

@pytest.mark.reference
@pytest.mark.skipif(True, reason='not beside the repo')
def test_skipped_by_mark():
    pass

@pytest.mark.reference
def test_runs():
    pass

def test_ordinary_skip():
    pytest.skip('allowed')

@pytest.mark.reference
@pytest.mark.xfail(strict=True, reason='a known bug')
def test_known_bug():
    assert False
'''


def test_skipped_reference_tests_fail(tmp_path):
    (tmp_path / 'conftest.py').write_text(
        'import importlib.util\n'
        f'spec = importlib.util.spec_from_file_location("repo_conftest", {CONFTEST!r})\n'
        'repo = importlib.util.module_from_spec(spec)\n'
        'spec.loader.exec_module(repo)\n'
        'pytest_runtest_makereport = repo.pytest_runtest_makereport\n')
    (tmp_path / 'pytest.ini').write_text('[pytest]\nmarkers =\n    reference: official fixtures\n')
    (tmp_path / 'test_guarded.py').write_text(TESTS)
    done = subprocess.run([sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-rfs', str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 1, done.stdout[-3000:]
    # A skip in the call fails the test; a skip mark acts in setup, which pytest reports as an error.
    assert '1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error' in summary, done.stdout[-3000:]
    assert 'FAILED test_guarded.py::test_skipped_inside' in done.stdout
    assert 'ERROR at setup of test_skipped_by_mark' in done.stdout
    assert 'reference tests must run in every clone' in done.stdout
