"""A rehearsal of every stage at full size on a CPU: random components in the official layouts, then the real scripts.

The components are UniDiffuser-v1's at their real sizes (the 952.5M U-ViT, the SD VAE, CLIP ViT-L/14 text and
ViT-B/32 image encoders, the GPT-2 caption decoder, tokenizers of the real vocabulary sizes), with random weights.
The scripts run as subprocesses with ``configs/avamerg_empath.py`` changed only where ``overrides`` says (paths, step
counts, batch sizes), on a few synthetic AvaMERG pairs at 512². Random weights show that shapes, memory, resume and
the scripts work at full size; they show nothing about quality.

Each stage writes ``<out>/stages/<name>.json`` with its wall time, CPU time and peak RSS (of the processes it ran,
read from ``os.wait4``); a rerun skips finished stages. A stage that runs (the first time, again after a failure, or
with ``rerun``) first clears what it writes, so it never resumes or mixes with an earlier run's outputs.
``size='tiny'`` runs the same stages with tiny components (``configs/avamerg_tiny.py``), which is how the test suite
covers this module.
"""
import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Callable, List, Optional

from libs.errors import UserError

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {'full': 'configs/avamerg_empath.py', 'tiny': 'configs/avamerg_tiny.py'}
TABLE = 'rehearsal.md'
SEED = 0
# The first number of synthetic dialogues (seed 0) whose conversation ids include one that the config's
# val_fraction (0.02) holds out, so the val split is not empty without changing val_fraction.
DIALOGUES, TEST_DIALOGUES = 121, 2
EXTRACT_LIMIT = {'train': 4, 'val': 2, 'test': 2}  # pairs encoded per split: enough for every later stage
TRAIN_BATCH, ENCODER_BATCH, EVAL_PAIRS = 1, 2, 2
TRAIN_STEPS = 2  # the LoRA run: killed after step 1, resumed for step 2
NETWORKS = ('lora', 'full')  # the training runs whose export the later stages can load
SAMPLE_STEPS = 2
# Full fine-tuning keeps weights, gradients, AdamW's two moments and the EMA copy: 20 B per parameter, 19.2 GB for
# the 959.7M-parameter network before activations; with the other users of a 24 GB machine it does not fit. Depth 8
# (4 + 1 + 4 blocks, 277M parameters plus the speaker path, about 5.6 GB of states) keeps the width, the token
# count and the code path.
FULL_FINETUNE_DEPTH = 8
# Full-size CLIP encoders (OpenAI's published configs): ViT-L/14's text tower and ViT-B/32's image tower.
CLIP_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act='quick_gelu', projection_dim=768)
CLIP_IMAGE = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072, projection_dim=512,
                  num_layers=12, num_heads=12)
GPT2_VOCAB = 50257  # GPT-2's byte-level BPE; the caption decoder adds <|EOS|>
INIT_STD = 0.02     # cheap random init of the U-ViT (normal, in place)
APP_TIMEOUT_S = 600  # the app loads every full-size component before it serves
POLL_S = 0.2  # how often a watched process is checked (the LoRA kill must land between its two checkpoints)


# The imports above are the standard library's only, so scripts/rehearse.py --help answers at once; torch and the
# project's modules load inside the stages.


class StageFailed(UserError):
    """A stage's command failed; the message names the command and its log."""
    exit_code = 1


@dataclasses.dataclass
class Usage:
    """What one process (and the children it waited for) used."""
    wall_s: float
    cpu_s: float
    peak_rss_gb: float  # GiB (ru_maxrss)


