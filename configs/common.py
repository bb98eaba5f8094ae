"""Shared config pieces: the UniDiffuser-v1 components at full size and their tiny counterparts.

Every size-like number lives here once and is tied to its users with ``get_ref``; scripts read them from the
config (or from the encoders' own configs) instead of repeating literals.

The full-size components are Hugging Face Hub references (``hf://OWNER/NAME@REVISION[/FILE]``, see libs/hub.py),
fetched into the hub cache on first use; ``config.revisions`` pins each repository (a branch, tag or commit:
``--config.revisions.unidiffuser=<commit>``). Any reference can be replaced by a local path.
"""
import ml_collections

from libs.hub import CLIP_IMG_REPO, CLIP_TEXT_REPO, GPT2_REPO, UNIDIFFUSER_V0, UNIDIFFUSER_V1


def d(**kwargs):
    """Helper to build a ConfigDict inline."""
    return ml_collections.ConfigDict(initial_dictionary=kwargs)


def hub(repo, revision, path=''):
    """A Hub reference ``hf://repo@revision[/path]``; ``revision`` may be a config reference, which it then follows."""
    return f'hf://{repo}@' + revision + (f'/{path}' if path else '')


def sd_vae(path):
    """The Stable Diffusion KL-f8 VAE of UniDiffuser (autoencoder_kl.pth, LDM key layout)."""
    return d(pretrained_path=path, in_channels=3, out_channels=3, latent_channels=4,
             block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, scale_factor=0.18215)


def tiny_vae(path):
    """A two-level VAE (downsampling 2x) small enough for CPU tests."""
    return d(pretrained_path=path, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
             layers_per_block=1, norm_num_groups=8, scale_factor=0.18215)


def gpt2_base():
    """GPT-2 base, the caption decoder's language model (vocab = GPT-2 + <|EOS|>)."""
    return d(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50258)


