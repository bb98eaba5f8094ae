"""Weights from the Hugging Face Hub (libs/hub.py) without a network: a fake hub cache in the real layout (blobs,
snapshots, refs) filled with the tiny components, read through huggingface_hub and transformers; the offline
report of every missing file; a fake Hub server for the download path."""
import hashlib
import http.server
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import torch
from huggingface_hub import constants

import sample_multi
from common import CLIP_IMG_REPO, CLIP_TEXT_REPO, GPT2_REPO, UNIDIFFUSER_V1, hub as hub_ref, tiny
from libs import hub, pipeline
from libs.errors import UserError
from libs.tiny_models import randomize_
from libs.uvit import build_nnet, load_nnet_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REV1, REV2 = '1' * 40, '2' * 40  # two commits of thu-ml/unidiffuser-v1; 'main' is REV1, tag 'v2' is REV2
UNIDIFFUSER_FILES = ('uvit_v1.pth', 'autoencoder_kl.pth', 'caption_decoder.pth')
FOLDERS = {CLIP_TEXT_REPO: 'clip_text', CLIP_IMG_REPO: 'clip_img', GPT2_REPO: 'gpt2_tokenizer'}


def put(cache, repo_id, commit, files, refs=('main',)):
    """Store {name: bytes} as huggingface_hub does: content-addressed blobs, snapshot symlinks, refs files."""
    storage = os.path.join(cache, 'models--' + repo_id.replace('/', '--'))
    for name, data in files.items():
        blob = os.path.join(storage, 'blobs', hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, 'wb') as f:
            f.write(data)
        link = os.path.join(storage, 'snapshots', commit, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    for ref in refs:
        os.makedirs(os.path.join(storage, 'refs'), exist_ok=True)
        with open(os.path.join(storage, 'refs', ref), 'w') as f:
            f.write(commit)


def read_files(folder):
    """{name: bytes} of the files in a folder."""
    return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope='module')
def repos(tiny_models, tmp_path_factory):
    """{repo_id: {commit: {file: bytes}}}: the tiny components as the Hub repositories hold them (REV2 has another
    U-ViT)."""
    other = str(tmp_path_factory.mktemp('rev2') / 'uvit_v1.pth')
    torch.save(randomize_(build_nnet(tiny(tiny_models).nnet), seed=7).state_dict(), other)
    rev1 = {name: open(os.path.join(tiny_models, name), 'rb').read() for name in UNIDIFFUSER_FILES}
    rev2 = dict(rev1, **{'uvit_v1.pth': open(other, 'rb').read()})
    out = {UNIDIFFUSER_V1: {REV1: rev1, REV2: rev2}}
    for i, (repo_id, folder) in enumerate(FOLDERS.items()):
        out[repo_id] = {str(i + 3) * 40: read_files(os.path.join(tiny_models, folder))}
    return out