@dataclasses.dataclass
class Rehearsal:
    """The output folder and its layout; every path the stages share comes from here."""
    out: str
    size: str = 'full'
    full_depth: int = FULL_FINETUNE_DEPTH
    modes: tuple = ()  # sampling modes of the sample stage; () = every mode of libs.modes
    # The trained network that sample, eval and app load: the LoRA run's export (full depth), or the full step's
    # (reduced depth: a quicker check of those scripts with every other component at full size).
    network: str = 'lora'

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    @property
    def components(self) -> str:
        return self.path('components')

    @property
    def config_flag(self) -> str:
        """--config of every script: the real training config (tiny: its tiny twin reading our components)."""
        return f'--config={SIZES[self.size]}' + (f':{self.components}' if self.size == 'tiny' else '')

    def export(self, run: str) -> str:
        """The network train_empath.py exports for a run name."""
        return self.path('workdir', run, 'nnet_ema.safetensors')


def overrides(r: Rehearsal) -> dict:
    """Every config key the rehearsal changes, in one place: component and data paths, step counts, batch sizes."""
    comp = r.components
    return {
        # Paths: the random components and the synthetic data and features of this folder.
        'autoencoder.pretrained_path': f'{comp}/autoencoder_kl.pth',
        'clip_text.name_or_path': f'{comp}/clip_text',
        'clip_img.name_or_path': f'{comp}/clip_img',
        'caption_decoder.pretrained_path': f'{comp}/caption_decoder.pth',
        'caption_decoder.tokenizer': f'{comp}/gpt2_tokenizer',
        'nnet_path': f'{comp}/uvit_v1.pth',
        'train.init_from': f'{comp}/uvit_v1.pth',
        'workdir': r.path('workdir'),
        'data.root': r.path('data'),
        'data.train': r.path('features', 'train'),
        'data.val': r.path('features', 'val'),
        'data.test': r.path('features', 'test'),
        # Batch sizes: a few pairs on a CPU.
        'data.batch_size': ENCODER_BATCH,
        'train.batch_size': TRAIN_BATCH,
        'train.val_pairs': 1,
        # Step counts: a checkpoint after every step (the LoRA run is killed between them), validation at the last.
        'train.n_steps': TRAIN_STEPS,
        'train.log_every': 1,
        'train.val_every': TRAIN_STEPS,
        'train.ckpt_every': 1,
        'train.sample_every': 0,
        'sample.sample_steps': SAMPLE_STEPS,
    }


def config_flags(r: Rehearsal, **extra) -> List[str]:
    """--config plus the overrides (and stage-specific ones) as command-line flags."""
    return [r.config_flag] + [f'--config.{k}={v}' for k, v in {**overrides(r), **extra}.items()]


def load_config(r: Rehearsal):
    """The config every script sees, built in this process (for writing components)."""
    sys.path.insert(0, os.path.join(ROOT, 'configs'))
    import avamerg_empath
    import avamerg_tiny
    config = avamerg_tiny.get_config(r.components) if r.size == 'tiny' else avamerg_empath.get_config()
    for key, value in overrides(r).items():
        *parents, leaf = key.split('.')
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


# ----------------------------------------------------------------------------------------------------------------
# Random components in the official layouts
# ----------------------------------------------------------------------------------------------------------------

def save_torch(state: dict, path: str) -> None:
    """torch.save through a temp file and a rename, so a killed writer leaves no half file."""
    import torch
    from libs.io import writing
    tmp = os.path.join(os.path.dirname(path), f'.tmp-{os.path.basename(path)}')
    with writing(path):
        torch.save(state, tmp)
        os.replace(tmp, path)


