"""The README's quick start runs as written: every command of the blocks marked ``<!-- quickstart -->`` exits 0 in a
copy of the repository's tracked files, and the files the README says they write are there; the GPU one-liner parses
and names the Hub files it fetches; an empath mode asked of a UniDiffuser network names the config that has them.
The README opens with the project's status; its demo command uses flags the demo defines; every step of its real
workflow parses and, offline with an empty cache, stops at the first missing weights with the command that gets them."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
MARKER = '<!-- quickstart -->'
GPU_HEADING = '### A real UniDiffuser-v1 sample on a GPU'
WORKFLOW_HEADING = '## The real workflow'
# Setup and activation are skipped: this test already runs inside the venv they make, and its interpreter is the
# `python` of every command.
SETUP = re.compile(r'(make setup|python3 -m venv|pip install|(\.|source) \.venv/bin/activate)(\s|$)')
APP = re.compile(r'python app\.py(\s|$)')  # blocks until stopped; tests/test_app.py drives the app in a browser
COMMAND_TIMEOUT_S = 900  # one command; each takes seconds on an idle core, minutes on a crowded CI machine
RUN = 'workdir/avamerg_tiny'


def bash_blocks(text, after):
    """The ```bash blocks that directly follow the line ``after``, in document order."""
    return re.findall(re.escape(after) + r'[ \t]*\n```bash\n(.*?)\n```', text, re.S)


def commands(block):
    """A bash block's commands: continuation lines joined as bash joins them, blank and comment lines dropped."""
    lines = block.replace('\\\n', '').splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith('#')]


def quickstart_commands():
    """(commands to run, skipped lines) of the README's quick start; fails when its marked blocks are missing."""
    with open(README, encoding='utf-8') as f:
        blocks = bash_blocks(f.read(), MARKER)
    assert blocks, f'README.md has no ```bash block right after a {MARKER} line: the quick start is not marked'
    lines = [c for b in blocks for c in commands(b)]
    skipped = [c for c in lines if SETUP.match(c) or APP.match(c)]
    return [c for c in lines if c not in skipped], skipped


def repository_copy(dest):
    """Copy the tracked files (what a fresh clone has, uncommitted edits included) into dest."""
    listed = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True).stdout
    for name in listed.decode().split('\0'):
        source = os.path.join(ROOT, name)
        if name and os.path.isfile(source):
            os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(source, os.path.join(dest, name))
    return dest


def shell_env(tmp):
    """The environment of a newcomer's shell in the activated venv: `python` is this interpreter, the Hub is off."""
    bin_dir, cache = tmp / 'bin', tmp / 'hf_cache'
    bin_dir.mkdir()
    cache.mkdir()
    python = bin_dir / 'python'
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ.get("PATH", "")}', HF_HUB_OFFLINE='1',
               HF_HUB_CACHE=str(cache), OMP_NUM_THREADS='1')
    env.pop('PYTHONPATH', None)  # the scripts must find the copy's libs/ and configs/ on their own
    return env


