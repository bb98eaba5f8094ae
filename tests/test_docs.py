"""The documentation holds together: the README stays short, every relative link in README.md and docs/ resolves,
every design section the code cites exists in docs/design.md, CITATION.cff is valid CFF 1.2.0, and `make setup`
picks the torch build it says it picks (checked with `make -n`, which prints the commands without running them)."""
import functools
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
README_MAX_BYTES = 12 * 1024  # issue 22: a README a researcher reads in five minutes
CITATION = re.compile(r'docs/design\.md §(\d+)')
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src="([^"]+)"')


def tracked(*suffixes):
    """Tracked files (what a fresh clone has) ending in one of ``suffixes``."""
    listed = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True).stdout
    return [n for n in listed.decode().split('\0') if n.endswith(suffixes) and os.path.isfile(os.path.join(ROOT, n))]


def markdown_files():
    return ['README.md'] + sorted(n for n in tracked('.md') if n.startswith('docs/'))


def read(name):
    with open(os.path.join(ROOT, name), encoding='utf-8') as f:
        return f.read()


def anchors(text):
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r'^#+\s+(.*?)\s*$', re.sub(r'```.*?```', '', text, flags=re.S), re.M)
    return {re.sub(r'[^\w\- ]', '', h.lower()).replace(' ', '-') for h in headings}


def test_readme_is_short():
    size = os.path.getsize(README)
    assert size < README_MAX_BYTES, f'README.md is {size} bytes; move detail into docs/ (limit {README_MAX_BYTES})'


@pytest.mark.parametrize('name', markdown_files())
def test_relative_links_resolve(name):
    text = read(name)
    broken = []
    for match in LINK.finditer(re.sub(r'```.*?```', '', text, flags=re.S)):
        target = match.group(1) or match.group(2)
        if re.match(r'[a-z]+:', target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition('#')
        resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(name), path)) if path else os.path.join(ROOT,
                                                                                                               name)
        relative = os.path.relpath(resolved, ROOT)
        if not os.path.exists(resolved):
            broken.append(target)
        elif anchor and resolved.endswith('.md') and anchor not in anchors(read(relative)):
            broken.append(target)
    assert not broken, f'{name}: links that lead nowhere: {broken}'


# Repository paths named in code spans, e.g. `libs/features.py` or `configs/demo.py:out/demo`.
CODE_SPAN = re.compile(r'`([^`\n]+)`')
REPO_PATH = re.compile(r'(?<![\w/])((?:libs|scripts|configs|tests|docs|assets)/[\w./-]*\w)')


@pytest.mark.parametrize('name', markdown_files())
def test_named_repository_paths_exist(name):
    spans = CODE_SPAN.findall(re.sub(r'```.*?```', '', read(name), flags=re.S))
    named = {path for span in spans for path in REPO_PATH.findall(span)}
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f'{name} names files that do not exist: {missing}'


def test_every_cited_design_section_exists():
    design = read('docs/design.md')
    sections = set(re.findall(r'^## (\d+)\. ', design, re.M))
    cited = {}
    for name in tracked('.py', '.md', '.sh', '.yaml'):
        for number in CITATION.findall(read(name)):
            cited.setdefault(number, []).append(name)
    assert cited, 'no design citation found: the pattern no longer matches how the code cites docs/design.md'
    missing = {n: files for n, files in cited.items() if n not in sections}
    assert not missing, f'sections cited but missing from docs/design.md: {missing}'


def test_citation_cff_is_valid():
    # The CFF 1.2.0 schema's required keys and shapes (cffconvert is not a dependency of the project).
    cff = yaml.safe_load(read('CITATION.cff'))
    assert cff['cff-version'] == '1.2.0'
    assert cff['message'] and cff['title'] and cff['authors']
    assert all('name' in a or 'family-names' in a for a in cff['authors'])
    for ref in cff['references'] + ([cff['preferred-citation']] if 'preferred-citation' in cff else []):
        assert ref['type'] and ref['title'] and ref['authors'], ref
    assert {r['title'] for r in cff['references']} >= {
        'One Transformer Fits All Distributions in Multi-Modal Diffusion at Scale'}


# --- make setup: which torch build ---------------------------------------------------------------------------------