def random_init_(module, seed: int, std: float = INIT_STD):
    """Cheap random weights in place: matrices N(0, std²), norm scales 1, biases 0 (a trained net's orders of size)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.normal_(0, std, generator=g)
            elif name.endswith('weight'):
                p.fill_(1)
            else:
                p.zero_()
    return module


def write_uvit(nnet_config, path: str, seed: int) -> int:
    """A random U-ViT of nnet_config in the official key layout, built on `meta` and filled in place; its size."""
    import torch
    from libs.uvit import build_nnet
    with torch.device('meta'):
        nnet = build_nnet(nnet_config)
    nnet = random_init_(nnet.to_empty(device='cpu'), seed)
    save_torch(nnet.state_dict(), path)
    return sum(p.numel() for p in nnet.parameters())


def clip_bpe_files(out_dir: str, vocab_size: int, max_length: int) -> None:
    """A CLIP BPE tokenizer of exactly vocab_size tokens in OpenAI's order: bytes, bytes + </w>, merges, specials.

    The merges join a byte with a word-final byte (valid BPE merges, none learned from text): real shapes, not a
    real segmentation.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from libs.clip_encoders import BOS, END_OF_WORD, EOS
    from libs.io import atomic_write_bytes, atomic_write_json
    base = list(bytes_to_unicode().values())
    num_merges = vocab_size - 2 * len(base) - 2
    merges = [(a, b + END_OF_WORD) for a in base for b in base][:num_merges]
    tokens = base + [c + END_OF_WORD for c in base] + [a + b for a, b in merges] + [BOS, EOS]
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, 'vocab.json'), {token: i for i, token in enumerate(tokens)})
    atomic_write_bytes(os.path.join(out_dir, 'merges.txt'),
                       ('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges)).encode('utf-8'))
    atomic_write_json(os.path.join(out_dir, 'tokenizer_config.json'),
                      dict(tokenizer_class='CLIPTokenizer', model_max_length=max_length, bos_token=BOS, eos_token=EOS,
                           pad_token=EOS, unk_token=EOS))


def gpt2_corpus(seed: int, words: int = 150_000, line: int = 50) -> List[str]:
    """Random lower-case words: enough distinct pairs for a byte-level BPE to reach GPT-2's 50257 tokens."""
    import random
    import string
    rng = random.Random(seed)
    tokens = [''.join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(words)]
    return [' '.join(tokens[i:i + line]) for i in range(0, len(tokens), line)]


def check_layout(state: dict, name: str) -> None:
    """The written state dict has exactly the keys and shapes of the official checkpoint (tests/fixtures)."""
    from libs.caption_decoder import LEGACY_BUFFER
    with open(os.path.join(ROOT, 'tests', 'fixtures', f'{name}.keys.json'), encoding='utf-8') as f:
        official = {k: list(v) for k, v in json.load(f).items()
                    if not LEGACY_BUFFER.fullmatch(k.removeprefix('module.'))}
    written = {k: list(v.shape) for k, v in state.items()}
    if written != official:
        diff = sorted(set(written) ^ set(official))[:5]
        wrong = [k for k in set(written) & set(official) if written[k] != official[k]][:5]
        raise AssertionError(f'{name}: written layout differs from the official one (keys {diff}, shapes {wrong})')


def write_full_components(config, root: str, seed: int) -> dict:
    """Random full-size components at the config's paths, each checked against the official layout; {name: info}."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from libs.autoencoder import FrozenAutoencoderKL, ldm_state_dict_from_diffusers
    from libs.caption_decoder import (CHECKPOINT_PREFIX, CaptionDecoder, build_tiny_gpt2_tokenizer,
                                      load_gpt2_tokenizer, save_official_layout)
    from libs.clip_encoders import build_tiny_clip_vision
    info = {}
    torch.manual_seed(seed)
    text_dir = config.clip_text.name_or_path
    clip_bpe_files(text_dir, CLIP_TEXT['vocab_size'], CLIP_TEXT['max_position_embeddings'])
    tokenizer = CLIPTokenizer.from_pretrained(text_dir)
    text = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text.save_pretrained(text_dir)
    info['clip_text'] = dict(params=sum(p.numel() for p in text.parameters()), tokens=len(tokenizer))
    del text
    build_tiny_clip_vision(config.clip_img.name_or_path, seed=seed + 1, **CLIP_IMAGE)
    info['clip_img'] = dict(**CLIP_IMAGE)

    cd = config.caption_decoder
    build_tiny_gpt2_tokenizer(gpt2_corpus(seed), cd.tokenizer, vocab_size=GPT2_VOCAB)
    decoder = CaptionDecoder(cd, load_gpt2_tokenizer(cd.tokenizer, cd.gpt2.vocab_size, local_files_only=True))
    check_layout({CHECKPOINT_PREFIX + k: v for k, v in decoder.state_dict().items()}, 'caption_decoder')
    save_official_layout(decoder, cd.pretrained_path)
    info['caption_decoder'] = dict(params=sum(p.numel() for p in decoder.parameters()))
    del decoder

    vae = ldm_state_dict_from_diffusers(FrozenAutoencoderKL(config.autoencoder).vae.state_dict())
    check_layout(vae, 'autoencoder_kl')
    save_torch(vae, config.autoencoder.pretrained_path)
    info['autoencoder'] = dict(params=sum(v.numel() for v in vae.values()))
    del vae
    return info


def write_components(r: Rehearsal) -> dict:
    """Every component the stages read, plus the reduced-depth U-ViT of the full fine-tuning step."""
    import torch

    from libs.tiny_models import make_tiny_models
    config = load_config(r)
    os.makedirs(r.components, exist_ok=True)
    if r.size == 'tiny':
        make_tiny_models(config, seed=SEED)  # also writes the v1 U-ViT (config.nnet_path)
        info = {}
    else:
        info = write_full_components(config, r.components, SEED)
        v1 = config.nnet.copy_and_resolve_references()
        v1.name = 'uvit_multi_post_ln_v1'
        info['uvit_v1'] = dict(params=write_uvit(v1, config.nnet_path, SEED + 3))
        check_layout(torch.load(config.nnet_path, map_location='meta', weights_only=True), 'uvit_v1')
    reduced = config.nnet.copy_and_resolve_references()
    reduced.update(name='uvit_multi_post_ln_v1', depth=min(r.full_depth, config.nnet.depth))
    info['uvit_v1_reduced'] = dict(depth=reduced.depth, params=write_uvit(reduced, reduced_path(r, reduced.depth),
                                                                          SEED + 5))
    return info


def reduced_path(r: Rehearsal, depth: int) -> str:
    return os.path.join(r.components, f'uvit_v1_depth{depth}.pth')


# ----------------------------------------------------------------------------------------------------------------
# Running and measuring processes
# ----------------------------------------------------------------------------------------------------------------

def child_env() -> dict:
    """The scripts' environment: offline, idle OpenMP threads sleep (a shared machine), the repository importable."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    return env


def _wait(pid: int, start: float, poll: Optional[Callable[[], bool]] = None, on_poll=None):
    """Wait for pid (calling on_poll(pid) once whenever poll() turns true); returns (exit code, Usage)."""
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG if poll else 0)
        if done:
            break
        if poll():
            on_poll(pid)
            poll = None
        else:
            time.sleep(POLL_S)
    return os.waitstatus_to_exitcode(status), Usage(round(time.monotonic() - start, 1),
                                                    round(usage.ru_utime + usage.ru_stime, 1),
                                                    round(usage.ru_maxrss / 2 ** 20, 2))


def run_command(args: List[str], log: str, poll=None, on_poll=None, expect=(0,)) -> Usage:
    """Run a script of the repository (python args...) with its output in `log`; StageFailed unless rc in expect."""
    cmd = [sys.executable, *args]
    os.makedirs(os.path.dirname(log), exist_ok=True)
    logger.info('$ %s', shlex.join(['python', *args]))
    with open(log, 'ab') as out:
        out.write(f'$ {shlex.join(cmd)}\n'.encode())
        out.flush()
        start = time.monotonic()
        # Popen only starts it: the exit status and the rusage come from os.wait4 (per process, not cumulative).
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        rc, usage = _wait(proc.pid, start, poll, on_poll)
        proc.returncode = rc
    if rc not in expect:
        raise StageFailed(f'`{shlex.join(["python", *args])}` exited {rc}; its output: {log}')
    return usage


def run_forked(fn: Callable[[], dict], log: str) -> (Usage, dict):
    """Run fn() in a forked child (so its CPU time and peak RSS are its own) and return its usage and result."""
    from libs.io import atomic_write_json
    os.makedirs(os.path.dirname(log), exist_ok=True)
    result_path = log + '.result.json'
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: output to the log, result to a file, never back into the caller's code
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)
            atomic_write_json(result_path, fn())
            code = 0
        except BaseException:  # noqa: B036 — report anything, then leave without running the parent's handlers
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    rc, usage = _wait(pid, start)
    if rc:
        raise StageFailed(f'{fn.__name__} failed (exit {rc}); its output: {log}')
    with open(result_path, encoding='utf-8') as f:
        return usage, json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Stages: each returns rows (what, Usage) and a summary
