"""Training memory and step time: full fine-tuning vs LoRA, measured; plus the full-size memory estimate.

    python scripts/benchmark_training.py                      # CPU: mid-size U-ViT, fp32, batch 1 and 4 (minutes)
    python scripts/benchmark_training.py --size=full          # one GPU: 952M U-ViT at 512², bf16, checkpointing, 1/8
    python scripts/benchmark_training.py --size=full --estimate_only   # the full-size estimate alone (no GPU)

Every (method, batch) runs in a fresh process: ``--steps`` timed training steps after one warm-up, each a real step
of train_empath.py's objective (libs.trainer.training_losses with speaker dropout, the AdamW groups of
make_optimizer, gradient clipping, the EMA update) on random features of the configured shapes; a frozen linear
map stands in for the caption decoder's encode_prefix. Weights are random (timing and memory do not depend on them).

- **Peak memory**: on a GPU ``torch.cuda.max_memory_allocated``; on a CPU the process's peak resident memory minus
  its resident memory before the model is built, in a process whose freed memory goes back to the system at once
  (``run_child``).
- **Accounted**: weights, EMA and AdamW states counted from the objects, plus the most bytes the tensors created
  during one training step occupy at the same time (``LivePeak``: activations, autograd's temporaries, gradients,
  the optimizer step's temporaries).
- **Estimate** (no GPU, no memory): ``libs.memory.training``, the same for the network on fake tensors (torch's
  FakeTensorMode on the CPU device: real shapes, dtypes and kernel choices, no data), forward and backward of
  training_losses traced in fp32 and under bf16 autocast. The attention takes the flash kernel a real CPU takes,
  which like the GPU flash kernels keeps q, k, v, the output and the log-sum-exp only. The optimizer step is not
  traced (it reads values): it holds the gradients and, in torch's foreach AdamW (the GPU default), up to one more
  fp32 copy of the trained parameters.
  Allocator fragmentation and the CUDA context are not in it; a GPU measurement replaces it.
"""
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'configs')]

from absl import flags  # noqa: E402

from libs import cli  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """The command line (defined only when run as a script)."""
    flags.DEFINE_enum('size', 'mid', ['mid', 'full'], "'mid': a 31M U-ViT at 256² (CPU minutes); 'full': the 952M "
                      'U-ViT at 512²')
    flags.DEFINE_string('methods', 'full,lora', 'comma-separated: full (full fine-tuning), lora')
    flags.DEFINE_string('batch', None, 'comma-separated batch sizes (default: 1,4 for mid, 1,8 for full)')
    flags.DEFINE_integer('steps', 3, 'timed training steps (median reported) after one warm-up step')
    flags.DEFINE_bool('checkpointing', None, 'gradient checkpointing (default: on for full, as the config, off for '
                      'mid)')
    flags.DEFINE_integer('lora_rank', None, 'LoRA rank (default: the config, train.lora.rank)')
    flags.DEFINE_bool('eight_bit', False, 'bitsandbytes 8-bit AdamW (CUDA only)')
    flags.DEFINE_bool('estimate_only', False, 'print the meta-device estimate for --size and exit')
    flags.DEFINE_string('child', None, 'internal: run one measurement, "method,batch", and print it as JSON')


GiB = 2 ** 30
MID = dict(embed_dim=512, depth=8, num_heads=8)  # the 'mid' U-ViT: full-size layout, 1/3 width, 1/4 depth


