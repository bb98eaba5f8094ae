"""The newcomer's demo (scripts/demo.py): the real workflow on a synthetic AvaMERG, sized for a laptop CPU.

There are no pretrained weights offline, so every component is small and made here: a 2-layer CLIP text encoder and
a 2-layer CLIP vision encoder (random, transformers classes), a 2-layer GPT-2 caption decoder whose BPE tokenizer is
trained on the synthetic corpus, an AutoencoderKL (4x downsampling) trained for a minute or two, and a small
UniDiffuser-v1 U-ViT pre-trained on the synthetic faces and utterances (joint image-text objective, no speaker).
The fine-tune that follows is ``configs/avamerg_empath.py``'s ``empath()`` recipe: every setting below that differs
from it is a size, a step count or the learning rate, and says why.

``get_config(arg)`` with ``arg = 'OUT[,quick][,pretrain][,seed=N]'``:
  OUT        the demo's output folder (every path lives under it)
  quick      the shortened schedule the test suite runs
  pretrain   the UniDiffuser pre-training run instead of the EmpathDiffuser fine-tune
  seed=N     another seed for everything (data, components, training, sampling), to see the run-to-run spread
On the command line: ``--config=configs/demo.py:out/demo`` (or ``:out/demo,quick,pretrain``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from avamerg_empath import empath  # noqa: E402
from common import d, tiny  # noqa: E402

OPTIONS = ('quick', 'pretrain', 'seed=N')


def parse(arg):
    """'OUT[,quick][,pretrain][,seed=N]' -> (out, quick, pretrain, seed)."""
    out, *options = arg.split(',')
    quick, pretrain, seed = False, False, 0
    for option in options:
        name, _, value = option.partition('=')
        if option == 'quick':
            quick = True
        elif option == 'pretrain':
            pretrain = True
        elif name == 'seed' and value.isdigit():
            seed = int(value)
        else:
            raise ValueError(f'unknown demo config option {option!r} in {arg!r}; options: {", ".join(OPTIONS)} '
                             '(e.g. out/demo,quick,seed=1)')
    return out, quick, pretrain, seed


def components(out):
    """The tiny components' config (configs/common.py ``tiny``) at the demo's sizes, all under <out>/models."""
    config = tiny(f'{out}/models')
    config.local_weights.made_by = f'python scripts/demo.py --out {out}'  # named by the hints for missing files
    # Faces are 32x32, where the expressions are still legible. The codec downsamples 4x into 8 channels (8x8x8, a
    # sixth of the pixels): diffusion in a compressed latent learns far faster, and its decoder turns small latent
    # errors into plausible faces rather than pixel noise. Patches of 2x2x8 give 16 image tokens per face, so a step
    # is cheap, and on a CPU the number of steps is what makes a small diffusion model good. 24 CLIP tokens hold
    # every synthetic utterance with 1000 BPE merges.
    config.z_shape = (8, 8, 8)
    config.num_text_tokens = 24
    config.autoencoder.update(latent_channels=8, block_out_channels=(16, 16, 32))
    # Depth 4 (two blocks each side of the middle one): with fewer blocks the response barely follows the speaker,
    # because the [EMO] summary of the speaker only forms after a block or two.
    config.nnet.update(img_size=8, in_chans=8, patch_size=2, embed_dim=96, depth=4, num_heads=4, mlp_ratio=2)
    # The caption decoder starts random; train_caption_decoder.py fine-tunes it on the corpus into
    # <out>/caption_decoder, and every later stage reads that one.
    config.caption_decoder.pretrained_path = f'{out}/caption_decoder/demo/caption_decoder.pth'
    return config


def get_config(arg='out/demo'):
    out, quick, pretrain, seed = parse(arg)
    models = f'{out}/models'
    # The real fine-tuning recipe, reading the demo's feature caches.
    config = empath(components(out), features=f'{out}/features')
    config.name, config.workdir, config.seed = 'demo', f'{out}/train', seed
    config.nnet_path = f'{out}/train/demo/nnet_ema.safetensors'   # what app.py and sample_multi.py serve

    # ---- What differs from configs/avamerg_empath.py, and why ----------------------------------------------------
    # Starts from the UniDiffuser the demo pre-trains (the 'pretrain' stage), saved in the official uvit_v1.pth layout.
    # Steps: a CPU affords thousands of steps of 16 pairs, not 20000 of 64. Validation, checkpoints and the warm-up
    # scale with them; no periodic samples (the evaluation stages sample instead). Everything else - speaker dropout
    # 0.05/0.05/0.10, EMA 0.9999 with warm-up, emotion weight 0.1, per-modality loss, AdamW betas, weight decay,
    # gradient clipping - is avamerg_empath's.
    config.train.update(init_from=f'{models}/uvit_v1.pth', n_steps=800 if quick else 2500, batch_size=16,
                        log_every=50, val_every=200 if quick else 500, val_pairs=64, ckpt_every=200 if quick else 500,
                        keep_last=1, sample_every=0)
    # Learning rate: avamerg_empath fine-tunes at a tenth of UniDiffuser's pre-training rate (2e-5 vs 2e-4) and the
    # new parameters at that pre-training rate (condition_lr_scale 10). The same ratios here, around the rate the
    # demo pre-trains its small U-ViT with (2e-3: a width-96 network tolerates a 10x higher rate than a width-1536 one).
    config.optimizer.update(lr=2e-4, warmup_steps=50)
    # Sizes of the data pipeline: a few hundred dialogues, 5% of them held out for validation (2% would leave a
    # dozen conversations), shards of 512 pairs, no loader workers (the cache is in the page cache of one process).
    config.data.update(root=f'{out}/data', val_fraction=0.05, shard_size=512, batch_size=64, num_workers=0,
                       max_open_shards=2)
    # Guidance over the speaker turn: a short fine-tune follows the speaker weakly, and guidance amplifies that
    # (the report's sweep shows the scale and step count trade-off).
    config.sample.update(sample_steps=20, scale=6.)
    config.caption_decoder_train.update(heldout_fraction=0.1, eval_utterances=64, max_tokens=24,
                                        n_steps=400 if quick else 800, batch_size=32, lr=5e-3, warmup_steps=30,
                                        log_every=20, num_workers=0)

    # ---- The UniDiffuser pre-training run (the 'pretrain' stage; ',pretrain' selects its config) -------------------
    config.pretrain = d(
        n_steps=800 if quick else 1500, lr=2e-3, warmup_steps=50,
        export=f'{models}/uvit_v1.pth',  # the official layout: a torch state dict that loads strictly into v1
    )

    # ---- Demo-only stages (scripts/demo.py, libs/demo/) ---------------------------------------------------------
    config.demo = d(
        # torch threads of every stage: a float sum split over another number of threads adds in another order, so
        # the report is reproducible bit for bit only at a fixed count (docs/demo_determinism.md). Two: the laptop
        # the schedule is sized for.
        threads=2,
        initial_caption_decoder=f'{models}/caption_decoder.pth',   # the random one, before train_caption_decoder.py
        tokenizers=d(clip_merges=1000, gpt2_vocab=1000, clip_layers=2, clip_heads=2),
        dialogues=600 if quick else 1200, test_dialogues=60 if quick else 100,
        # The listener is one avatar, as an empathetic agent would be, so that its face varies with the expression
        # (and pose) only; speakers are drawn from all avatars, as in AvaMERG.
        listeners=(7,),
        # The codec: reconstruction (L1) + a small KL, as the LDM autoencoders are trained (minus the GAN).
        codec=d(steps=600 if quick else 900, batch_size=16, lr=2e-3, kl_weight=1e-6, faces=2000),
        # Held-out test pairs every evaluation answers (at most: the quick test split has about 150).
        eval=d(pairs=160, batch_size=32),
        # The guidance-scale x steps sweep of the fine-tuned network (its default setting is one of the cells).
        sweep=d(scales=(0., 6., 12.) if quick else (0., 3., 6., 12.), steps=(5, 20) if quick else (5, 10, 20)),
        # t2i / i2t of the pre-trained and the fine-tuned network on held-out listener utterances and faces.
        modes=d(samples=48 if quick else 96),
        # Expression classifier: a small CNN trained on faces drawn by libs.synthetic.render_face.
        classifier=d(steps=300 if quick else 500, batch_size=64, lr=3e-3, faces=4000, heldout_faces=500),
    )
    return pretraining(config) if pretrain else config


def pretraining(config):
    """The pre-training run: UniDiffuser-v1's joint objective on the (face, utterance) pairs of both roles.

    train_empath.py trains that objective whenever nnet.name is unconditional; the speaker dropout, the emotion term
    and the condition learning-rate scale then have nothing to act on. Its EMA network is exported to
    config.pretrain.export, which the fine-tune starts from.
    """
    pre = config.copy_and_resolve_references()
    pre.name, pre.workdir = 'pretrain', os.path.join(os.path.dirname(config.workdir), 'pretrain')
    pre.nnet.name = 'uvit_multi_post_ln_v1'
    pre.train.update(init_from='', n_steps=config.pretrain.n_steps)
    pre.optimizer.update(lr=config.pretrain.lr, warmup_steps=config.pretrain.warmup_steps)
    return pre