# ----------------------------------------------------------------------------------------------------------------

def stage_components(r: Rehearsal):
    usage, info = run_forked(lambda: write_components(r), r.path('logs', 'components.log'))
    return [('write random components in the official layouts', usage)], info


def resolution(config) -> int:
    """Face size in pixels: the latent size times the codec's downsampling."""
    return config.z_shape[-1] * 2 ** (len(config.autoencoder.block_out_channels) - 1)


def write_data(r: Rehearsal) -> dict:
    from libs.avamerg import is_validation
    from libs.synthetic import make_dataset
    config = load_config(r)
    splits = make_dataset(r.path('data'), SEED, DIALOGUES, TEST_DIALOGUES, size=resolution(config))
    held_out = [d['conversation_id'] for d in splits['train'] if is_validation(d['conversation_id'],
                                                                                 config.data.val_fraction)]
    if not held_out:
        raise UserError(f'no synthetic conversation is held out at val_fraction={config.data.val_fraction}')
    return dict(resolution=resolution(config), dialogues=DIALOGUES, test_dialogues=TEST_DIALOGUES, val=held_out)


def stage_data(r: Rehearsal):
    usage, info = run_forked(lambda: write_data(r), r.path('logs', 'data.log'))
    return [(f'synthetic AvaMERG at {info["resolution"]}²', usage)], info