def training_config(size: str, method: str, checkpointing: bool, lora_rank, eight_bit: bool):
    """The EmpathDiffuser training config of a size, with random initialisation and the method applied."""
    from libs import memory
    if size == 'mid':
        from avamerg_empath_256 import get_config
        config = get_config()
        config.nnet.update(MID)
    else:
        from avamerg_empath import get_config
        config = get_config()
    config = memory.training_config(config, method, checkpointing, lora_rank)
    config.optimizer.eight_bit = eight_bit
    return config


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def rss_bytes() -> int:
    """The process's resident memory now (Linux)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def sync(device):
    """Wait for queued GPU work so wall-clock times are real."""
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(method: str, B: int) -> dict:
    """Peak memory, step time and the accounting of ``--steps`` training steps of one method."""
    import torch
    from libs import trainer
    from libs.diffusion import Schedule, stable_diffusion_betas
    from libs.memory import LivePeak, random_batch
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dtype = torch.bfloat16 if device.type == 'cuda' else None
    import peft  # noqa: F401 (imported before the baseline: importing it costs a few hundred MB of resident memory)
    config = training_config(FLAGS.size, method, checkpointing(), FLAGS.lora_rank, FLAGS.eight_bit)
    baseline = rss_bytes()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    nnet = trainer.build_model(config).to(device).train()
    ema = trainer.make_ema(nnet)
    optimizer = trainer.make_optimizer(nnet, config)
    reducer = torch.nn.Linear(config.clip_text_dim, config.text_dim).to(device).requires_grad_(False)
    schedule, batch = Schedule(stable_diffusion_betas()), random_batch(config, B, device)
    drop = trainer.speaker_dropout(config.train)
    trained = [p for p in nnet.parameters() if p.requires_grad]

    def step(s):
        rand = trainer.to_device(trainer.draw_randomness(range(s * B, (s + 1) * B), 0, 'train', config, schedule.N,
                                                         drop), device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses, _ = trainer.training_losses(nnet, batch, rand, reducer, schedule, config)
        losses['loss'].mean().backward()
        torch.nn.utils.clip_grad_norm_(trained, config.train.grad_clip)
        optimizer.step()
        trainer.update_ema(ema, nnet, trainer.ema_decay(s, config.train.ema_rate))
        optimizer.zero_grad(set_to_none=True)

    step(0)  # warm-up; it creates AdamW's states
    with LivePeak() as live:  # slows the step down: not timed
        step(1)
    times = []
    for s in range(2, FLAGS.steps + 2):
        sync(device)
        tic = time.perf_counter()
        step(s)
        sync(device)
        times.append(time.perf_counter() - tic)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    own_ema = [e for e, p in zip(ema.parameters(), nnet.parameters()) if p.requires_grad]
    weights, ema_bytes, states = tensor_bytes(nnet.parameters()), tensor_bytes(own_ema), tensor_bytes(states)
    return dict(method=method, batch=B, params=sum(p.numel() for p in nnet.parameters()),
                trained=sum(p.numel() for p in trained), weights=weights, ema=ema_bytes, optimizer=states,
                step=live.peak, accounted=weights + ema_bytes + states + live.peak, peak=peak,
                sec_per_step=statistics.median(times), tokens=segment_tokens(config))


def segment_tokens(config) -> int:
    """Tokens of each segment: response [t_img, t_text, data_type, text, clip, patches], speaker the same with
    [EMO] in place of the data type."""
    h, w = config.z_shape[1:]
    return 3 + config.num_text_tokens + 1 + (h // config.nnet.patch_size) * (w // config.nnet.patch_size)


def checkpointing() -> bool:
    """Gradient checkpointing unless the flag says otherwise: on at full size (as the configs), off at mid size."""
    return FLAGS.size == 'full' if FLAGS.checkpointing is None else FLAGS.checkpointing


def estimate(size: str, method: str, B: int, use_checkpoint: bool, lora_rank, autocast: bool) -> dict:
    """The accounting of one training step on fake tensors, which hold no memory (libs.memory.training)."""
    from libs import memory
    config = training_config(size, method, use_checkpoint, lora_rank, False)
    return dict(memory.training(config, B, 'bf16' if autocast else 'fp32'), method=method)


def machine(device) -> str:
    """Where the numbers come from."""
    import torch
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}'
    return f'{platform.processor() or platform.machine()} CPU x{os.cpu_count()}, torch {torch.__version__}'


def print_estimate(size: str, batches, rank, checkpointing=(True, False)) -> None:
    """The estimate for a size, both methods, with and without gradient checkpointing, fp32 and bf16 autocast."""
    print(f'\n{size} U-ViT, estimate on fake tensors (scripts/benchmark_training.py); GiB. Forward + backward: the '
          'most bytes their tensors (activations, temporaries, gradients) hold at once. Peak: weights, EMA and AdamW '
          'states plus the larger of that and the optimizer step\'s gradients + one fp32 copy of the trained '
          'parameters. Allocator overhead and the CUDA context not included.\n')
    print('| method | batch | checkpointing | trained params | weights | AdamW | EMA | forward + backward fp32 '
          '| forward + backward bf16 | peak fp32 | peak bf16 |\n|' + '---|' * 11)
    for method in ('full', 'lora'):
        for B in batches:
            for ckpt in checkpointing:
                r32, r16 = (estimate(size, method, B, ckpt, rank, autocast) for autocast in (False, True))
                cells = [r32[k] / GiB for k in ('weights', 'optimizer', 'ema', 'step')]
                cells += [r16['step'] / GiB, r32['accounted'] / GiB, r16['accounted'] / GiB]
                print(f'| {method} | {B} | {"on" if ckpt else "off"} | {r32["trained"] / 1e6:.1f}M | '
                      + ' | '.join(f'{c:.2f}' for c in cells) + ' |')


def run_child(method: str, B: int, steps=None, **env) -> dict:
    """One measurement in a fresh process.

    For CPU memory, ``MALLOC_MMAP_THRESHOLD_`` fixes glibc's threshold for serving allocations from mmap (it grows
    after frees by default), so freed tensor memory goes back to the system and the peak resident memory follows the
    peak of live tensors. That costs a system call per allocation, so steps are timed in another process.
    """
    args = [a for a in sys.argv[1:] if not a.startswith(('--child', '--steps'))]
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args, f'--child={method},{B}',
                          f'--steps={steps or FLAGS.steps}'], capture_output=True, text=True,
                         env=dict(os.environ, **env))
    if out.returncode:
        sys.exit(f'{method} batch {B} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
    import torch
    del argv
    import logging
    logging.getLogger('libs').setLevel(logging.WARNING)  # build_model's initialisation notes are not results
    batches = [int(b) for b in (FLAGS.batch or ('1,8' if FLAGS.size == 'full' else '1,4')).split(',')]
    if FLAGS.child:
        method, B = FLAGS.child.split(',')
        print(json.dumps(measure(method, int(B))))
        return
    if FLAGS.estimate_only:
        print_estimate(FLAGS.size, batches, FLAGS.lora_rank)
        return
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rows = []
    for method in FLAGS.methods.split(','):
        for B in batches:
            row = run_child(method, B)
            if device.type == 'cpu':  # resident memory in a second process, which returns freed memory at once
                row['peak'] = run_child(method, B, MALLOC_MMAP_THRESHOLD_=str(2 ** 17), steps=1)['peak']
            rows.append(row)
    kind = 'peak GPU memory allocated' if device.type == 'cuda' else 'peak resident memory increase'
    precision = 'bf16 autocast' if device.type == 'cuda' else 'fp32'
    print(f'\n{FLAGS.size} U-ViT ({rows[0]["params"] / 1e6:.1f}M parameters, {rows[0]["tokens"]} response + '
          f'{rows[0]["tokens"]} speaker tokens), {machine(device)}, {precision}, gradient checkpointing '
          f'{"on" if checkpointing() else "off"}, torch threads {torch.get_num_threads()}; GiB\n')
    print(f'| method | batch | trained params | s/step | {kind} | accounted | weights | AdamW | EMA | '
          'one step |\n|' + '---|' * 10)
    for r in rows:
        cells = [r[k] / GiB for k in ('peak', 'accounted', 'weights', 'optimizer', 'ema', 'step')]
        print(f'| {r["method"]} | {r["batch"]} | {r["trained"] / 1e6:.2f}M | {r["sec_per_step"]:.2f} | '
              + ' | '.join(f'{c:.3f}' for c in cells) + ' |')
    print_estimate(FLAGS.size, batches, FLAGS.lora_rank, [checkpointing()])  # beside what it can be checked with
    if FLAGS.size == 'mid':
        print_estimate('full', [1, 8], FLAGS.lora_rank)


if __name__ == '__main__':
    define_flags()
    cli.run(main)
