"""Measure sampling speed per mode, precision and batch, U-ViT forwards and caption decoding; prints markdown tables.

    python scripts/benchmark.py --size=mid          # a CPU: fp32 vs auto, batch 1 and 4 (minutes on a quiet 2-core CPU)
    OMP_NUM_THREADS=1 python scripts/benchmark.py --size=mid --clock=process    # the same on a shared CPU
    python scripts/benchmark.py --size=full         # one GPU, < 8 min: every mode, 512², 50 NFE, bf16, batch 1 and 4
    python scripts/benchmark.py --size=mid --compile --modes=t2i --batches=1   # torch.compile (config.nnet.compile)
    python scripts/benchmark.py --size=mid --profile --batches=4   # the U-ViT against a plain SDPA transformer

Sizes: ``tiny`` (the test components), ``mid`` (d 512, depth 12, 256 image tokens, 77 text tokens) and ``full``
(UniDiffuser-v1, 952M). Random weights: timing does not depend on them. UniDiffuser modes run the plain v1 network,
EmpathDiffuser modes the conditional one. A sample's time covers the speaker path (computed once per sample) and the
diffusion loop; encoders, the VAE decoder and caption decoding are timed apart. Each figure is the median of
``--repeats`` runs after a one-step warm-up, the precisions timed in turns; with ``--compile`` the compiled graphs
are dropped before each mode and batch, so the warm-up includes the compile a fresh ``sample_multi.py`` run pays.
Run on a CPU, it ends with one line per full-size GPU figure still unmeasured.
"""
import datetime
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'configs')]

from absl import flags  # noqa: E402

from libs import cli  # noqa: E402

FLAGS = flags.FLAGS
MID = dict(img_size=32, embed_dim=512, depth=12, num_heads=8)  # 16x16 = 256 image tokens with 2x2 patches
# Targets of the issues for full-size GPU figures (s/sample at bf16, 50 NFE); the other figures have none yet.
GPU_TARGETS = {('joint', 1): 1.0, ('empath', 1): 0.8}
CAPTION_TARGET_S = 0.05


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------

def sync(device):
    """Wait for queued GPU work so wall-clock times are real."""
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """CPU seconds of this process and of the children it waited for (the compiler torch.compile runs)."""
    children = os.times()
    return time.process_time() + children.children_user + children.children_system


def seconds(fn, device) -> float:
    """Seconds of one fn() call on the --clock (wall, or CPU time)."""
    clock = cpu_seconds if FLAGS.clock == 'process' else time.perf_counter
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def interleaved(fns: dict, device, repeats, warmups: dict = None) -> dict:
    """{key: (warm-up seconds, median seconds)}: each fn warmed up once (by ``warmups[key]`` if given), then the
    repeats taken in turns, so that a shared machine's changing load weighs on every fn alike."""
    first = {k: seconds((warmups or fns)[k], device) for k in fns}
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(seconds(fn, device))
    return {k: (first[k], statistics.median(times[k])) for k in fns}


def timed(fn, device, repeats) -> float:
    """Median seconds of fn() over repeats after one warm-up call."""
    return interleaved({0: fn}, device, repeats)[0][1]


def under(device, dtype, fn):
    """fn run without gradients in the autocast of ``dtype`` (None = fp32)."""
    import torch

    from libs import precision

    def run():
        with torch.no_grad(), precision.autocast(device, dtype):
            return fn()
    return run


class Budget:
    """Wall-clock budget of the whole run; ``spent`` once it is used up (then measurements are skipped and listed)."""

    def __init__(self, minutes):
        self.deadline = None if not minutes else time.monotonic() + 60 * minutes
        self.skipped = []

    def spent(self, what: str) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.skipped.append(what)
            return True
        return False


def machine(device) -> str:
    """Where the numbers come from: date, device, torch, and for a CPU its model, cores, bf16 features and load."""
    import torch

    from libs.precision import cpu_bf16_features
    date = datetime.date.today().isoformat()
    if device.type == 'cuda':
        return f'{date}, {torch.cuda.get_device_name(device)}, torch {torch.__version__}'
    model = platform.processor() or platform.machine()
    if os.path.isfile('/proc/cpuinfo'):
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    bf16 = ', '.join(sorted(cpu_bf16_features())) or 'none'
    return (f'{date}, {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, native bf16: {bf16}, '
            f'torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}')


# ----------------------------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------------------------