def stage_extract(r: Rehearsal):
    rows = []
    for split, limit in EXTRACT_LIMIT.items():
        usage = run_command(['extract_features.py', *config_flags(r), f'--split={split}', f'--limit={limit}'],
                            r.path('logs', f'extract_{split}.log'))
        rows.append((f'extract_features.py --split={split}: {limit} pairs, encoder batch {ENCODER_BATCH}', usage))
    return rows, {}


def checkpoint_exists(run_dir: str, step: int) -> Callable[[], bool]:
    """Whether train_empath.py has published ckpts/<step>.ckpt (it renames a finished temp folder into place)."""
    return lambda: os.path.isdir(os.path.join(run_dir, 'ckpts', f'{step}.ckpt'))


def stage_lora(r: Rehearsal):
    """LoRA fine-tune, 2 steps: SIGKILL once step 1's checkpoint exists, then resume to the end."""
    run_dir = r.path('workdir', 'lora')
    args = ['train_empath.py', *config_flags(r, name='lora', **{'train.lora.enabled': True})]
    log = r.path('logs', 'train_lora.log')
    killed = run_command(args, log, poll=checkpoint_exists(run_dir, 1),
                         on_poll=lambda pid: os.kill(pid, signal.SIGKILL), expect=(-signal.SIGKILL, 0))
    with open(os.path.join(run_dir, 'log.txt'), encoding='utf-8') as f:
        before = f.read()
    resumed = run_command(args, log)
    with open(os.path.join(run_dir, 'log.txt'), encoding='utf-8') as f:
        after = f.read()[len(before):]
    if 'resumed from step 1' not in after:
        raise StageFailed(f'the restarted LoRA run did not resume from step 1; see {run_dir}/log.txt')
    return [('train_empath.py LoRA (checkpointing), killed (SIGKILL) after step 1', killed),
            ('train_empath.py LoRA, resumed from step 1 to step 2', resumed)], dict(export=r.export('lora'))


