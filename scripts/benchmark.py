"""Measure the U-ViT, the sampling modes and caption decoding; prints a markdown table for BENCHMARKS.md.

    python scripts/benchmark.py --size=tiny                       # CPU, seconds
    python scripts/benchmark.py --size=full --modes=joint,empath  # one GPU: bf16, 50 NFE, batch 1

Random weights (timing does not depend on them). Per-sample times cover the diffusion loop only; encoders, the
VAE decoder and caption decoding are timed separately. Every number is a median over ``--repeats`` runs after
one warm-up.
"""
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'configs')]

import torch  # noqa: E402
from absl import flags  # noqa: E402

from libs import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum('size', 'tiny', ['tiny', 'full'], 'tiny test components or the full 952M U-ViT')
flags.DEFINE_string('modes', 'joint,t2i,i2t,empath', 'comma-separated sampling modes to time per sample')
flags.DEFINE_integer('steps', None, 'sampling steps (default: the config, 50 for full)')
flags.DEFINE_integer('batch', 1, 'samples per batch')
flags.DEFINE_integer('repeats', 3, 'timed repetitions (median reported)')
flags.DEFINE_boolean('forward_only', False, 'time only U-ViT forwards (full size on a CPU takes seconds each)')


def sync(device):
    """Wait for queued GPU work so wall-clock times are real."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Median seconds of fn() over repeats after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine(device):
    """A one-line description of where the numbers come from."""
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}'
    return f'{platform.processor() or platform.machine()} CPU x{os.cpu_count()}, torch {torch.__version__}'


class EosOnlyTokenizer:
    """Stands in for the GPT-2 tokenizer when timing beam search: only the stop token's id is needed."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def convert_tokens_to_ids(self, token):
        return self.vocab_size - 1  # <|EOS|> is the last id, as in the official vocabulary

    def __len__(self):
        return self.vocab_size


def time_caption_decoding(config, device, batch, repeats):
    """Seconds per caption of the batched beam search (5 beams, up to 67 tokens) on random weights."""
    from libs.caption_decoder import CaptionDecoder
    cd = config.caption_decoder.to_dict()
    if cd['gpt2']['vocab_size'] <= 0:
        cd['gpt2']['vocab_size'] = 300
    decoder = CaptionDecoder(cd, EosOnlyTokenizer(cd['gpt2']['vocab_size'])).to(device).eval()
    with torch.no_grad():
        prefix = decoder.decode_prefix(torch.randn(batch, config.num_text_tokens, config.text_dim, device=device))
        return timed(lambda: decoder.beam_search(prefix), device, repeats) / batch


def main(argv):
    del argv
    from common import tiny, unidiffuser
    from libs import modes, pipeline
    from libs.diffusion import NoiseScheduleVP, get_sampler, stable_diffusion_betas
    from libs.uvit import build_nnet
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    config = unidiffuser('v1') if FLAGS.size == 'full' else tiny('models/tiny')
    config.nnet.name = 'uvit_empath'
    config.nnet.use_checkpoint = False
    autocast = torch.bfloat16 if device.type == 'cuda' else None
    steps = FLAGS.steps or config.sample.sample_steps
    nnet = build_nnet(config.nnet).to(device).eval().requires_grad_(False)
    B, N = FLAGS.batch, 1000
    rows = []
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)

    def rand(*shape):
        return torch.randn(*shape, device=device)

    z, clip_img, text = rand(B, *config.z_shape), rand(B, 1, config.clip_img_dim), rand(B, config.num_text_tokens,
                                                                                           config.text_dim)
    t, dt = torch.full((B,), 500., device=device), torch.ones(B, dtype=torch.long, device=device)
    cond = dict(img=rand(B, *config.z_shape), clip_img=rand(B, 1, config.clip_img_dim),
                text=rand(B, config.num_text_tokens, config.text_dim), t_img=t * 0, t_text=t * 0)
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        cache = nnet.encode_condition(cond)
        rows.append(('U-ViT forward, no speaker (L=1105 at full size)',
                     timed(lambda: nnet(z, clip_img, text, t, t, dt), device, FLAGS.repeats)))
        rows.append(('U-ViT forward, speaker recomputed', timed(lambda: nnet(z, clip_img, text, t, t, dt, cond=cond),
                                                               device, FLAGS.repeats)))
        rows.append(('U-ViT forward, speaker cached', timed(lambda: nnet(z, clip_img, text, t, t, dt,
                                                                         cond_cache=cache), device, FLAGS.repeats)))
        rows.append(('speaker path (once per sample)', timed(lambda: nnet.encode_condition(cond), device,
                                                             FLAGS.repeats)))
    if not FLAGS.forward_only:
        betas = stable_diffusion_betas()
        ctx = modes.Context(nnet=nnet, sampler=get_sampler(config.sample.sampler), schedule=NoiseScheduleVP(betas),
                            N=N, steps=steps, scale=config.sample.scale, z_shape=tuple(config.z_shape),
                            clip_img_dim=config.clip_img_dim, text_shape=(config.num_text_tokens, config.text_dim),
                            data_type=1, device=device, autocast_dtype=autocast)
        absent = dict(cond, t_img=t * 0 + N, t_text=t * 0 + N)
        for mode in FLAGS.modes.split(','):
            inputs = dict(n=B, z=z, clip_img=clip_img, text=text)
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32,
                                                 enabled=autocast is not None):
                inputs.update(speaker=nnet.encode_condition(cond), speaker_absent=nnet.encode_condition(absent))
            if mode not in modes.EMPATH_MODES:
                inputs['speaker'] = inputs['speaker_absent']
            fn = modes.get_mode(mode)
            seconds = timed(lambda: fn(ctx, inputs), device, FLAGS.repeats)
            rows.append((f'{mode}: per sample ({steps} steps, scale {ctx.scale:g}, batch {B})', seconds / B))
            rows.append((f'{mode}: per step', seconds / steps))
    if not FLAGS.forward_only:
        rows.append((f'caption decoding per sample (batch {B}, 5 beams, <= 67 tokens)',
                     time_caption_decoding(config, device, B, FLAGS.repeats)))
    kind = 'GPU' if device.type == 'cuda' else 'resident'
    peak = f'peak {kind} memory {pipeline.peak_memory_gb(device):.2f} GiB'
    print(f'\n{FLAGS.size} U-ViT ({sum(p.numel() for p in nnet.parameters()) / 1e6:.3f}M params, empath), '
          f'{machine(device)}, {"bf16" if autocast else "fp32"}, {peak}\n')
    print('| measurement | seconds |\n|---|---|')
    for name, seconds in rows:
        print(f'| {name} | {seconds:.4f} |')


if __name__ == '__main__':
    cli.run(main)
