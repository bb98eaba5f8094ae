"""Resumable stages of the demo, and what they build that the real workflow gets from elsewhere.

A stage is done when ``<out>/<stage>/stage_done`` holds its fingerprint: a hash of the config values it reads and
of the markers of the stages it depends on. A rerun skips done stages; a changed config value or a rerun upstream
changes the fingerprint, and the stage's folder is deleted and rebuilt. Each marker also records the stage's wall
and CPU seconds and the machine's load while it ran, so that timings taken on a busy machine can be read.

Built here because no pretrained weights exist offline: tiny CLIP encoders and caption decoder with tokenizers
learned on the corpus, the tiny AutoencoderKL, and the official ``uvit_v1.pth`` layout of the U-ViT the demo
pre-trains. The shuffled-speaker feature cache is the control the learning is measured against.
"""
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from libs.evaluation.baselines import derangement  # the evaluation's shuffled-speaker control uses the same draw
from libs.io import atomic_write_bytes, atomic_write_json, read_rgb

logger = logging.getLogger(__name__)

MARKER = 'stage_done'


# ----------------------------------------------------------------------------------------------------------------
# Resumable stages
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stage:
    """One step of the demo: ``run(folder)`` writes into ``<out>/<name>`` and returns a JSON-able summary."""
    name: str
    run: Callable[[str], dict]
    keys: Sequence[str] = ()        # dotted config keys whose values the outputs depend on
    deps: Sequence[str] = ()        # stages whose outputs it reads
    what: str = ''                  # one line for the console
    config: Optional[object] = None  # the config its keys are read from (default: the one run_stages gets)


def make_reproducible(threads: int) -> None:
    """Make this process compute the same bits on every rerun: a fixed number of torch threads (a float sum split
    over another number of threads adds in another order) and torch's deterministic kernels."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def config_value(config, key: str):
    """The plain value of a dotted config key (ConfigDicts as dicts)."""
    value = config
    for part in key.split('.'):
        value = value[part]
    return value.to_dict() if hasattr(value, 'to_dict') else value


def read_marker(folder: str):
    """The marker dict of a stage folder, or None when the stage never finished there."""
    path = os.path.join(folder, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def run_stages(stages: Sequence[Stage], config, out: str) -> Dict[str, dict]:
    """Run the stages in order, skipping those whose marker matches; returns every stage's marker."""
    markers = {}
    for number, stage in enumerate(stages, 1):
        folder = os.path.join(out, stage.name)
        # A dependency's marker carries the time it finished, so a rerun upstream invalidates this stage too.
        settings = dict(keys={k: config_value(stage.config or config, k) for k in stage.keys},
                        deps={d: [markers[d]['fingerprint'], markers[d]['finished']] for d in stage.deps})
        fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        old = read_marker(folder)
        if old is not None and old['fingerprint'] == fingerprint:
            logger.info('[%d/%d] %s: done earlier (%.0f s), reusing %s', number, len(stages), stage.name,
                        old['seconds'], folder)
            markers[stage.name] = old
            continue
        logger.info('[%d/%d] %s: %s%s', number, len(stages), stage.name, stage.what,
                    ' (settings changed: rebuilding)' if old is not None else '')
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        # process_time counts every thread of this process: with torch's intra-op threads it can exceed the wall
        # time on an idle machine, and on a busy one it is what the stage would have needed with the cores alone.
        start, cpu, load = time.time(), time.process_time(), os.getloadavg()[0]
        summary = stage.run(folder)
        markers[stage.name] = dict(fingerprint=fingerprint, finished=time.time(), seconds=round(time.time() - start, 1),
                                   cpu_seconds=round(time.process_time() - cpu, 1),
                                   load=[round(load, 2), round(os.getloadavg()[0], 2)], threads=torch.get_num_threads(),
                                   settings=settings, summary=summary)
        atomic_write_json(os.path.join(folder, MARKER), markers[stage.name])
        logger.info('[%d/%d] %s: finished in %.0f s (%.0f s of CPU)', number, len(stages), stage.name,
                    markers[stage.name]['seconds'], markers[stage.name]['cpu_seconds'])
    return markers


# ----------------------------------------------------------------------------------------------------------------
# Faces
# ----------------------------------------------------------------------------------------------------------------

def to_batch(images, resolution: int) -> torch.Tensor:
    """PIL faces -> (N, 3, R, R) in [-1, 1], with the official centre crop and resize."""
    from libs.autoencoder import center_crop_resize, to_tensor_m11
    return torch.stack([to_tensor_m11(center_crop_resize(image, resolution)) for image in images])


def load_faces(paths: Sequence[str], resolution: int) -> torch.Tensor:
    """PNG faces -> (N, 3, R, R) in [-1, 1]."""
    return to_batch([read_rgb(path) for path in paths], resolution)