def stage_full(r: Rehearsal):
    config = load_config(r)
    depth = min(r.full_depth, config.nnet.depth)
    usage = run_command(['train_empath.py', *config_flags(r, name='full', **{
        'train.n_steps': 1, 'train.val_every': 1, 'nnet.depth': depth, 'train.init_from': reduced_path(r, depth)})],
        r.path('logs', 'train_full.log'))
    return [(f'train_empath.py full fine-tune, 1 step, depth {depth} of {config.nnet.depth}', usage)], \
        dict(depth=depth)


def speaker_face(r: Rehearsal) -> str:
    """A speaker face of the synthetic test split."""
    folder = r.path('data', 'test', 'image_v5_0')
    return os.path.join(folder, sorted(os.listdir(folder))[0])


PROMPT = 'I lost my job today and I do not know what to do.'


def stage_sample(r: Rehearsal):
    from libs.modes import MODE_INPUTS
    rows, face = [], speaker_face(r)
    inputs = {'prompt': [f'--prompt={PROMPT}'], 'img': [f'--img={face}'],
              'speaker': [f'--prompt={PROMPT}', f'--img={face}']}
    unknown = [m for m in r.modes if m not in MODE_INPUTS]
    if unknown:
        raise UserError(f'--modes: unknown {unknown}; choose from {",".join(MODE_INPUTS)}')
    for mode in r.modes or MODE_INPUTS:
        needs = MODE_INPUTS[mode]
        args = [a for need in needs for a in inputs[need]]
        usage = run_command(['sample_multi.py', *config_flags(r), f'--nnet_path={r.export(r.network)}',
                             f'--mode={mode}', f'--output_path={r.path("samples")}', *args],
                            r.path('logs', f'sample_{mode}.log'))
        rows.append((f'sample_multi.py --mode={mode}, {SAMPLE_STEPS} NFE, {r.network} export', usage))
    return rows, {}


