"""EmpathDiffuser fine-tuning on AvaMERG at 512x512: UniDiffuser-v1 plus the speaker condition and emotion head.

Run: ``accelerate launch --config_file configs/accelerate/ddp.yaml train_empath.py --config=configs/avamerg_empath.py``
(any key can be overridden, e.g. ``--config.train.batch_size=32``). ``empath(config)`` adds the training sections to
any base config; the 256x256 and tiny configs reuse it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import UNIDIFFUSER_V1, d, hub, unidiffuser  # noqa: E402


def empath(config, features='features/avamerg_512'):
    """Turn a UniDiffuser config into an EmpathDiffuser training config reading the feature cache ``features``."""
    config.name = 'avamerg_empath'            # run folder: <workdir>/<name>
    config.workdir = 'workdir'
    config.log_with = 'tensorboard'           # 'tensorboard', 'wandb' (offline unless WANDB_MODE says otherwise) or ''
    config.nnet.update(name='uvit_empath', num_emotions=32)
    config.train = d(
        # official (or fine-tuned) U-ViT weights; '' trains from scratch
        init_from=hub(UNIDIFFUSER_V1, config.revisions.get_ref('unidiffuser'), 'uvit_v1.pth'),
        resume=True,                          # continue from the newest complete checkpoint of the run folder
        n_steps=20000,
        batch_size=64,                        # pairs per optimizer step, over all processes and accumulation steps
        grad_accum=1,
        # Speaker dropout, drawn once per pair: the face only (latent + CLIP), the utterance only, or both. The
        # 'both' share trains the unconditional branch that empath guidance subtracts (ε(response | no speaker)).
        p_drop_face=0.05,
        p_drop_text=0.05,
        p_drop_both=0.10,
        emotion_weight=0.1,                   # λ of the emotion cross-entropy
        # Per-modality means (MSE(ε_img) + MSE(ε_clip) + MSE(ε_text)) weigh a CLIP or text element more than
        # UniDiffuser's single MSE over the concatenation; 'concat' is that single MSE.
        loss_weighting='per_modality',
        ema_rate=0.9999,                      # with warm-up: min(ema_rate, (1 + s) / (10 + s)) at step s
        grad_clip=1.0,                        # max global grad norm; 0 disables clipping (the norm is still logged)
        max_nonfinite=10,                     # stop after this many consecutive non-finite steps
        log_every=50,
        val_every=1000,
        val_pairs=512,                        # held-out pairs scored at every validation (fixed noise, no dropout)
        ckpt_every=2000,                      # a multiple of val_every, so checkpoints carry a validation loss
        keep_last=3,                          # checkpoints kept besides the best one
        sample_every=5000,                    # response samples on fixed validation turns (needs libs.pipeline)
        sample_n=4,
        # LoRA (libs/lora.py, peft): the pretrained U-ViT stays frozen; low-rank adapters W + alpha/rank · B·A are
        # trained in the target Linear layers of every block at lora.lr (LoRA needs a larger rate than a full
        # fine-tune), the new speaker-path parameters in full at condition_lr_scale × optimizer.lr. Checkpoints hold
        # only what is trained; the exported nnet_ema.safetensors is merged into the ordinary layout.
        lora=d(enabled=False, rank=32, alpha=32., dropout=0., lr=1e-4,
               target_modules=('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')),
    )
    # The parameters UniDiffuser does not have (speaker positions and segment, gates, [EMO], emotion head) start
    # from scratch: they learn at condition_lr_scale x lr, i.e. UniDiffuser's own pre-training rate of 2e-4.
    # eight_bit: bitsandbytes' 8-bit AdamW states (CUDA only; pip install -r requirements-gpu-extra.txt).
    config.optimizer = d(lr=2e-5, condition_lr_scale=10., weight_decay=0.03, betas=(0.9, 0.99), eps=1e-8,
                         warmup_steps=500, eight_bit=False)
    config.data = d(
        root='data/avamerg',                  # AvaMERG: train.json, test/test.json, image_v5_0/ or video_v5_0/
        speaker_text='last',                  # 'last' speaker utterance, or the 'history' cut from the left to fit
        val_fraction=0.02,                    # conversations of train.json held out (stable hash of the id) as 'val'
        media_dirs=(),                        # extra folders holding the frames/videos (libs.avamerg.MEDIA_DIRS: known ones)
        frames_cache='',                      # where frames taken from videos are cached ('' = beside the videos)
        test_gold='',                         # a separate gold file for a test.json without responses/labels
        shard_size=1024,                      # pairs per feature shard (extract_features.py)
        batch_size=64,                        # pairs per encoder batch (extract_features.py)
        # Feature caches per split (extract_features.py --split=train|val|test). Training reads train and selects
        # checkpoints on val; only evaluation reads test.
        train=f'{features}/train', val=f'{features}/val', test=f'{features}/test',
        shuffle_window=8, max_open_shards=8, num_workers=4)
    # train_caption_decoder.py: fine-tunes config.caption_decoder on the cache's utterances (ClipCap's AdamW and
    # linear warm-up/decay) and writes <workdir>/<name>/<output>, to be used as caption_decoder.pretrained_path.
    config.caption_decoder_train = d(
        features='',                          # feature cache to read; '' = data.train
        heldout_fraction=0.02,                # share of conversations held out (hash of the id) for round-trip BLEU
        eval_utterances=1000,                 # at most this many held-out utterances are beam-searched
        max_tokens=67,                        # utterance tokens incl. <|EOS|>: the official beam search's limit
        train_encode_prefix=False,            # True moves the U-ViT's text space (see train_caption_decoder.py)
        n_steps=5000,
        batch_size=64,                        # per process
        lr=2e-5,
        weight_decay=0.,                      # ClipCap fine-tunes without weight decay
        warmup_steps=500,
        grad_clip=1.0,
        log_every=50,
        num_workers=4,
        output='caption_decoder.pth',
    )
    return config


def get_config():
    return empath(unidiffuser('v1'))
