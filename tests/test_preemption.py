"""libs.preemption: a signal sets the flag instead of ending the process, and the CLI exits 75 with one line."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from libs import preemption


@pytest.mark.parametrize('signum', preemption.SIGNALS)
def test_signal_sets_flag_and_handlers_come_back(signum):
    before = signal.getsignal(signum)
    with preemption.stop_on_signals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signum)
        assert stop.requested and stop.signal_name == signal.Signals(signum).name
    assert signal.getsignal(signum) is before


def test_cli_reports_preemption_in_one_line_with_exit_75(tmp_path):
    script = tmp_path / 'job.py'
    script.write_text(textwrap.dedent(f'''
        import os, signal, sys
        sys.path.insert(0, {os.getcwd()!r})
        from libs import cli, preemption
        def main():
            with preemption.stop_on_signals() as stop:
                os.kill(os.getpid(), signal.SIGTERM)
                if stop.requested:
                    raise preemption.Preempted(f'{{stop.signal_name}} after step 3: checkpoint kept')
        sys.exit(cli.call(main))
    '''))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == preemption.PREEMPTED_EXIT == 75
    assert done.stderr.strip() == 'stopped: SIGTERM after step 3: checkpoint kept'