def torch_install_line(tmp_path, path_dirs=(), **variables):
    """The torch line `make -n setup` prints with PATH = ``path_dirs`` only (no nvidia-smi unless one is put there)."""
    make = shutil.which('make')
    if make is None:
        pytest.skip('make is not installed')
    env = dict(os.environ, PATH=os.pathsep.join(str(p) for p in path_dirs))
    args = [make, '-n', '-B', 'setup', f'PYTHON={sys.executable}', f'VENV={tmp_path / "venv"}']
    args += [f'{k}={v}' for k, v in variables.items()]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if 'install -q torch==' in ln]
    return line


@pytest.fixture
def cpu_index(tmp_path):
    """A reachable stand-in for PyTorch's CPU index, served on localhost."""
    (tmp_path / 'index' / 'torch').mkdir(parents=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / 'index'))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()


def closed_port_url():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return f'http://127.0.0.1:{s.getsockname()[1]}'


@pytest.fixture
def fake_gpu(tmp_path):
    """A folder whose nvidia-smi lists one GPU."""
    folder = tmp_path / 'gpu_bin'
    folder.mkdir()
    smi = folder / 'nvidia-smi'
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\n')
    smi.chmod(0o755)
    return folder


def test_setup_takes_the_cpu_index_on_a_machine_without_gpu(tmp_path, cpu_index):
    line = torch_install_line(tmp_path, TORCH_CPU_INDEX=cpu_index)
    assert line.endswith(f'torch==2.13.0 --index-url {cpu_index}')


def test_setup_keeps_pips_own_sources_when_the_cpu_index_is_unreachable(tmp_path):
    # This project's CI: no internet, torch comes from pip's configured wheel folder.
    line = torch_install_line(tmp_path, TORCH_CPU_INDEX=closed_port_url())
    assert line.split()[-1] == 'torch==2.13.0'


def test_setup_takes_pypis_cuda_build_on_a_gpu_machine(tmp_path, cpu_index, fake_gpu):
    line = torch_install_line(tmp_path, [fake_gpu], TORCH_CPU_INDEX=cpu_index)
    assert line.split()[-1] == 'torch==2.13.0'


def test_setup_index_can_be_chosen(tmp_path, cpu_index, fake_gpu):
    cu = 'https://download.pytorch.org/whl/cu128'
    assert torch_install_line(tmp_path, [fake_gpu], TORCH_INDEX=cu).endswith(f'--index-url {cu}')
    assert '--index-url' not in torch_install_line(tmp_path, TORCH_CPU_INDEX=cpu_index, TORCH_INDEX='')


# Config keys named in code spans, e.g. `train.p_drop_face` or `--config.sample.scale_text=5`.
CONFIG_KEY = re.compile(r'^(?:--)?(?:config\.)?((?:train|optimizer|data|sample|nnet|eval|caption_decoder_train|'
                        r'caption_decoder|clip_text|clip_img|autoencoder|revisions)\.[a-z_][\w.]*?)(?:=.*)?$')


DELIBERATELY_UNKNOWN = {'train.n_stepz'}  # troubleshooting.md's example of a misspelt key


def test_named_config_keys_exist():
    sys.path.insert(0, os.path.join(ROOT, 'configs'))
    try:
        import avamerg_empath
        config = avamerg_empath.get_config()
    finally:
        sys.path.remove(os.path.join(ROOT, 'configs'))
    named = {}
    for name in markdown_files():
        for span in CODE_SPAN.findall(re.sub(r'```.*?```', '', read(name), flags=re.S)):
            match = CONFIG_KEY.match(span.strip())
            if match and not re.search(r'\.(pth|pt|json|safetensors|py|md|png|yaml|txt)$', match.group(1)) \
                    and match.group(1) not in DELIBERATELY_UNKNOWN:
                named.setdefault(match.group(1), name)
    assert len(named) > 20, f'the key pattern found too few keys: {sorted(named)}'
    missing = {}
    for key, name in named.items():
        node = config
        for part in key.split('.'):
            if part not in node:
                missing[key] = name
                break
            node = node[part]
    assert not missing, f'config keys named in the docs that configs/avamerg_empath.py does not have: {missing}'


def test_overview_figure_is_drawn_by_the_committed_script(tmp_path):
    # The README's figure regenerates byte for byte (no timestamps in the PNG; matplotlib is pinned).
    out = tmp_path / 'empathdiffuser.png'
    done = subprocess.run([sys.executable, os.path.join('scripts', 'make_figures.py'), f'--out={out}'], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out, 'rb') as new, open(os.path.join(ROOT, 'assets', 'empathdiffuser.png'), 'rb') as committed:
        assert new.read() == committed.read(), 'assets/empathdiffuser.png is stale: run python scripts/make_figures.py'
