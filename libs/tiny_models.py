"""Tiny random components in the official file layouts, so every pipeline runs on a CPU without real weights.

They are the same classes as the real ones (CLIP text/vision from transformers, diffusers' VAE, the GPT-2 prefix
decoder, the U-ViT), only small, and they are read back through the real loaders.
"""
import logging
import os

import torch

from libs.io import atomic_write_json

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = ['a photo of a cat', 'an elephant under the sea', 'i feel so happy today', 'that sounds hard',
                  'i am sorry to hear that', 'what a wonderful surprise', 'a red car on the road']


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise, so tiny outputs are not near-constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def make_tiny_models(config, seed: int = 0, corpus=None, clip_image_size: int = 32, empath_config=None) -> dict:
    """Write every component the config names (paths taken from the config); returns {component: path}.

    ``empath_config`` (e.g. ``configs/common.py`` ``tiny(root, condition=True)``) adds its EmpathDiffuser U-ViT as
    ``nnet_empath``; it must share every other component with ``config``.
    """
    from libs.autoencoder import FrozenAutoencoderKL, ldm_state_dict_from_diffusers
    from libs.caption_decoder import CaptionDecoder, build_tiny_gpt2_tokenizer, load_gpt2_tokenizer, \
        save_official_layout
    from libs.clip_encoders import build_tiny_clip_text, build_tiny_clip_vision
    from libs.uvit import build_nnet

    corpus = list(corpus or DEFAULT_CORPUS)
    cd = config.caption_decoder
    if config.clip_text_dim != cd.gpt2.n_embd:
        raise ValueError('the caption decoder reads CLIP text states directly: clip_text_dim must equal gpt2.n_embd')
    paths = dict(clip_text=config.clip_text.name_or_path, clip_img=config.clip_img.name_or_path,
                 gpt2_tokenizer=cd.tokenizer, caption_decoder=cd.pretrained_path,
                 autoencoder=config.autoencoder.pretrained_path, nnet=config.nnet_path)
    if empath_config is not None:
        differs = [k for k in ('z_shape', 'clip_img_dim', 'text_dim', 'num_text_tokens', 'clip_text', 'clip_img',
                               'caption_decoder', 'autoencoder') if empath_config[k] != config[k]]
        if differs or empath_config.nnet.name != 'uvit_empath':
            raise ValueError('empath_config must be an EmpathDiffuser config (nnet.name=uvit_empath) sharing every '
                             f'other component with config; it differs in {differs or ["nnet.name"]}')
        paths['nnet_empath'] = empath_config.nnet_path
    for p in paths.values():
        os.makedirs(os.path.dirname(os.path.abspath(p)) if p.endswith(('.pth', '.safetensors')) else p, exist_ok=True)

    build_tiny_clip_text(paths['clip_text'], texts=corpus, hidden_size=config.clip_text_dim,
                         max_length=config.num_text_tokens, seed=seed)
    build_tiny_clip_vision(paths['clip_img'], image_size=clip_image_size, projection_dim=config.clip_img_dim,
                           seed=seed + 1)
    build_tiny_gpt2_tokenizer(corpus * 4, paths['gpt2_tokenizer'])
    tokenizer = load_gpt2_tokenizer(paths['gpt2_tokenizer'], cd.gpt2.vocab_size, local_files_only=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 2)
        save_official_layout(CaptionDecoder(cd, tokenizer), paths['caption_decoder'])
        vae = FrozenAutoencoderKL(config.autoencoder)
        torch.save(ldm_state_dict_from_diffusers(vae.vae.state_dict()), paths['autoencoder'])
        nnet = randomize_(build_nnet(config.nnet), seed + 3)
        torch.save(nnet.state_dict(), paths['nnet'])
    if empath_config is not None:
        # Random everywhere, the zero-initialised gates included: the speaker turn then changes the response, as in
        # a trained network, instead of being ignored as at the start of fine-tuning.
        torch.save(randomize_(build_nnet(empath_config.nnet), seed + 4).state_dict(), paths['nnet_empath'])
    atomic_write_json(os.path.join(os.path.dirname(os.path.abspath(paths['nnet'])), 'tiny_models.json'),
                      dict(seed=seed, paths=paths, note='random weights for tests and demos, not a trained model'))
    logger.info('wrote tiny components: %s', paths)
    return paths