@pytest.fixture(scope='module')
def cache(repos, tmp_path_factory):
    """A complete fake hub cache of every component."""
    root = str(tmp_path_factory.mktemp('hub_cache'))
    for repo_id, commits in repos.items():
        for commit, files in commits.items():
            put(root, repo_id, commit, files, refs=('main',) if commit != REV2 else ('v2',))
    return root


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this test, whatever the environment says."""
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)


def hub_config(root, revision=None):
    """The tiny config with every component referenced on the Hub, following config.revisions as the full-size
    config does."""
    config = tiny(root)
    if revision:
        config.revisions.unidiffuser = revision
    rev = config.revisions.get_ref
    for key, name in (('nnet_path', 'uvit_v1.pth'), ('autoencoder.pretrained_path', 'autoencoder_kl.pth'),
                      ('caption_decoder.pretrained_path', 'caption_decoder.pth')):
        section, _, field = key.rpartition('.')
        setattr(config[section] if section else config, field, hub_ref(UNIDIFFUSER_V1, rev('unidiffuser'), name))
    config.caption_decoder.tokenizer = hub_ref(GPT2_REPO, rev('gpt2'))
    config.clip_text.name_or_path = hub_ref(CLIP_TEXT_REPO, rev('clip_text'))
    config.clip_img.name_or_path = hub_ref(CLIP_IMG_REPO, rev('clip_img'))
    for section in (config.caption_decoder, config.clip_text, config.clip_img):
        section.local_files_only = False  # only HF_HUB_OFFLINE may stop a download here
    return config


def test_parse_references():
    assert hub.parse('hf://thu-ml/unidiffuser-v1/uvit_v1.pth') == hub.HubRef(UNIDIFFUSER_V1, None, 'uvit_v1.pth')
    assert hub.parse('hf://o/n@refs%2Fpr%2F3/sub/f.bin') == hub.HubRef('o/n', 'refs/pr/3', 'sub/f.bin')
    assert hub.parse(f'hf://{CLIP_TEXT_REPO}@{REV1}', folder=True) == hub.HubRef(CLIP_TEXT_REPO, REV1, '')
    assert hub.parse('gpt2', folder=True) == hub.HubRef('gpt2')  # transformers-style ids name folders only
    assert hub.parse('gpt2') is None and hub.parse('models/uvit_v1.pth') is None
    assert hub.parse(os.path.join(ROOT, 'models'), folder=True) is None  # an existing path wins
    assert hub.parse('models/gpt2', folder=True) is None  # under an existing folder: a local path
    with pytest.raises(UserError, match='a file is needed'):
        hub.parse('hf://thu-ml/unidiffuser-v1')
    with pytest.raises(UserError, match='not a Hub reference'):
        hub.parse('hf://only-one-part')


def test_components_load_from_the_hub_cache(cache, repos, tiny_models, offline, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', cache)
    config = hub_config(tiny_models)
    paths = hub.preflight(config, pipeline.needed_parts())
    assert paths['nnet_path'] == os.path.join(cache, 'models--thu-ml--unidiffuser-v1', 'snapshots', REV1,
                                              'uvit_v1.pth')
    assert os.path.dirname(paths['clip_text.name_or_path']) == os.path.join(
        cache, 'models--openai--clip-vit-large-patch14', 'snapshots')
    comp = pipeline.load_components(config, torch.device('cpu'))
    official = torch.load(os.path.join(tiny_models, 'uvit_v1.pth'), weights_only=True)
    assert all(torch.equal(v, official[k]) for k, v in comp.nnet.state_dict().items())
    vocab = json.loads(repos[CLIP_TEXT_REPO][next(iter(repos[CLIP_TEXT_REPO]))]['vocab.json'])
    assert len(comp.clip_text.tokenizer) == len(vocab)  # the real tokenizer, not an empty offline stand-in
    record = sample_multi.sample(config, 't2i2t', 'a photo of a cat', None, 1, 1, str(tmp_path))
    assert record['nnet_path'] == f'hf://{UNIDIFFUSER_V1}@main/uvit_v1.pth'
    assert (tmp_path / 't2i2t' / 't2i2t.txt').read_text().strip()


@pytest.mark.parametrize('revision', [REV2, 'v2'])
def test_pinned_revision_selects_its_snapshot(cache, tiny_models, offline, monkeypatch, revision):
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', cache)
    config = hub_config(tiny_models, revision)
    assert config.nnet_path == f'hf://{UNIDIFFUSER_V1}@{revision}/uvit_v1.pth'
    assert REV2 in hub.preflight(config, ('nnet', 'autoencoder'))['nnet_path']
    nnet = build_nnet(config.nnet)
    load_nnet_weights(nnet, config.nnet_path)  # the loader resolves the reference itself
    rev1 = torch.load(os.path.join(tiny_models, 'uvit_v1.pth'), weights_only=True)
    assert not all(torch.equal(v, rev1[k]) for k, v in nnet.state_dict().items())
    rev2 = torch.load(os.path.join(cache, 'models--thu-ml--unidiffuser-v1', 'snapshots', REV2, 'uvit_v1.pth'),
                      weights_only=True)
    assert all(torch.equal(v, rev2[k]) for k, v in nnet.state_dict().items())


@pytest.fixture
def partial_cache(repos, tmp_path):
    """The U-ViT and the GPT-2 tokenizer cached, the CLIP text encoder without its weights, nothing else."""
    root = str(tmp_path / 'partial_cache')
    put(root, UNIDIFFUSER_V1, REV1, {'uvit_v1.pth': repos[UNIDIFFUSER_V1][REV1]['uvit_v1.pth']})
    for repo_id in (GPT2_REPO, CLIP_TEXT_REPO):
        commit, files = next(iter(repos[repo_id].items()))
        put(root, repo_id, commit, {k: v for k, v in files.items() if k != 'model.safetensors'})
    return root


def test_offline_lists_every_missing_file_before_building_anything(partial_cache, tiny_models, offline,
                                                                    monkeypatch, tmp_path):
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', partial_cache)

    def no_network(*args, **kwargs):
        raise AssertionError('a network was built before the missing files were reported')
    monkeypatch.setattr(pipeline, 'build_nnet', no_network)
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        sample_multi.sample(hub_config(tiny_models), 't2i', 'a cat', None, 1, 1, str(tmp_path / 'out'))
    seconds = time.perf_counter() - start
    assert seconds < 5, f'the missing files took {seconds:.1f} s to report'
    message = str(err.value)
    assert message.startswith('4 of the 6 pretrained components')
    for command in ('hf download thu-ml/unidiffuser-v1 autoencoder_kl.pth',
                    'hf download thu-ml/unidiffuser-v1 caption_decoder.pth',
                    'hf download openai/clip-vit-large-patch14 config.json model.safetensors',
                    'hf download openai/clip-vit-base-patch32 config.json model.safetensors'):
        assert f'    {command}' in message
    assert 'uvit_v1.pth' not in message and 'openai-community/gpt2' not in message  # those are there
    assert 'model.safetensors (or pytorch_model.bin) of openai/clip-vit-large-patch14' in message
    assert 'HF_HUB_OFFLINE=1' in message
    assert not os.path.exists(tmp_path / 'out' / 't2i')


def test_offline_cli_reports_all_default_components(tmp_path):
    # The newcomer's first command, on a machine that has nothing: one message, exit code 2.
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'empty_cache'))
    run = subprocess.run([sys.executable, 'sample_multi.py', '--mode=t2i', '--prompt=an elephant under the sea',
                          f'--output_path={tmp_path}'], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.startswith('error: All 6 pretrained components'), run.stderr[:500]
    lines = run.stderr.splitlines()
    # A first line that says what is wrong, then one component per line, each followed by its command on a line of
    # its own: a person reads the list and copies a command whole.
    assert lines[0] == 'error: All 6 pretrained components this run needs are missing (nothing was loaded):', lines[0]
    components = [line for line in lines if line.startswith('- ')]
    commands = [line.strip() for line in lines if line.strip().startswith('hf download ')]
    assert len(components) == len(commands) == 6, run.stderr
    for component, command in zip(components, commands):
        assert lines[lines.index(component) + 1].strip() == command
    assert all(line.count('hf download') <= 1 for line in lines)
    assert f'The Hugging Face cache looked in: {tmp_path / "empty_cache"}' in lines
    for command in [f'hf download {UNIDIFFUSER_V1} {name}' for name in UNIDIFFUSER_FILES] + [
            f'hf download {repo_id} ' for repo_id in FOLDERS]:
        assert any(c.startswith(command) for c in commands), command


def test_missing_checkpoints_get_the_hint_that_fits(tiny_models, tmp_path):
    config = tiny(tiny_models)
    config.workdir = str(tmp_path / 'workdir')
    export = tmp_path / 'workdir' / 'run' / 'ckpts' / '500.ckpt' / 'nnet_ema.safetensors'
    export.parent.mkdir(parents=True)
    export.write_bytes(b'')
    fine_tuned = str(tmp_path / 'workdir' / 'run' / 'ckpts' / '900.ckpt' / 'nnet_ema.safetensors')
    with pytest.raises(UserError) as err:
        hub.preflight(config, ('nnet',), nnet_path=fine_tuned)
    assert 'train_empath.py' in str(err.value) and 'uvit_v1' not in str(err.value)
    assert os.path.relpath(export) in str(err.value)  # the exports that do exist are named
    official = str(tmp_path / 'elsewhere' / 'uvit_v1.pth')
    with pytest.raises(UserError, match=re.escape(f'hf download thu-ml/unidiffuser-v1 uvit_v1.pth --local-dir '
                                                  f'{os.path.dirname(official)}')):
        hub.preflight(config, ('nnet',), nnet_path=official)
    config.caption_decoder.tokenizer = str(tmp_path / 'models' / 'gpt2')
    with pytest.raises(UserError, match=re.escape(f'hf download {GPT2_REPO} vocab.json merges.txt')):
        hub.preflight(config, ('caption_decoder',))
    config.clip_text.name_or_path = str(tmp_path / 'tiny' / 'clip_text')  # missing tiny parts: how they are made
    config.local_weights.folder = str(tmp_path / 'tiny')
    with pytest.raises(UserError, match='make_tiny_models.py'):
        hub.preflight(config, ('clip_text',))


def test_unreachable_hub_is_reported_at_once(partial_cache, tiny_models, monkeypatch):
    # Online mode with nothing listening: one quick failure, not minutes of retries per file.
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', partial_cache)
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        hub.preflight(hub_config(tiny_models), pipeline.needed_parts())
    assert time.perf_counter() - start < 5
    assert str(err.value).count('cannot reach the Hub') == 4


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The endpoints huggingface_hub downloads through: repository info, file tree, file resolution."""
    repos = {}  # {repo_id: {commit: {file: bytes}}}, the first commit being 'main'

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.reply(body=True)

    def do_HEAD(self):
        self.reply(body=False)

    def commit(self, repo_id, revision):
        """The commit a revision names, or None."""
        commits = list(self.repos.get(repo_id, {}))
        if revision in (None, 'main'):
            return commits[0] if commits else None
        return revision if revision in commits else None

    def reply(self, body):
        path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
        api = re.fullmatch(r'/api/models/(.+?)(?:/revision/([^/]+)|/tree/([^/]+)(?:/.*)?)?', path)
        resolve = re.fullmatch(r'/(.+?)/resolve/([^/]+)/(.+)', path)
        repo_id, revision = (api[1], api[2] or api[3]) if api else (resolve[1], resolve[2]) if resolve else ('', '')
        commit = self.commit(repo_id, revision)
        if commit is None:
            self.send_response(404)
            self.send_header('X-Error-Code', 'RepoNotFound')
            self.end_headers()
            return
        files, headers = self.repos[repo_id][commit], {'X-Repo-Commit': commit}
        if api and api[3]:  # the recursive file tree of a commit
            data = json.dumps([dict(type='file', path=name, size=len(blob), oid=hashlib.sha1(blob).hexdigest())
                               for name, blob in files.items()]).encode()
        elif api:
            data = json.dumps(dict(id=repo_id, sha=commit, siblings=[dict(rfilename=n) for n in files])).encode()
        elif resolve[3] in files:
            data = files[resolve[3]]
            headers['ETag'] = f'"{hashlib.sha1(data).hexdigest()}"'
        else:
            self.send_response(404)
            self.send_header('X-Error-Code', 'EntryNotFound')
            self.end_headers()
            return
        self.send_response(200)
        for key, value in dict(headers, **{'Content-Length': str(len(data))}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture
def fake_hub(repos):
    """A local Hub serving the tiny repositories (and, for the CLIP image encoder, only pytorch_model.bin)."""
    served = {repo_id: dict(commits) for repo_id, commits in repos.items()}
    commit, files = next(iter(served[CLIP_IMG_REPO].items()))
    weights = files['model.safetensors']
    served[CLIP_IMG_REPO] = {commit: {k: v for k, v in files.items() if k != 'model.safetensors'}}
    from safetensors.torch import load
    buffer = io.BytesIO()
    torch.save(load(weights), buffer)
    served[CLIP_IMG_REPO][commit]['pytorch_model.bin'] = buffer.getvalue()
    served[CLIP_IMG_REPO][commit]['flax_model.msgpack'] = b'not wanted'
    handler = type('Handler', (FakeHub,), dict(repos=served))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()


def test_online_run_downloads_every_component(fake_hub, tiny_models, tmp_path):
    # sample_multi.py with Hub references and an empty cache: everything is fetched, then it samples.
    cache = tmp_path / 'cache'
    config_file = tmp_path / 'hub_tiny.py'
    paths = [ROOT] + [os.path.join(ROOT, folder) for folder in ('configs', 'tests')]
    config_file.write_text(f'import sys\nsys.path[:0] = {paths!r}\n'
                           'from test_hub import hub_config\n\n\n'
                           f'def get_config():\n    return hub_config({tiny_models!r})\n')
    env = dict(os.environ, HF_HUB_OFFLINE='0', HF_ENDPOINT=fake_hub, HF_HUB_CACHE=str(cache),
               HF_HUB_DISABLE_XET='1', OMP_NUM_THREADS='1')
    run = subprocess.run([sys.executable, 'sample_multi.py', f'--config={config_file}', '--mode=t2i2t',
                          '--prompt=a photo of a cat', f'--output_path={tmp_path}'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / 't2i2t' / 't2i2t.txt').read_text().strip()
    snapshot = cache / 'models--openai--clip-vit-base-patch32' / 'snapshots'
    fetched = set(os.listdir(snapshot / os.listdir(snapshot)[0]))
    assert fetched == {'config.json', 'pytorch_model.bin', 'preprocessor_config.json'}  # the alternative it has
    for name in UNIDIFFUSER_FILES:
        assert (cache / 'models--thu-ml--unidiffuser-v1' / 'snapshots' / REV1 / name).is_file()
    assert (cache / 'models--thu-ml--unidiffuser-v1' / 'refs' / 'main').read_text() == REV1