def run(command, cwd, env):
    """Run one README line through bash, as a pasted line runs; returns (exit code, stdout + stderr)."""
    done = subprocess.run(['bash', '-c', command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope='module')
def quickstart(tmp_path_factory):
    """(repository copy, {command: output}) after running every quick-start command in order."""
    tmp = tmp_path_factory.mktemp('readme')
    repo, env = repository_copy(str(tmp / 'clone')), shell_env(tmp)
    outputs = {}
    for command in quickstart_commands()[0]:
        code, outputs[command] = run(command, repo, env)
        assert code == 0, f'README quick start: `{command}` exited {code}:\n{outputs[command][-4000:]}'
    return repo, outputs


def output_of(outputs, *words):
    """The output of the one quick-start command that contains every word."""
    found = [out for command, out in outputs.items() if all(w in command for w in words)]
    assert len(found) == 1, f'expected one quick-start command with {words}, found {len(found)}'
    return found[0]


def test_quickstart_is_marked_and_says_how_to_set_up():
    run_lines, skipped = quickstart_commands()
    assert any(SETUP.match(c) and 'activate' in c for c in skipped), 'the quick start must activate the venv'
    assert any(APP.match(c) for c in skipped), 'the quick start ends with the web app on the trained network'
    families = {m: any(f'--mode={m} ' in c for c in run_lines) for m in ('joint', 't2i', 'i2t', 'empath')}
    assert all(families.values()), families
    assert any('--split=val' in c for c in run_lines), 'training selects checkpoints on the val features'


@pytest.mark.slow
def test_tiny_random_components_run_every_mode_family(quickstart):
    repo, outputs = quickstart
    out = lambda *p: os.path.join(repo, 'out', *p)
    for mode, n in (('joint', 4), ('t2i', 4)):
        assert sorted(os.listdir(out(mode))) == sorted([f'{i}.png' for i in range(n)] + ['grid.png', 'samples.json']
                                                       + (['prompts.txt'] if mode == 'joint' else []))
        with Image.open(out(mode, '0.png')) as im:
            assert im.size == (32, 32)
    # Counted in samples.json: random texts may contain line breaks, so the .txt files need not have a line each.
    assert len(json.load(open(out('joint', 'samples.json')))['outputs']['texts']) == 4
    assert os.path.isfile(out('joint', 'prompts.txt')) and os.path.isfile(out('i2t', 'i2t.txt'))
    assert len(json.load(open(out('i2t', 'samples.json')))['outputs']['texts']) == 1
    # The tiny EmpathDiffuser network has random gates: the speaker path reaches the response.
    nnet = torch.load(os.path.join(repo, 'models', 'tiny', 'uvit_empath.pth'), weights_only=True)
    gates = [v for k, v in nnet.items() if k.endswith('.attn.cond_gate')]
    assert gates and all(g.abs().min() > 0 for g in gates)
    record = json.load(open(out('empath', 'samples.json')))
    assert record['inputs'] == dict(img='assets/speaker_sad.png', prompt='I lost my job today.')
    assert len(record['outputs']['images']) == len(record['outputs']['texts']) == 2
    assert len(record['outputs']['emotions']) == 2 and all(len(top) == 3 for top in record['outputs']['emotions'])
    label, p = record['outputs']['emotions'][0][0]
    assert f'speaker emotion: {label} {p:.2f}' in output_of(outputs, 'sample_tiny_empath.py', '--mode=empath')


@pytest.mark.slow
def test_own_model_is_trained_exported_sampled_and_evaluated(quickstart):
    repo, outputs = quickstart
    features = {s: json.load(open(os.path.join(repo, 'models', 'tiny', 'features', s, 'manifest.json')))
                for s in ('train', 'val', 'test')}
    assert {s: m['split'] for s, m in features.items()} == {s: s for s in features}
    assert all(m['num_pairs'] > 0 for m in features.values())
    # Training exports the EMA network where the README, sample_multi.py and eval_avamerg.py look for it.
    export = json.load(open(os.path.join(repo, RUN, 'nnet_ema.json')))
    assert os.path.isfile(os.path.join(repo, RUN, 'nnet_ema.safetensors'))
    assert export['step'] == 50 and os.path.isdir(os.path.join(repo, RUN, export['checkpoint']))
    printed = re.search(r'python sample_multi\.py .*', output_of(outputs, 'train_empath.py')).group(0)
    readme_sample = next(c for c in outputs if 'sample_multi.py' in c and RUN in c)
    assert set(shlex.split(printed)) <= set(shlex.split(readme_sample)), 'training prints the README command'
    record = json.load(open(os.path.join(repo, 'out', 'trained', 'empath', 'samples.json')))
    assert record['nnet_path'] == f'{RUN}/nnet_ema.safetensors' and len(record['outputs']['emotions']) == 2
    summary = json.load(open(os.path.join(repo, 'out', 'eval', 'metrics.json')))
    assert summary['samples'] == features['test']['num_pairs'] and not summary['fid_computed']
    for name in ('report.md', 'pairs.jsonl', 'grid.png', 'confusion_32.png', 'confusion_7.png'):
        assert os.path.isfile(os.path.join(repo, 'out', 'eval', name)), name


def test_gpu_one_liner_parses_and_fetches_unidiffuser_v1(tmp_path):
    # Offline with an empty Hub cache, the command must get as far as the preflight: the flags parse, the default
    # config loads, and the missing parts are the official UniDiffuser-v1 files, each with its download command.
    text = open(README, encoding='utf-8').read()
    assert GPU_HEADING in text
    (line,) = commands(re.search(r'```bash\n(.*?)\n```', text.split(GPU_HEADING, 1)[1], re.S).group(1))
    setup, sample = line.split(' && ')
    assert setup == 'make setup' and sample.startswith('.venv/bin/python sample_multi.py ')
    repo = repository_copy(str(tmp_path / 'clone'))
    code, out = run(sample.replace('.venv/bin/python', 'python', 1), repo, shell_env(tmp_path))
    assert code == 2, out[-3000:]
    for name in ('uvit_v1.pth', 'autoencoder_kl.pth', 'caption_decoder.pth'):
        assert f'hf download thu-ml/unidiffuser-v1 {name}' in out
    assert 'openai/clip-vit-large-patch14' in out and 'openai/clip-vit-base-patch32' in out


def test_empath_mode_of_a_unidiffuser_network_names_the_tiny_empath_config(tiny_models):
    from common import tiny
    from libs import pipeline
    from libs.errors import UserError
    comp = pipeline.load_components(tiny(tiny_models), torch.device('cpu'))
    ctx = pipeline.make_context(comp, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match='--config=configs/sample_tiny_empath.py'):
        pipeline.generate(comp, ctx, 'empath', 1, prompt='I lost my job today.')


def readme_text():
    with open(README, encoding='utf-8') as f:
        return f.read()


def test_readme_opens_with_the_status():
    sections = re.findall(r'^## (.+)$', readme_text(), re.M)
    assert sections[0] == 'Status', sections
    status = readme_text().split('## Status', 1)[1].split('\n## ', 1)[0]
    for fact in ('make rehearse', 'no EmpathDiffuser weights have been trained at full size',
                 'Nothing has been evaluated on the real AvaMERG', 'every GPU figure is unmeasured'):
        assert fact in status, fact


def test_readme_has_one_demo_table_block():
    text = readme_text()
    assert text.count('<!-- demo-table:start -->') == text.count('<!-- demo-table:end -->') == 1
    assert text.index('<!-- demo-table:start -->') < text.index('<!-- demo-table:end -->')


def test_readme_demo_command_uses_the_demos_flags():
    # tests/test_demo.py runs the quick demo itself; here only that the README's command names flags that exist.
    (line,) = [c for c in commands('\n'.join(re.findall(r'```bash\n(.*?)\n```', readme_text(), re.S)))
               if 'scripts/demo.py' in c and '--quick' in c]
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'demo.py'), '--help'], cwd=ROOT,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in re.findall(r'--(\w+)', line.split('#')[0]):
        assert re.search(rf'--(\[no\])?{name}\b', done.stdout + done.stderr), f'scripts/demo.py has no --{name}'