def bench_config(size):
    """The config of a size; the U-ViT without gradient checkpointing (inference) and uncompiled unless asked."""
    from common import tiny, unidiffuser
    config = tiny('models/tiny') if size == 'tiny' else unidiffuser('v1')
    if size == 'mid':
        config.nnet.update(**MID)
        config.z_shape = (config.z_shape[0], MID['img_size'], MID['img_size'])
    config.nnet.update(use_checkpoint=False, compile=FLAGS.compile)
    return config


def build_components(config, device, name):
    """pipeline.Components holding a random U-ViT (``name`` = nnet.name) and no encoders."""
    import torch

    from libs import pipeline
    from libs.uvit import build_nnet
    with torch.device(device):  # initialised where it runs: a 952M CPU initialisation takes minutes
        nnet = build_nnet(dict(config.nnet, name=name)).eval().requires_grad_(False)
    if config.nnet.compile:
        pipeline.compile_nnet(nnet)
    return pipeline.Components(config, device, nnet)


def context(comp, precision, steps, seed=0):
    """The sampling context of libs.pipeline at a given precision and step count."""
    import torch

    from libs import pipeline
    comp.config.sample.update(precision=precision, sample_steps=steps)
    return pipeline.make_context(comp, torch.Generator(comp.device).manual_seed(seed))


def random_inputs(config, device, B):
    """Random network-space inputs of every mode for B samples."""
    import torch
    g = torch.Generator(device).manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device)
    return dict(n=B, z=rand(B, *config.z_shape), clip_img=rand(B, 1, config.clip_img_dim),
                text=rand(B, config.num_text_tokens, config.text_dim))


def run_mode(comp, ctx, mode, inputs):
    """One sample batch of a mode as libs.pipeline.generate runs it, minus encoders and decoders."""
    from libs import modes, pipeline
    B = inputs['n']
    inputs = dict(inputs)
    if mode in modes.EMPATH_MODES:
        inputs.update(pipeline.speaker_inputs(comp, ctx, B, inputs['z'][:1], inputs['clip_img'][:1],
                                              inputs['text'][:1], mode=mode))
    return modes.get_mode(mode)(ctx, inputs)


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------

def forward_cases(nets, x, t, dt, cond, cache):
    """(what, fn) for each U-ViT forward measured: plain v1, EmpathDiffuser with the speaker cached or recomputed."""
    v1, empath = nets['v1'].nnet, nets['empath'].nnet
    z, clip_img, text = x['z'], x['clip_img'], x['text']
    return [('v1, no speaker', lambda: v1(z, clip_img, text, t, t, dt)),
            ('empath, speaker cached', lambda: empath(z, clip_img, text, t, t, dt, cond_cache=cache)),
            ('empath, speaker recomputed', lambda: empath(z, clip_img, text, t, t, dt, cond=cond)),
            ('speaker path (encode_condition)', lambda: empath.encode_condition(cond))]


def forward_rows(nets, config, device, precisions, batches, repeats, budget):
    """(what, batch, precision, seconds per row) of every forward case, the precisions timed in turns."""
    import torch

    from libs import precision as P
    rows = []
    for B in batches:
        if budget.spent(f'U-ViT forwards, batch {B}'):
            continue
        x = random_inputs(config, device, B)
        t, dt = torch.full((B,), 500., device=device), torch.ones(B, dtype=torch.long, device=device)
        cond = dict(img=x['z'], clip_img=x['clip_img'], text=x['text'], t_img=t * 0, t_text=t * 0)
        fns, labels = {}, {}
        for name in precisions:
            prec = P.resolve(name, device)
            cache = under(device, prec.dtype, lambda: nets['empath'].nnet.encode_condition(cond))()
            labels[name] = f'{name} ({prec.name})'
            for what, fn in forward_cases(nets, x, t, dt, cond, cache):
                fns[what, name] = under(device, prec.dtype, fn)
        for (what, name), (_, s) in interleaved(fns, device, repeats).items():
            rows.append((what, B, labels[name], s / B))
    return rows


def mode_rows(nets, config, device, modes_, precisions, batches, steps, repeats, budget):
    """Seconds per sample of each mode at each precision (timed in turns) and batch, with the warm-up seconds."""
    import torch

    from libs import modes
    results = {}
    for mode in modes_:
        comp = nets['empath' if mode in modes.EMPATH_MODES else 'v1']
        for B in batches:
            if budget.spent(f'{mode}, batch {B}'):
                continue
            if config.nnet.compile:
                torch._dynamo.reset()  # the warm-ups compile afresh, as a new sample_multi.py run does
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            inputs = random_inputs(config, device, B)
            fns, warmups, outputs, ctxs = {}, {}, {}, {}
            for name in precisions:
                warm_ctx, ctxs[name], outputs[name] = context(comp, name, 1), context(comp, name, steps), []
                fns[name] = sampler_run(comp, ctxs[name], mode, inputs, outputs[name])
                warmups[name] = sampler_run(comp, warm_ctx, mode, inputs, [])
            timings = interleaved(fns, device, repeats, warmups)
            memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None
            for name, (first, s) in timings.items():
                # The first timed run starts from the same seed at every precision: its outputs are comparable.
                results[mode, name, B] = dict(per_sample=s / B, warmup=first, memory=memory,
                                              precision=ctxs[name].autocast_dtype, outputs=outputs[name][0])
    return results


