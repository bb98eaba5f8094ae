"""The newcomer's demo (scripts/demo.py): configs/avamerg_tiny.py resized so that learning shows on a laptop CPU.

Every component is small and starts random (there are no pretrained weights offline): a 2-layer CLIP text encoder
and a 2-layer CLIP vision encoder (transformers classes), a 2-layer GPT-2 caption decoder whose BPE tokenizer is
trained on the synthetic corpus, an AutoencoderKL (4x downsampling) trained here for a minute or two, and a small
EmpathDiffuser U-ViT trained from scratch. ``get_config('out/demo')`` is the full schedule (14 minutes on two
cores), ``get_config('out/demo,quick')`` a shortened one for the test suite. On the command line:
``--config=configs/demo.py:out/demo`` (or ``:out/demo,quick``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from avamerg_tiny import get_config as tiny_training_config  # noqa: E402
from common import d  # noqa: E402

SCHEDULES = ('full', 'quick')


def get_config(arg='out/demo'):
    out, _, schedule = arg.partition(',')
    schedule = schedule or 'full'
    if schedule not in SCHEDULES:
        raise ValueError(f'unknown demo schedule {schedule!r}; use one of {SCHEDULES} (e.g. out/demo,quick)')
    quick = schedule == 'quick'
    models = f'{out}/models'
    config = tiny_training_config(models)
    config.name, config.workdir, config.seed = 'demo', f'{out}/train', 0
    config.local_weights.made_by = f'python scripts/demo.py --out {out}'

    # Sizes. Faces are 32x32, where the expressions are still legible. The codec downsamples 4x into 8 channels
    # (8x8x8, a sixth of the pixels): diffusion in a compressed latent learns far faster, and its decoder turns small
    # latent errors into plausible faces rather than pixel noise. Patches of 2x2x8 give 16 image tokens per face, so
    # a step is cheap, and on a CPU the number of steps is what makes a small diffusion model good. 24 CLIP tokens
    # hold every synthetic utterance with 1000 BPE merges.
    config.z_shape = (8, 8, 8)
    config.num_text_tokens = 24
    config.autoencoder.update(latent_channels=8, block_out_channels=(16, 16, 32))
    config.nnet.update(img_size=8, in_chans=8, patch_size=2, embed_dim=96, depth=4, num_heads=4, mlp_ratio=2)

    # The caption decoder starts random; train_caption_decoder.py fine-tunes it on the
    # corpus into <out>/caption_decoder, and every later stage reads that one.
    config.caption_decoder.pretrained_path = f'{out}/caption_decoder/demo/caption_decoder.pth'
    config.caption_decoder_train.update(heldout_fraction=0.1, eval_utterances=64, max_tokens=24,
                                        n_steps=500 if quick else 800, batch_size=32, lr=5e-3, warmup_steps=30,
                                        log_every=20)

    config.data.update(root=f'{out}/data', train=f'{out}/features/train', val=f'{out}/features/val',
                       test=f'{out}/features/test',
                       speaker_text='last', shard_size=512, batch_size=64, num_workers=0)
    # No pretrained UniDiffuser exists at this size, so the U-ViT starts from its own initialisation.
    # Depth 4 (two blocks each side of the middle one): with fewer blocks the response barely follows the speaker,
    # because the [EMO] summary of the speaker only forms after a block or two. Conditioning is the slowest thing a
    # diffusion model learns, and the steps here are what makes it show.
    config.train.update(init_from='', n_steps=3000 if quick else 5000, batch_size=16, ema_rate=0.995, log_every=50,
                        val_every=500, val_pairs=64, ckpt_every=500, keep_last=1, sample_every=0)
    config.optimizer.update(lr=2e-3, warmup_steps=50, weight_decay=0., condition_lr_scale=1.)
    # Guidance over the speaker turn: an undertrained model follows the speaker weakly, and guidance amplifies that.
    config.sample.update(sample_steps=20, scale=6.)

    # Demo-only stages (scripts/demo.py, libs/demo.py).
    config.demo = d(
        initial_caption_decoder=f'{models}/caption_decoder.pth',   # the random one, before train_caption_decoder.py
        tokenizers=d(clip_merges=1000, gpt2_vocab=1000, clip_layers=2, clip_heads=2),
        dialogues=600 if quick else 1200, test_dialogues=60 if quick else 100,
        # The listener is one avatar, as an empathetic agent would be, so that its face varies with the expression
        # (and pose) only; speakers are drawn from all avatars, as in AvaMERG.
        listeners=(7,),
        # The codec: reconstruction (L1) + a small KL, as the LDM autoencoders are trained (minus the GAN).
        codec=d(steps=500 if quick else 900, batch_size=16, lr=2e-3, kl_weight=1e-6, faces=2000),
        eval=d(pairs=160, batch_size=32),  # at most: the quick test split has 150 pairs
        # Expression classifier: a small CNN trained on faces drawn by libs.synthetic.render_face.
        classifier=d(steps=300 if quick else 500, batch_size=64, lr=3e-3, faces=4000, heldout_faces=500),
    )
    return config