def workflow_commands():
    """The commands of the README's numbered real-workflow steps."""
    section = readme_text().split(WORKFLOW_HEADING, 1)[1].split('\n## ', 1)[0]
    return re.findall(r'^\d+\. .*`([^`]+)`$', section, re.M)  # each step ends with its command


@pytest.mark.slow
def test_real_workflow_steps_parse_and_stop_at_the_missing_weights(tmp_path):
    # Offline with an empty Hub cache, each step must get past its flags and config to the first missing file and
    # name the download that fixes it (exit 2), never stop on a flag or config error.
    steps = workflow_commands()
    assert len(steps) == 6 and steps[0].startswith('hf download ')
    repo = repository_copy(str(tmp_path / 'clone'))
    shutil.copy(os.path.join(repo, 'assets', 'speaker_sad.png'), os.path.join(repo, 'face.png'))
    env = shell_env(tmp_path)
    hf = os.path.join(os.path.dirname(sys.executable), 'hf')
    code, out = run(f'{shlex.quote(hf)} download --help', repo, env)
    assert code == 0 and 'FILENAMES' in out, out[-2000:]
    for step in steps[1:]:
        # accelerate's launcher turns every failure into exit 1; the script's own exit code is what is checked.
        code, out = run(step.replace('accelerate launch ', 'python ', 1), repo, env)
        # Evaluation looks at its feature cache before anything is fetched (it refuses another split's cache
        # first), so with no cache it names the extraction step instead.
        fix = 'extract_features.py' if step.startswith('python eval_avamerg.py') else 'hf download'
        assert code == 2 and fix in out, f'`{step}` exited {code}:\n{out[-3000:]}'