def face_paths(data_root: str, split: str) -> List[str]:
    """Every face PNG of a synthetic split, sorted."""
    folder = os.path.join(data_root, 'test' if split == 'test' else '', 'image_v5_0')
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.png'))


# ----------------------------------------------------------------------------------------------------------------
# Tiny encoders and caption decoder, with tokenizers learned on the corpus
# ----------------------------------------------------------------------------------------------------------------

def build_components(config, corpus: Sequence[str], seed: int, caption_decoder_path: str, image_size: int) -> dict:
    """Write random CLIP text/vision encoders and a random caption decoder whose tokenizers are learned on `corpus`.

    Like libs.tiny_models.make_tiny_models, with the tokenizer sizes of config.demo.tokenizers: many more CLIP
    merges, so that an utterance fits in few text tokens (the U-ViT's cost grows with them), and a GPT-2 vocabulary
    big enough for whole words, which shortens what the caption decoder has to spell out.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from libs.caption_decoder import CaptionDecoder, build_tiny_gpt2_tokenizer, load_gpt2_tokenizer, \
        save_official_layout
    from libs.clip_encoders import CLIPTextEncoder, build_tiny_clip_tokenizer, build_tiny_clip_vision
    sizes, cd, text_dir = config.demo.tokenizers, config.caption_decoder, config.clip_text.name_or_path
    tokenizer = CLIPTokenizer.from_pretrained(build_tiny_clip_tokenizer(text_dir, corpus, sizes.clip_merges,
                                                                        config.num_text_tokens))
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=config.clip_text_dim,
                          intermediate_size=2 * config.clip_text_dim, num_hidden_layers=sizes.clip_layers,
                          num_attention_heads=sizes.clip_heads, max_position_embeddings=config.num_text_tokens,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    build_tiny_gpt2_tokenizer(corpus, cd.tokenizer, vocab_size=sizes.gpt2_vocab)
    gpt2_tokenizer = load_gpt2_tokenizer(cd.tokenizer, cd.gpt2.vocab_size, local_files_only=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        CLIPTextModel(text).save_pretrained(text_dir)
        torch.manual_seed(seed + 1)
        decoder = CaptionDecoder(cd, gpt2_tokenizer)
    unit_text_scale(decoder, CLIPTextEncoder(text_dir, local_files_only=True), corpus)
    save_official_layout(decoder, caption_decoder_path)
    build_tiny_clip_vision(config.clip_img.name_or_path, image_size=image_size, projection_dim=config.clip_img_dim,
                           seed=seed + 2)
    return dict(clip_text_vocab=len(tokenizer), gpt2_vocab=len(gpt2_tokenizer))


@torch.no_grad()
def unit_text_scale(decoder, clip_text, corpus: Sequence[str], batch_size: int = 256) -> float:
    """Scale the random ``encode_prefix`` so that the U-ViT's text features have unit std on `corpus`.

    The text counterpart of normalise_latent_scale: a random Linear leaves the features at about half the std of
    the image latents, which the same noise schedule would drown earlier. encode_prefix stays frozen while the
    caption decoder trains, so the decoder learns to read the rescaled space. Returns the factor applied.
    """
    hidden = torch.cat([clip_text.encode(list(corpus[i:i + batch_size])) for i in range(0, len(corpus), batch_size)])
    c = 1. / decoder.encode_prefix(hidden.float()).std().item()
    decoder.encode_prefix.weight *= c
    decoder.encode_prefix.bias *= c
    return c


# ----------------------------------------------------------------------------------------------------------------
# The codec: the tiny AutoencoderKL trained on the synthetic faces
# ----------------------------------------------------------------------------------------------------------------

INITIAL_LOGVAR = -8.  # posterior std e^-4 at the start (see train_codec)


def train_codec(vae_config, faces: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float,
                seed: int):
    """Train a FrozenAutoencoderKL's network on faces (N, 3, R, R) with LDM's loss minus the GAN; returns it, curve."""
    from libs.autoencoder import FrozenAutoencoderKL
    torch.manual_seed(seed)
    codec = FrozenAutoencoderKL(vae_config)
    vae = codec.vae.train().requires_grad_(True)
    with torch.no_grad():
        # A log-variance of 0 (the default bias) samples noise as large as the latents themselves and drowns the
        # reconstruction signal for hundreds of steps; starting nearly deterministic lets the KL open it up.
        vae.quant_conv.bias[vae.config.latent_channels:] = INITIAL_LOGVAR
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    generator, curve = torch.Generator().manual_seed(seed), []
    for step in tqdm(range(1, steps + 1), desc='codec', dynamic_ncols=True):
        x = faces[torch.randint(len(faces), (batch_size,), generator=generator)]
        mean, logvar = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        x_rec = vae.decoder(vae.post_quant_conv(z))
        # LDM's LPIPSWithDiscriminator without LPIPS and GAN: per-sample sums of L1 and KL, KL weighted by 1e-6.
        rec = (x_rec - x).abs().sum((1, 2, 3)).mean()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        optimizer.zero_grad(set_to_none=True)
        (rec + kl_weight * kl).backward()
        optimizer.step()
        curve.append(dict(step=step, l1=rec.item() / x[0].numel(), kl=kl.item()))
    return codec.eval().requires_grad_(False), curve[::max(1, steps // 100)]


@torch.no_grad()
def normalise_latent_scale(codec, faces: torch.Tensor) -> float:
    """Rescale the latent space so that ``scale_factor * posterior mean`` has unit std on `faces`; returns the factor.

    Stable Diffusion chose scale_factor = 1 / std of its latents; here the config's factor is kept and the network
    is reparameterised instead: the posterior mean and std are multiplied by c (quant_conv) and post_quant_conv
    divides by c, so decode(encode(x)) is unchanged.
    """
    vae = codec.vae
    means = torch.cat([codec.encode_moments(x).chunk(2, dim=1)[0] for x in faces.split(256)])
    c = 1. / (codec.scale_factor * means.std().item())
    n = vae.config.latent_channels
    vae.quant_conv.weight[:n] *= c
    vae.quant_conv.bias[:n] *= c
    vae.quant_conv.bias[n:] += 2 * torch.log(torch.tensor(c))
    vae.post_quant_conv.weight /= c
    return c


# ----------------------------------------------------------------------------------------------------------------
# U-ViT files: the pre-trained network in the official layout, the fine-tune's initial network
# ----------------------------------------------------------------------------------------------------------------

def export_official(exported: str, path: str, nnet_config) -> dict:
    """Save a train_empath.py export as an official ``uvit_v1.pth`` (a plain torch state dict) and load it back.

    The file is read back through libs.uvit.load_nnet_weights into a freshly built ``nnet_config`` network, which
    refuses any missing, unexpected or reshaped key: what the fine-tune's ``train.init_from`` will do with it.
    """
    import io

    from safetensors.torch import load_file

    from libs.uvit import build_nnet, load_nnet_weights
    state_dict = load_file(exported)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    nnet = build_nnet(nnet_config)
    new = load_nnet_weights(nnet, path)
    if new:  # an unconditional network has no condition keys to initialise: anything new is a layout error
        raise RuntimeError(f'{path} did not load strictly into {nnet_config.name}: {new} were missing')
    return dict(path=path, keys=len(state_dict), params=sum(v.numel() for v in state_dict.values()),
                loads_strictly_into=nnet_config.name)


def export_initial_nnet(config, path: str) -> None:
    """Write the U-ViT's step-0 weights: what train_empath.py starts from (same seed, same calls, same order)."""
    from libs import trainer
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        nnet = trainer.build_model(config)
    trainer.export_nnet(nnet.state_dict(), path, config, step=0)


