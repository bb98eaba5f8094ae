"""The GPU check: full-size throughput and memory of every stage on a lent GPU, offline, in under 8 minutes.

It builds the rehearsal's random full-size components (libs/rehearsal.py) and measures, with the project's own code:
extraction pairs/s (extract_features.py), training samples/s and peak memory for full fine-tuning and LoRA
(train_empath.py, bf16 autocast, gradient checkpointing), every sampling mode's s/sample and peak memory at the
config's 50 NFE and caption decoding (libs.pipeline, as sample_multi.py runs it, the components loaded once),
and evaluation s/pair (eval_avamerg.py). The table goes between MARKERS in BENCHMARKS.md with the card's name.
A measurement that would start after the time budget is listed as skipped. With ``size='tiny'`` and a CPU it runs
the same code in seconds (the test suite does).
"""
import dataclasses
import json
import os
import re
import statistics
import subprocess
import threading
import time
from typing import List, Optional

from libs import rehearsal
from libs.errors import UserError

MARKERS = ('<!-- gpu-check:begin -->', '<!-- gpu-check:end -->')


@dataclasses.dataclass
class Settings:
    """What one check measures; full size by default, the test suite's tiny values via ``tiny()``."""
    size: str = 'full'
    budget_s: float = 480.        # the brief's 8 minutes: nothing new starts after it
    extract_pairs: int = 64       # pairs timed by extract_features.py
    extract_batch: int = 8        # pairs per encoder batch (16 faces at 512² in one VAE call)
    train_batch: int = 8          # pairs per training step, as the memory estimate's second batch size
    train_steps: int = 4          # timed steps after the first (which builds AdamW's states)
    sample_steps: int = 50        # NFE: the config's default
    eval_pairs: int = 4
    caption_batch: int = 8

    @classmethod
    def tiny(cls):
        # No budget to speak of: on a CPU the budget is not what is tested, and a loaded machine is slow.
        return cls(size='tiny', budget_s=3600., extract_pairs=4, extract_batch=2, train_batch=2, train_steps=2,
                   sample_steps=2, eval_pairs=2, caption_batch=2)


@dataclasses.dataclass
class Row:
    figure: str
    value: str
    peak_gb: Optional[float] = None
    note: str = ''