def unidiffuser(version='v1'):
    """UniDiffuser-v0/v1 at 512x512, with the official nnet keys."""
    config = ml_collections.ConfigDict()
    config.seed = 1234
    config.z_shape = (4, 64, 64)
    config.clip_img_dim = 512
    config.clip_text_dim = 768
    config.text_dim = 64            # the caption decoder's reduced text dimension, what the U-ViT sees
    config.num_text_tokens = 77     # CLIP's context; checked against the text encoder's config at load time
    config.data_type = 1 if version == 'v1' else 0
    config.mixed_precision = 'bf16'  # training and feature extraction, on GPUs only (sampling: sample.precision)
    # Revisions of the Hub repositories the components below come from ('main': the newest).
    config.revisions = d(unidiffuser='main', clip_text='main', clip_img='main', gpt2='main')
    repo, revision = UNIDIFFUSER_V1 if version == 'v1' else UNIDIFFUSER_V0, config.revisions.get_ref('unidiffuser')
    config.autoencoder = sd_vae(hub(repo, revision, 'autoencoder_kl.pth'))
    # local_files_only: never download that component (as HF_HUB_OFFLINE=1 does for all of them).
    config.clip_text = d(name_or_path=hub(CLIP_TEXT_REPO, config.revisions.get_ref('clip_text')),
                         local_files_only=False)
    config.clip_img = d(name_or_path=hub(CLIP_IMG_REPO, config.revisions.get_ref('clip_img')), local_files_only=False)
    config.caption_decoder = d(pretrained_path=hub(repo, revision, 'caption_decoder.pth'),
                               tokenizer=hub(GPT2_REPO, config.revisions.get_ref('gpt2')), local_files_only=False,
                               hidden_dim=config.get_ref('text_dim'), gpt2=gpt2_base())
    config.nnet = d(name='uvit_multi_post_ln_v1' if version == 'v1' else 'uvit_multi_post_ln', img_size=64,
                    in_chans=4, patch_size=2, embed_dim=1536, depth=30, num_heads=24, mlp_ratio=4, qkv_bias=False,
                    pos_drop_rate=0., drop_rate=0., attn_drop_rate=0., mlp_time_embed=False,
                    text_dim=config.get_ref('text_dim'), num_text_tokens=config.get_ref('num_text_tokens'),
                    clip_img_dim=config.get_ref('clip_img_dim'), use_checkpoint=True,
                    compile=False)  # torch.compile for sampling: pays only over long runs (BENCHMARKS.md)
    config.nnet_path = hub(repo, revision, f'uvit_{version}.pth')
    # The official sampler: DPM-Solver++ 'fast' on a time-uniform grid (what dpm_solver_pp.sample defaults to;
    # skip_type='logSNR' is more accurate at few steps but is not what the official results used).
    # The empath modes guide over the speaker turn: against no speaker with `scale` ('no_speaker'), or with a
    # scale for the utterance and one for the face ('two_scale', InstructPix2Pix; libs.diffusion.cfg_two_scale).
    # precision: 'auto' = bf16 on GPUs and on CPUs with native bf16 matrix instructions, fp32 elsewhere
    # (libs/precision.py); or 'fp32', 'bf16', 'fp16'. Sampling, evaluation and the web demo all read it.
    # Encoder work runs in chunks of at most this many items, whatever the data or sampling batch (results do not
    # depend on them). Sized for a 24 GB card at 512² (fp32 VAE: about 0.63 GiB of activations per encoded image and
    # 0.75 GiB per decoded one; docs/memory.md, BENCHMARKS.md "Memory plan").
    config.encoders = d(vae_encode_chunk=8, vae_decode_chunk=8, clip_chunk=64, caption_chunk=16)
    config.sample = d(sample_steps=50, scale=7., t2i_cfg_mode='true_uncond', sampler='dpm_solver_fast',
                      skip_type='time_uniform', speaker_guidance='no_speaker', scale_text=7., scale_face=7.,
                      precision='auto',
                      # samples per U-ViT batch: n samples run in chunks of this many (x the guidance branches)
                      batch_samples=8)
    # eval_avamerg.py (docs/evaluation.md); every config has it, so any config's network can be refused by name.
    config.eval = d(
        inception_path='',                    # FID's Inception-v3: a local TorchScript file, else the torch hub cache
        expression_classifier='default',      # libs/face_expression.py's classifier, a path to another, or 'none'
        baselines=(),                         # copy_speaker, retrieval, shuffled_speaker, no_guidance (--baselines)
        bootstrap_resamples=1000,             # resamples of the pairs behind every interval and --compare
        fid_bootstrap_resamples=200,          # of those, how many also get an FID (a feature-space SVD each)
        bootstrap_seed=0,                     # the resamples' seed: the same pairs are drawn for every run
        confidence=0.95)                      # the intervals' level
    return config


def tiny(root='models/tiny', condition=False):
    """Tiny random components (written by scripts/make_tiny_models.py) that run every mode on a CPU in seconds."""
    config = unidiffuser('v1')
    config.local_weights = d(folder=root, made_by=f'python scripts/make_tiny_models.py --out {root}')  # for hints
    config.z_shape = (4, 16, 16)      # 32x32 images through the 2x tiny VAE
    config.clip_img_dim = 16
    config.clip_text_dim = 32
    config.text_dim = 8
    config.num_text_tokens = 16
    config.mixed_precision = 'no'
    config.autoencoder = tiny_vae(f'{root}/autoencoder_kl.pth')
    config.clip_text = d(name_or_path=f'{root}/clip_text', local_files_only=True)
    config.clip_img = d(name_or_path=f'{root}/clip_img', local_files_only=True)
    config.caption_decoder = d(pretrained_path=f'{root}/caption_decoder.pth', tokenizer=f'{root}/gpt2_tokenizer',
                               local_files_only=True, hidden_dim=config.get_ref('text_dim'),
                               gpt2=d(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=-1))
    config.nnet.update(name='uvit_empath' if condition else 'uvit_multi_post_ln_v1', img_size=16, embed_dim=32,
                       depth=2, num_heads=2, mlp_ratio=2, use_checkpoint=False)
    config.nnet_path = f'{root}/uvit_{"empath" if condition else "v1"}.pth'
    config.sample.sample_steps = 4
    # At these sizes bf16 autocast saves nothing on a CPU (BENCHMARKS.md), and fp32 keeps tiny results the same on
    # every machine.
    config.sample.precision = 'fp32'
    return config