def sampler_run(comp, ctx, mode, inputs, outputs: list):
    """A function running one sample batch of a mode and keeping its outputs in ``outputs``."""
    return lambda: outputs.append(run_mode(comp, ctx, mode, inputs))


def caption_rows(config, device, batches, repeats, budget):
    """Seconds per caption of the batched beam search (5 beams, up to 67 tokens), fp32, random weights."""
    import torch

    from libs.caption_decoder import CaptionDecoder
    cd = config.caption_decoder.to_dict()
    if cd['gpt2']['vocab_size'] <= 0:
        cd['gpt2']['vocab_size'] = 300
    decoder = CaptionDecoder(cd, EosOnlyTokenizer(cd['gpt2']['vocab_size'])).to(device).eval()
    rows = []
    for B in batches:
        if budget.spent(f'caption decoding, batch {B}'):
            continue
        with torch.no_grad():
            prefix = decoder.decode_prefix(torch.randn(B, config.num_text_tokens, config.text_dim, device=device))
            rows.append((B, timed(lambda: decoder.beam_search(prefix), device, repeats) / B))
    return rows


def profile_rows(nets, config, device, precision_name, B, repeats):
    """(what, U-ViT s/row, plain s/row) and per-op self-times (ms per forward) of both, at one precision and batch."""
    import torch

    from torch.profiler import ProfilerActivity, profile

    from libs import precision as P
    from libs.plain_transformer import PlainTransformer
    prec = P.resolve(precision_name, device)
    x = random_inputs(config, device, B)
    t = torch.full((B,), 500., device=device)
    dt = torch.ones(B, dtype=torch.long, device=device)
    cond = dict(img=x['z'], clip_img=x['clip_img'], text=x['text'], t_img=t * 0, t_text=t * 0)
    v1, empath = nets['v1'].nnet, nets['empath'].nnet
    plain = PlainTransformer(v1).to(device).eval().requires_grad_(False)
    L = v1.num_tokens + 1  # + v1's data-type token
    tokens = torch.randn(B, L, v1.embed_dim, device=device)
    with torch.no_grad(), P.autocast(device, prec.dtype):
        cache = empath.encode_condition(cond)
        cases = [('no speaker', lambda: v1(x['z'], x['clip_img'], x['text'], t, t, dt), lambda: plain(tokens)),
                 ('speaker cached', lambda: empath(x['z'], x['clip_img'], x['text'], t, t, dt, cond_cache=cache),
                  lambda: plain(tokens, cache.kv))]
        rows, ops = [], {}
        for what, uvit_fn, plain_fn in cases:
            got = interleaved({'U-ViT': uvit_fn, 'plain': plain_fn}, device, repeats)
            rows.append((what, got['U-ViT'][1] / B, got['plain'][1] / B))
            for name, fn in (('U-ViT', uvit_fn), ('plain', plain_fn)):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(repeats):
                        fn()
                for e in prof.key_averages():
                    ops.setdefault(what, {}).setdefault(e.key, {})[name] = e.self_cpu_time_total / 1e3 / repeats
    return rows, ops


def print_profile(rows, ops, precision_name, B):
    """The per-row comparison and, per case, the ops by U-ViT self-time (those over 1% of its forward)."""
    print(f'| response forward ({precision_name}, batch {B}) | U-ViT s/row | plain SDPA transformer s/row | ratio |')
    print('|---|---|---|---|')
    for what, u, p in rows:
        print(f'| {what} | {u:.4f} | {p:.4f} | {u / p:.3f} |')
    for what, table in ops.items():
        total = sum(v.get('U-ViT', 0) for v in table.values())
        print(f'\n{what}: CPU self-time per forward (ms), ops over 1% of the U-ViT\'s {total:.1f} ms\n')
        print('| op | U-ViT | plain |\n|---|---|---|')
        for op, v in sorted(table.items(), key=lambda kv: -kv[1].get('U-ViT', 0)):
            if v.get('U-ViT', 0) > 0.01 * total:
                print(f'| {op} | {v.get("U-ViT", 0):.2f} | {v.get("plain", 0):.2f} |')