def stage_eval(r: Rehearsal):
    usage = run_command(['eval_avamerg.py', *config_flags(r), f'--nnet_path={r.export(r.network)}',
                         f'--features={r.path("features", "test")}', f'--limit={EVAL_PAIRS}',
                         f'--batch_size={EVAL_PAIRS}', '--skip_fid', f'--output_path={r.path("eval")}'],
                        r.path('logs', 'eval.log'))
    return [(f'eval_avamerg.py, {EVAL_PAIRS} pairs, {SAMPLE_STEPS} NFE, {r.network} export (no FID: no Inception '
             'weights)', usage)], {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def serves(url: str) -> Callable[[], bool]:
    """Whether the page at url answers 200 (checked once per call)."""
    def check():
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status == 200 and b'gradio' in response.read().lower()
        except OSError:
            return False
    return check


def stage_app(r: Rehearsal):
    """app.py on the fine-tuned network: started, its page fetched once it serves, then stopped (SIGTERM)."""
    port = free_port()
    url, served, deadline = f'http://127.0.0.1:{port}/', [], time.monotonic() + APP_TIMEOUT_S
    check = serves(url)

    def up():
        if time.monotonic() > deadline:
            return True
        return check()

    def stop(pid):
        served.append(check())
        os.kill(pid, signal.SIGTERM)

    usage = run_command(['app.py', *config_flags(r), f'--nnet_path={r.export(r.network)}', '--host=127.0.0.1',
                         f'--port={port}'], r.path('logs', 'app.log'), poll=up, on_poll=stop,
                        expect=(0, -signal.SIGTERM, 128 + signal.SIGTERM))
    if not served or not served[0]:
        raise StageFailed(f'app.py did not serve {url} within {APP_TIMEOUT_S} s; see {r.path("logs", "app.log")}')
    return [(f'app.py on the {r.network} export: start, serve the page on 127.0.0.1, stop', usage)], dict(url=url)


def stage_outputs(r: Rehearsal, name: str) -> List[str]:
    """What a stage writes (besides its log), cleared before it runs: a rerun starts from nothing, never from a
    previous run's checkpoints, features or evaluation folder (which the scripts would resume or refuse to mix)."""
    from libs.modes import MODE_INPUTS
    return {
        'components': [r.components],
        'data': [r.path('data')],
        'extract': [r.path('features')],
        'lora': [r.path('workdir', 'lora')],
        'full': [r.path('workdir', 'full')],
        'eval': [r.path('eval')],
        'app': [],
        'sample': [r.path('samples', mode) for mode in r.modes or MODE_INPUTS],
    }[name]


STAGES = {
    'components': stage_components,
    'data': stage_data,
    'extract': stage_extract,
    'lora': stage_lora,
    'full': stage_full,
    'eval': stage_eval,
    'app': stage_app,
    'sample': stage_sample,  # the longest (one process per mode) last, so a partial run has run every script
}


# ----------------------------------------------------------------------------------------------------------------
# Driver and report
# ----------------------------------------------------------------------------------------------------------------

def marker(r: Rehearsal, name: str) -> str:
    return r.path('stages', f'{name}.json')


def run(r: Rehearsal, stages=tuple(STAGES), rerun: bool = False) -> str:
    """Run the named stages in order (finished ones skipped unless rerun) and write the table; returns its path."""
    from libs.io import atomic_write_json
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f'--stages: unknown {unknown}; choose from {",".join(STAGES)}')
    if r.size not in SIZES:
        raise UserError(f'--size={r.size!r}; choose one of {tuple(SIZES)}')
    if r.network not in NETWORKS:
        raise UserError(f'--network={r.network!r}; choose one of {NETWORKS}')
    os.makedirs(r.path('stages'), exist_ok=True)
    for name in STAGES:
        if name not in stages or (os.path.isfile(marker(r, name)) and not rerun):
            continue
        logger.info('stage %s', name)
        # The marker goes first: a stage that fails after its outputs were cleared is not reported as finished.
        for path in [marker(r, name), *stage_outputs(r, name)]:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        rows, info = STAGES[name](r)
        atomic_write_json(marker(r, name), dict(stage=name, size=r.size, info=info, finished=time.strftime(
            '%Y-%m-%d %H:%M:%S UTC', time.gmtime()), rows=[dict(what=w, **dataclasses.asdict(u)) for w, u in rows]))
        for what, u in rows:
            logger.info('%s: %.1f s wall, %.1f s CPU, peak RSS %.2f GiB', what, u.wall_s, u.cpu_s, u.peak_rss_gb)
    return write_table(r)


def machine() -> str:
    """CPU model and core count, and the memory of this machine."""
    model = 'unknown CPU'
    if os.path.isfile('/proc/cpuinfo'):
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30
    return f'{model}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB'


def write_table(r: Rehearsal) -> str:
    """<out>/rehearsal.md: one row per measured process of every finished stage."""
    from libs.io import atomic_write_bytes
    lines = [f'Size: {r.size}. Machine: {machine()}.', '',
             '| stage | what ran | wall s | CPU s | peak RSS GiB | finished |', '|---|---|---:|---:|---:|---|']
    for name in STAGES:
        if not os.path.isfile(marker(r, name)):
            continue
        with open(marker(r, name), encoding='utf-8') as f:
            record = json.load(f)
        for row in record['rows']:
            lines.append(f'| {name} | {row["what"]} | {row["wall_s"]:.0f} | {row["cpu_s"]:.0f} | '
                         f'{row["peak_rss_gb"]:.2f} | {record["finished"]} |')
    path = r.path(TABLE)
    atomic_write_bytes(path, ('\n'.join(lines) + '\n').encode('utf-8'))
    return path