class GpuMemoryWatch:
    """Peak GPU memory of one process as nvidia-smi reports it (what the driver holds: allocator reserve, context)."""

    def __init__(self, pid: int, period: float = 0.2):
        self.pid, self.period, self.peak_mib, self._stop = pid, period, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(['nvidia-smi', '--query-compute-apps=pid,used_memory', '--format=csv,noheader,'
                                      'nounits'], capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in out.splitlines():
                pid, _, used = line.partition(',')
                if pid.strip() == str(self.pid) and used.strip().isdigit():
                    self.peak_mib = max(self.peak_mib, int(used))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_measured(args: List[str], log: str, cuda: bool):
    """rehearsal.run_command plus, on a GPU, the process's peak GPU memory (GiB; None on a CPU)."""
    if not cuda:
        return rehearsal.run_command(args, log), None
    watch = {}

    def start(pid):
        watch['w'] = GpuMemoryWatch(pid).__enter__()

    usage = rehearsal.run_command(args, log, poll=lambda: True, on_poll=start)
    if 'w' in watch:
        watch['w'].__exit__()
        return usage, watch['w'].peak_mib / 1024
    return usage, None


def extraction(r, s: Settings, cuda: bool) -> List[Row]:
    """extract_features.py on the train split; its own pairs/s (encoding only, after loading)."""
    log = r.path('logs', 'extract_train.log')
    flags = rehearsal.config_flags(r, **{'data.batch_size': s.extract_batch})
    usage, peak = run_measured(['extract_features.py', *flags, '--split=train', f'--limit={s.extract_pairs}'], log,
                               cuda)
    for split in ('val', 'test'):  # what training validates on and evaluation reads
        rehearsal.run_command(['extract_features.py', *rehearsal.config_flags(r), f'--split={split}',
                               f'--limit={s.eval_pairs}'], r.path('logs', f'extract_{split}.log'))
    with open(log, encoding='utf-8') as f:  # extract_features.py's own count and time (encoding only, no loading)
        encoded = re.findall(r'encoded (\d+) pairs in ([\d.]+) s', f.read())
    count, seconds = (int(encoded[-1][0]), float(encoded[-1][1])) if encoded else (0, 0.)
    # The log rounds to 0.1 s: a few tiny pairs can take less, and then there is no rate to state.
    rate = (f'{count / seconds:.3g} pairs/s' if seconds > 0 else f'{count} pairs in under 0.1 s') if encoded \
        else 'no rate logged'
    return [Row(f'feature extraction, {s.extract_pairs} pairs, encoder batch {s.extract_batch}', rate,
                peak if cuda else usage.peak_rss_gb,
                f'{usage.wall_s:.0f} s with loading')]


def training(r, s: Settings, cuda: bool, method: str) -> List[Row]:
    """train_empath.py at full depth: samples/s from the median logged step time after the first step."""
    steps = s.train_steps + 1
    extra = {'name': f'gpu_{method}', 'train.batch_size': s.train_batch, 'train.n_steps': steps,
             'train.val_every': steps, 'train.ckpt_every': steps, 'train.lora.enabled': method == 'lora'}
    usage, peak = run_measured(['train_empath.py', *rehearsal.config_flags(r, **extra)],
                               r.path('logs', f'train_{method}.log'), cuda)
    with open(r.path('workdir', f'gpu_{method}', 'metrics.jsonl'), encoding='utf-8') as f:
        times = [rec['sec_per_step'] for rec in map(json.loads, f) if 'loss' in rec and rec['step'] > 1]
    rate = s.train_batch / statistics.median(times) if times else float('nan')
    return [Row(f'training, {"LoRA" if method == "lora" else "full fine-tune"}, batch {s.train_batch}, '
                f'{"bf16" if cuda else "fp32"}, checkpointing', f'{rate:.2f} samples/s',
                peak if cuda else usage.peak_rss_gb, f'median of {len(times)} steps')]


def sample_modes(r, s: Settings, nnet_path: str) -> dict:
    """Every mode once after a warm-up, the components loaded once (in a child process); {mode: (s, peak GiB)}."""
    import torch

    from libs import modes, pipeline
    from libs.io import read_rgb
    config = rehearsal.load_config(r)
    config.sample.sample_steps = s.sample_steps
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    comp = pipeline.load_components(config, device, nnet_path)
    image, prompt = read_rgb(rehearsal.speaker_face(r)), rehearsal.PROMPT
    result = {}
    for mode in ('joint', *modes.MODES):  # the first joint is the warm-up (kernels, allocator)
        ctx = pipeline.make_context(comp, torch.Generator(device).manual_seed(config.seed))
        if device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        needs = set(modes.MODE_INPUTS[mode])  # as sample_multi.py passes them: only the inputs the mode reads
        tic = time.perf_counter()
        pipeline.generate(comp, ctx, mode, 1, prompt=prompt if {'prompt', 'speaker'} & needs else None,
                          image=image if {'img', 'speaker'} & needs else None)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        result[mode] = (time.perf_counter() - tic, pipeline.peak_memory_gb(device))
    features = torch.randn(s.caption_batch, config.num_text_tokens, config.text_dim, device=device)
    comp.caption_decoder.generate_captions(features[:1])  # warm-up
    tic = time.perf_counter()
    comp.caption_decoder.generate_captions(features)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    result['captions'] = ((time.perf_counter() - tic) / s.caption_batch, pipeline.peak_memory_gb(device))
    return result


def sampling(r, s: Settings, nnet_path: str) -> List[Row]:
    _, timed = rehearsal.run_forked(lambda: sample_modes(r, s, nnet_path), r.path('logs', 'sample_modes.log'))
    rows = [Row(f'sampling, {mode}, {s.sample_steps} NFE, batch 1', f'{sec:.2f} s/sample', peak)
            for mode, (sec, peak) in timed.items() if mode != 'captions']
    sec, peak = timed['captions']
    rows.append(Row(f'caption decoding, batch {s.caption_batch}, 5 beams', f'{1000 * sec:.0f} ms/sample', peak))
    return rows


def evaluation(r, s: Settings, cuda: bool, nnet_path: str) -> List[Row]:
    out = r.path('eval')
    flags = rehearsal.config_flags(r, **{'sample.sample_steps': s.sample_steps})
    usage, peak = run_measured(['eval_avamerg.py', *flags, f'--nnet_path={nnet_path}',
                                f'--features={r.path("features", "test")}', f'--limit={s.eval_pairs}', f'--batch_size={s.eval_pairs}', '--skip_fid',
                                f'--output_path={out}'], r.path('logs', 'eval.log'), cuda)
    with open(os.path.join(out, 'metrics.json'), encoding='utf-8') as f:
        per_pair = json.load(f)['seconds_per_pair']
    return [Row(f'evaluation, {s.eval_pairs} pairs, batch {s.eval_pairs}, {s.sample_steps} NFE, no FID',
                f'{per_pair:.2f} s/pair', peak if cuda else usage.peak_rss_gb)]


def device_name(cuda: bool) -> str:
    import torch
    return torch.cuda.get_device_name(0) if cuda else f'CPU ({rehearsal.machine()})'


def check(out: str, s: Settings, cuda: bool) -> List[Row]:
    """Components and data, then every measurement while the budget lasts; skipped ones get a row saying so."""
    start = time.monotonic()
    r = rehearsal.Rehearsal(out, s.size)
    for name in ('components', 'data'):
        if not os.path.isfile(rehearsal.marker(r, name)):
            rehearsal.run(r, (name,))
    nnet_path = r.export('gpu_lora')
    plan = [('feature extraction', lambda: extraction(r, s, cuda)),
            ('training, LoRA', lambda: training(r, s, cuda, 'lora')),
            ('training, full fine-tune', lambda: training(r, s, cuda, 'full')),
            ('sampling and caption decoding', lambda: sampling(r, s, nnet_path)),
            ('evaluation', lambda: evaluation(r, s, cuda, nnet_path))]
    rows = []
    for what, measure in plan:
        if time.monotonic() - start > s.budget_s:
            rows.append(Row(what, 'skipped', note=f'the {s.budget_s:.0f} s budget was spent'))
            continue
        rows.extend(measure())
    return rows


def table(rows: List[Row], device: str, seconds: float, size: str) -> str:
    """The markdown that goes between the markers."""
    import torch
    lines = [f'{time.strftime("%Y-%m-%d", time.gmtime())}, **{device}**, torch {torch.__version__}, '
             f'random {size}-size components, `scripts/gpu_check.py` ({seconds:.0f} s in all). Peak memory: on a GPU '
             'what nvidia-smi showed for the process (scripts) or `torch.cuda.max_memory_allocated` (sampling); on a '
             'CPU the peak RSS.', '', '| figure | measured | peak memory GiB | note |', '|---|---|---:|---|']
    lines += [f'| {row.figure} | {row.value} | {"" if row.peak_gb is None else f"{row.peak_gb:.2f}"} | {row.note} |'
              for row in rows]
    return '\n'.join(lines)


def write_between_markers(path: str, body: str) -> None:
    """Replace what lies between MARKERS in the file (atomically); UserError if the markers are missing."""
    from libs.io import atomic_write_bytes
    with open(path, encoding='utf-8') as f:
        text = f.read()
    begin, end = (text.find(m) for m in MARKERS)
    if begin < 0 or end < begin:
        raise UserError(f'{path} has no {MARKERS[0]} ... {MARKERS[1]} block for the GPU table; add the two lines '
                        'where the table belongs')
    atomic_write_bytes(path, (text[:begin + len(MARKERS[0])] + '\n' + body + '\n' + text[end:]).encode('utf-8'))