class EosOnlyTokenizer:
    """Stands in for the GPT-2 tokenizer when timing beam search: only the stop token's id is needed."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def convert_tokens_to_ids(self, token):
        return self.vocab_size - 1  # <|EOS|> is the last id, as in the official vocabulary

    def __len__(self):
        return self.vocab_size


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def mode_table(results, modes_, precisions, batches):
    """Markdown: per mode and batch, seconds per sample at each precision, the warm-up and the difference to fp32."""
    from libs.precision import max_relative_difference, name_of
    head = ['mode', 'batch'] + [f'{p} s/sample' for p in precisions] + [f'{p} warm-up s' for p in precisions]
    if len(precisions) == 2:
        head.append(f'{precisions[0]} / {precisions[1]}')
    others = [p for p in precisions if p != 'fp32'] if 'fp32' in precisions else []
    head += [f'{p} max rel. diff to fp32' for p in others]
    if any(r['memory'] is not None for r in results.values()):
        head.append('peak GPU GiB')
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for mode in modes_:
        for B in batches:
            got = [results.get((mode, p, B)) for p in precisions]
            if not any(got):
                continue
            cells = [mode, str(B)]
            cells += [f'{r["per_sample"]:.4f} ({name_of(r["precision"])})' if r else '—' for r in got]
            cells += [f'{r["warmup"]:.2f}' if r else '—' for r in got]
            if len(precisions) == 2:
                cells.append(f'{got[0]["per_sample"] / got[1]["per_sample"]:.2f}' if all(got) else '—')
            ref = results.get((mode, 'fp32', B))
            for p in others:
                r = results.get((mode, p, B))
                cells.append(f'{max_relative_difference(ref["outputs"], r["outputs"]):.2g}' if ref and r else '—')
            if 'peak GPU GiB' in head:
                cells.append(' / '.join(f'{r["memory"]:.2f}' for r in got if r))
            lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def unmeasured_gpu_figures(results, captions, device, size, all_modes, batches):
    """One line per full-size GPU figure this run did not measure."""
    if device.type == 'cuda' and size == 'full':
        measured = {(m, B) for (m, _, B) in results}
        caption_batches = {B for B, _ in captions}
    else:
        measured, caption_batches = set(), set()
    lines = []
    for mode in all_modes:
        for B in (1, 4):
            if (mode, B) not in measured:
                target = GPU_TARGETS.get((mode, B))
                goal = f' (target ≤ {target:g} s)' if target else ''
                lines.append(f'- unmeasured on a GPU: {mode}, full size 512², 50 NFE, bf16, batch {B}, s/sample{goal}')
    for B in (1, 4):
        if B not in caption_batches:
            lines.append(f'- unmeasured on a GPU: caption decoding, batch {B}, s/caption (target ≤ '
                         f'{CAPTION_TARGET_S:g} s batched)')
    return lines


def defaults(size):
    """(modes, precisions, steps, repeats, max_minutes) for a size, each overridden by its flag."""
    from libs import modes
    every = list(modes.MODES)
    chosen = FLAGS.modes or ('all' if size == 'full' else 'joint,t2i,i2t,empath')
    modes_ = every if chosen == 'all' else chosen.split(',')
    for m in modes_:
        modes.get_mode(m)
    precisions = (FLAGS.precisions or ('auto' if size == 'full' else 'fp32,auto')).split(',')
    steps = FLAGS.steps or {'full': 50, 'mid': 10}.get(size)
    repeats = FLAGS.repeats or (1 if size == 'mid' else 3)
    max_minutes = FLAGS.max_minutes if FLAGS.max_minutes is not None else (7.5 if size == 'full' else None)
    return modes_, precisions, steps, repeats, max_minutes


def define_flags():
    """The command line (defined only when run as a script, so importing this module defines no flags)."""
    flags.DEFINE_enum('size', 'mid', ['tiny', 'mid', 'full'], 'tiny test components, the CPU-sized mid U-ViT or the '
                      'full 952M one')
    flags.DEFINE_string('modes', None, "comma-separated sampling modes, or 'all' (default: all at full size, "
                        'joint,t2i,i2t,empath otherwise)')
    flags.DEFINE_string('precisions', None, 'comma-separated config.sample.precision values (default: auto at full '
                        'size, fp32,auto otherwise)')
    flags.DEFINE_string('batches', '1,4', 'comma-separated samples per batch')
    flags.DEFINE_integer('steps', None, 'sampling steps = NFE (default: 50 at full size, 10 at mid, the config at tiny)')
    flags.DEFINE_integer('repeats', None, 'timed runs per measurement, median reported (default: 1 at mid, 3 otherwise)')
    flags.DEFINE_enum('clock', 'wall', ['wall', 'process'], "wall-clock seconds, or this process's CPU seconds: on a "
                      'shared CPU run with OMP_NUM_THREADS=1 --clock=process, which other jobs barely change (with '
                      '--compile also TORCHINDUCTOR_COMPILE_THREADS=1, so that the compile runs where it is counted)')
    flags.DEFINE_boolean('compile', False, 'torch.compile the U-ViTs (libs.pipeline.compile_nnet)')
    flags.DEFINE_boolean('forward_only', False, 'time only U-ViT forwards (full size on a CPU takes seconds each)')
    flags.DEFINE_boolean('profile', False, 'profile the response forward against a plain SDPA transformer of the same '
                         'size (then nothing else is measured)')
    flags.DEFINE_float('max_minutes', None, 'stop measuring after this long and list what was skipped (default: 7.5 '
                       'at full size, none otherwise)')


def main(argv):
    del argv
    import torch

    from libs import modes, pipeline, precision
    from libs.errors import UserError
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    modes_, precisions, steps, repeats, max_minutes = defaults(FLAGS.size)
    if FLAGS.clock == 'process' and device.type == 'cuda':
        raise UserError('--clock=process counts CPU time, not GPU work: use the default --clock=wall on a GPU')
    if FLAGS.size == 'full' and device.type != 'cuda' and not (FLAGS.forward_only or FLAGS.profile):
        raise UserError('--size=full samples for hours on a CPU: add --forward_only, or use --size=mid')
    for name in precisions:
        precision.resolve(name, device)  # a wrong name fails before anything is built
    batches = [int(b) for b in FLAGS.batches.split(',')]
    config = bench_config(FLAGS.size)
    steps = steps or config.sample.sample_steps
    nets = {'v1': build_components(config, device, 'uvit_multi_post_ln_v1'),
            'empath': build_components(config, device, 'uvit_empath')}
    budget, started = Budget(max_minutes), time.monotonic()
    params = sum(p.numel() for p in nets['empath'].nnet.parameters()) / 1e6
    print(f'\n{FLAGS.size} U-ViT ({params:.1f}M parameters with the EmpathDiffuser additions, '
          f'{config.nnet.embed_dim} wide, depth {config.nnet.depth}), {machine(device)}'
          f'{", torch.compile" if FLAGS.compile else ""}, {FLAGS.clock} seconds\n')
    if FLAGS.profile:
        for name in precisions:
            print_profile(*profile_rows(nets, config, device, name, batches[-1], repeats), name, batches[-1])
            print()
        return
    fwd = forward_rows(nets, config, device, precisions, batches, repeats, budget)
    print('| U-ViT forward | batch | precision | s/row |\n|---|---|---|---|')
    for what, B, name, s in fwd:
        print(f'| {what} | {B} | {name} | {s:.4f} |')
    results, captions = {}, []
    if not FLAGS.forward_only:
        results = mode_rows(nets, config, device, modes_, precisions, batches, steps, repeats, budget)
        print(f'\nPer sample, {steps} NFE, guidance scale {config.sample.scale:g}, median of {repeats}; warm-up = '
              f'a first 1-step run{" (includes the compile)" if FLAGS.compile else ""}:\n')
        print(mode_table(results, modes_, precisions, batches))
        captions = caption_rows(config, device, batches, repeats, budget)
        print('\n| caption decoding (5 beams, <= 67 tokens, fp32) | s/caption |\n|---|---|')
        for B, s in captions:
            print(f'| batch {B} | {s:.4f} |')
    print(f'\n{time.monotonic() - started:.0f} s in all, peak {"GPU" if device.type == "cuda" else "resident"} '
          f'memory {pipeline.peak_memory_gb(device):.2f} GiB'
          + ('' if device.type == 'cuda' else f', load average at the end {os.getloadavg()[0]:.1f}'))
    for what in budget.skipped:
        print(f'- skipped (the {max_minutes:g}-minute budget was spent): {what}')
    gaps = unmeasured_gpu_figures(results, captions, device, FLAGS.size, list(modes.MODES), batches)
    if gaps:
        print('\n' + '\n'.join(gaps))


if __name__ == '__main__':
    define_flags()
    cli.run(main)