# ----------------------------------------------------------------------------------------------------------------
# The control: the same test pairs with the speaker turns shuffled across pairs
# ----------------------------------------------------------------------------------------------------------------

SPEAKER_TENSORS = ('speaker_moments', 'speaker_clip_img', 'speaker_text')
SPEAKER_META = ('speaker_stem', 'speaker_text_raw')


def shuffle_speakers(source: str, target: str, seed: int) -> dict:
    """Copy the feature cache `source` to `target` with every pair's speaker turn taken from another conversation.

    The responses, gold emotions and pair identities stay, so an evaluation of `target` draws the same noise for
    each pair as one of `source`: a network that ignores the speaker gives the same responses on both, and its
    scores do not move; one that follows the speaker answers the wrong turn and falls to chance.
    """
    from libs.features import FeatureDataset, make_manifest, read_manifest, write_manifest, write_shard
    data, manifest = FeatureDataset(source), read_manifest(source)
    items = [data[i] for i in range(len(data))]
    p = derangement([item['conversation_id'] for item in items], seed)
    shuffled = [dict(item, **{k: items[p[i]][k] for k in SPEAKER_TENSORS + SPEAKER_META})
                for i, item in enumerate(items)]
    os.makedirs(target, exist_ok=True)
    shards, start = [], 0
    for k, entry in enumerate(manifest['shards']):
        shards.append(write_shard(target, k, shuffled[start:start + entry['pairs']]))
        start += entry['pairs']
    info = {k: v for k, v in manifest.items() if k not in ('format', 'version', 'num_pairs', 'tensors', 'shards')}
    write_manifest(target, make_manifest(shards, manifest['tensors'], **info,
                                         control=f'speaker turns shuffled across conversations (seed {seed}) from '
                                                 f'{source}'))
    same = sum(int(items[p[i]]['coarse_label']) == int(item['coarse_label']) for i, item in enumerate(items))
    return dict(pairs=len(items), same_coarse_emotion=same / len(items))
