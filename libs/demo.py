"""Building blocks of the newcomer's demo (scripts/demo.py): resumable stages, the codec and expression-classifier
trainings, the untrained baseline, the learning metrics and the self-contained HTML report.

A stage is done when ``<out>/<stage>/stage_done`` holds its fingerprint: a hash of the config values it reads and
of the markers of the stages it depends on. A rerun skips done stages; a changed config value or a rerun upstream
changes the fingerprint, and the stage's folder is deleted and rebuilt.
"""
import base64
import collections
import dataclasses
import hashlib
import html
import io
import json
import logging
import math
import os
import random
import shutil
import time
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

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
        settings = dict(keys={k: config_value(config, k) for k in stage.keys},
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
        start = time.time()
        summary = stage.run(folder)
        markers[stage.name] = dict(fingerprint=fingerprint, finished=time.time(), seconds=round(time.time() - start, 1),
                                   settings=settings, summary=summary)
        atomic_write_json(os.path.join(folder, MARKER), markers[stage.name])
        logger.info('[%d/%d] %s: finished in %.0f s', number, len(stages), stage.name, markers[stage.name]['seconds'])
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
# The untrained baseline
# ----------------------------------------------------------------------------------------------------------------

def export_initial_nnet(config, path: str) -> None:
    """Write the U-ViT's step-0 weights: the initialisation train_empath.py starts from (same seed, same order)."""
    from libs import trainer
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        nnet = trainer.build_model(config)
    trainer.export_nnet(nnet.state_dict(), path, config, step=0)


# ----------------------------------------------------------------------------------------------------------------
# Expression classifier: reads which expression a (generated) face shows
# ----------------------------------------------------------------------------------------------------------------

def response_expressions() -> tuple:
    """The expressions a listener's face can take (the values of RESPONSE_EXPRESSION), sorted."""
    from libs.synthetic import RESPONSE_EXPRESSION
    return tuple(sorted(set(RESPONSE_EXPRESSION.values())))


class ExpressionNet(nn.Module):
    """Three conv-ReLU-pool stages and a linear read-out: (B, 3, R, R) in [-1, 1] -> (B, classes) logits."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def render_expressions(n: int, size: int, classes: Sequence[str], seed: int, blur: bool):
    """n faces of random avatars with uniformly drawn expressions: (N, 3, R, R) in [-1, 1] and (N,) labels.

    ``blur`` softens a random half of them, so that the classifier does not hinge on pixel-sharp edges that no
    decoder reproduces; the held-out set stays sharp.
    """
    from PIL import ImageFilter

    from libs.autoencoder import to_tensor_m11
    from libs.synthetic import MAX_AVATAR_ID, render_face
    rng = random.Random(seed)
    faces, labels = [], []
    for _ in range(n):
        label = rng.randrange(len(classes))
        face = render_face(rng.randint(1, MAX_AVATAR_ID), classes[label], size, rng)
        if blur and rng.random() < .5:
            face = face.filter(ImageFilter.GaussianBlur(rng.uniform(.3, 1.5)))
        faces.append(to_tensor_m11(face))
        labels.append(label)
    return torch.stack(faces), torch.tensor(labels)


def train_expression_classifier(cfg, size: int, seed: int):
    """Train ExpressionNet on rendered faces; returns (net, classes, curve, accuracy on held-out rendered faces)."""
    classes = response_expressions()
    x, y = render_expressions(cfg.faces, size, classes, seed, blur=True)
    x_val, y_val = render_expressions(cfg.heldout_faces, size, classes, seed + 1, blur=False)
    torch.manual_seed(seed)
    net = ExpressionNet(len(classes))
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    generator, curve = torch.Generator().manual_seed(seed), []
    for step in tqdm(range(1, cfg.steps + 1), desc='expression classifier', dynamic_ncols=True):
        batch = torch.randint(len(x), (cfg.batch_size,), generator=generator)
        loss = F.cross_entropy(net(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(dict(step=step, loss=loss.item()))
    net.eval()
    return net, classes, curve[::max(1, cfg.steps // 100)], (classify(net, x_val) == y_val).double().mean().item()


@torch.no_grad()
def classify(net, faces: torch.Tensor) -> torch.Tensor:
    """Predicted class indices (N,) of faces (N, 3, R, R) in [-1, 1]."""
    return torch.cat([net(x).argmax(-1) for x in faces.split(256)])


# ----------------------------------------------------------------------------------------------------------------
# Learning metrics
# ----------------------------------------------------------------------------------------------------------------

def read_jsonl(path: str) -> List[dict]:
    """The records of a JSON-lines file."""
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def majority_rates(records: Sequence[dict]) -> dict:
    """Accuracy of always predicting the most frequent gold class (32- and 7-way) among the labelled pairs."""
    from libs.avamerg import coarse_index
    labels = [r['gold_label'] for r in records if r['gold_label'] >= 0]
    fine = collections.Counter(labels).most_common(1)[0][1] / len(labels)
    coarse = collections.Counter(coarse_index(x) for x in labels).most_common(1)[0][1] / len(labels)
    return dict(fine_acc=fine, coarse_acc=coarse)


def prescribed_expressions(records, classes) -> torch.Tensor:
    """Class index of the response expression the synthetic rule prescribes for each evaluated pair."""
    from libs.synthetic import expression_of
    return torch.tensor([classes.index(expression_of(r['gold_emotion'], 'response')) for r in records])


def expression_agreement(net, classes, eval_dir: str, resolution: int) -> dict:
    """Share of an evaluation's generated faces that the classifier reads as the prescribed response expression."""
    records = read_jsonl(os.path.join(eval_dir, 'pairs.jsonl'))
    prescribed = prescribed_expressions(records, classes)
    predicted = classify(net, load_faces([os.path.join(eval_dir, r['face']) for r in records], resolution))
    return dict(agreement=(predicted == prescribed).double().mean().item(), n=len(records),
                # String keys, as they read back from the stage marker's JSON.
                predicted={str(r['index']): classes[p] for r, p in zip(records, predicted.tolist())},
                prescribed_share=dict(collections.Counter(classes[p] for p in prescribed.tolist())))


@torch.no_grad()
def reference_agreement(net, classes, config, eval_dir: str, resolution: int) -> dict:
    """The same reading of the evaluated pairs' reference faces and of their codec reconstructions: the ceilings."""
    from libs.autoencoder import load_autoencoder
    from libs.avamerg import AvaMERG
    records = read_jsonl(os.path.join(eval_dir, 'pairs.jsonl'))
    reader = AvaMERG(config.data.root, 'test')
    faces = to_batch([reader.load_face(r['response_stem']) for r in records], resolution)
    codec = load_autoencoder(config.autoencoder.pretrained_path, config.autoencoder)
    mean = codec.encode_moments(faces).chunk(2, dim=1)[0]
    reconstructed = codec.decode(codec.scale_factor * mean).clamp(-1, 1)
    prescribed = prescribed_expressions(records, classes)
    return {name: (classify(net, x) == prescribed).double().mean().item()
            for name, x in (('reference_faces', faces), ('codec_reconstructions', reconstructed))}


# ----------------------------------------------------------------------------------------------------------------
# Report: inline SVG charts and base64 images in one HTML file
# ----------------------------------------------------------------------------------------------------------------

PALETTE = ('#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b')


def svg_chart(series: Dict[str, Sequence[tuple]], title: str, ylabel: str = '', width: int = 420,
              height: int = 220) -> str:
    """A line chart of {name: [(x, y), ...]} as inline SVG, with min/max axis labels and a legend."""
    points = [(x, y) for s in series.values() for x, y in s if y is not None]
    if not points:
        return ''
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, top, right, bottom = 48, 24, 10, 34
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<text x="{width / 2}" y="14" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#999"/>',
             f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{y1:.3g}</text>',
             f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">{y0:.3g}</text>',
             f'<text x="{left}" y="{height - bottom + 14}">{x0:g}</text>',
             f'<text x="{width - right}" y="{height - bottom + 14}" text-anchor="end">{x1:g}</text>',
             f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle">step</text>',
             f'<text x="12" y="{height / 2}" transform="rotate(-90 12 {height / 2})" '
             f'text-anchor="middle">{html.escape(ylabel)}</text>']
    for k, (name, s) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        path = ' '.join(f'{sx(x):.1f},{sy(y):.1f}' for x, y in s if y is not None)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        parts.append(f'<text x="{width - right - 4}" y="{top + 14 + 13 * k}" text-anchor="end" '
                     f'fill="{colour}">{html.escape(name)}</text>')
    return ''.join(parts) + '</svg>'


def img_tag(image, scale: int = 3, title: str = '') -> str:
    """A PIL image as an <img> with a base64 PNG, shown `scale` times larger with crisp pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    data = base64.b64encode(buffer.getvalue()).decode('ascii')
    return (f'<img src="data:image/png;base64,{data}" width="{image.width * scale}" title="{html.escape(title)}" '
            'style="image-rendering: pixelated">')


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """An HTML table; cells are inserted as given (escape text first)."""
    head = ''.join(f'<th>{h}</th>' for h in header)
    body = ''.join('<tr>' + ''.join(f'<td>{c}</td>' for c in row) + '</tr>' for row in rows)
    return f'<table><tr>{head}</tr>{body}</table>'


STYLE = ('body{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}table{border-collapse:collapse;'
         'margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}'
         'th{background:#f3f3f3}.good{color:#1a7f37;font-weight:bold}.note{color:#666;font-size:13px}'
         'code{background:#f3f3f3;padding:1px 3px}')


def html_page(title: str, sections: Sequence[tuple]) -> str:
    """A complete HTML document from (heading, html body) sections."""
    body = ''.join(f'<h2>{html.escape(h)}</h2>{b}' for h, b in sections)
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>')


# ----------------------------------------------------------------------------------------------------------------
# The report: learning numbers, examples, curves and an honest list of the small components
# ----------------------------------------------------------------------------------------------------------------

EXAMPLES = 12  # held-out pairs shown side by side


def learning_numbers(markers: dict) -> dict:
    """Trained vs untrained vs chance for every number the demo must show moving (what the test asserts)."""
    from libs.avamerg import COARSE_7, EMOTIONS_32
    trained, untrained = (markers[s]['summary']['metrics'] for s in ('eval', 'baseline'))
    majority, expression = markers['eval']['summary']['majority'], markers['expression']['summary']
    numbers = {}
    for key, uniform in (('fine_acc', 1 / len(EMOTIONS_32)), ('coarse_acc', 1 / len(COARSE_7))):
        numbers[f'emotion_{key}'] = dict(trained=trained['emotion'][key], untrained=untrained['emotion'][key],
                                         majority=majority[key], uniform=uniform)
    for key in ('fine_macro_f1', 'coarse_macro_f1'):
        numbers[f'emotion_{key}'] = dict(trained=trained['emotion'][key], untrained=untrained['emotion'][key])
    for key in ('bleu1', 'bleu2', 'bleu3', 'bleu4', 'dist1', 'dist2'):
        numbers[key] = dict(trained=trained[key], untrained=untrained[key])
    shares = expression['eval']['prescribed_share']
    numbers['expression_agreement'] = dict(
        trained=expression['eval']['agreement'], untrained=expression['baseline']['agreement'],
        majority=max(shares.values()) / sum(shares.values()), uniform=1 / len(expression['classes']))
    return numbers


def count_params(path: str) -> int:
    """Number of parameters in a .safetensors or weights-only torch checkpoint."""
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(path, 'pt') as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return sum(v.numel() for v in torch.load(path, map_location='cpu', weights_only=True).values())


def components_rows(config, markers) -> list:
    """(part, what the demo uses, what the real model uses) rows, with sizes read from the written files."""
    def hf(folder):
        with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
            return json.load(f), count_params(os.path.join(folder, 'model.safetensors'))
    (text, n_text), (vision, n_vision) = hf(config.clip_text.name_or_path), hf(config.clip_img.name_or_path)
    cd, codec, caption = config.caption_decoder, markers['codec']['summary'], markers['caption_decoder']['summary']
    vae, nnet, train = config.autoencoder, config.nnet, config.train
    return [
        ('CLIP text encoder', f'transformers CLIPTextModel, {text["num_hidden_layers"]} layers of width '
         f'{text["hidden_size"]}, {text["max_position_embeddings"]} tokens, {n_text:,} parameters, <b>random weights'
         f'</b>; its BPE tokenizer ({text["vocab_size"]} tokens) was learned on the synthetic corpus',
         'OpenAI CLIP ViT-L/14 text encoder (123M parameters, 77 tokens, width 768)'),
        ('CLIP image encoder', f'transformers CLIPVisionModelWithProjection, {vision["num_hidden_layers"]} layers, '
         f'{vision["image_size"]}px input, {vision["projection_dim"]}-d embedding, {n_vision:,} parameters, '
         '<b>random weights</b>', 'OpenAI CLIP ViT-B/32 (88M parameters, 224px, 512-d)'),
        ('caption decoder', f'GPT-2 prefix decoder, {cd.gpt2.n_layer} layers of width {cd.gpt2.n_embd}, '
         f'{count_params(cd.pretrained_path):,} parameters, byte-level BPE learned on the corpus; random '
         f'initialisation fine-tuned here on {caption["train_utterances"]} utterances (held-out round-trip '
         f'BLEU-4 {caption["bleu_before"]["bleu4"]:.1f} &rarr; {caption["bleu_after"]["bleu4"]:.1f}); '
         'encode_prefix stays random (rescaled to unit feature std) and frozen',
         'GPT-2 base (124M) trained by UniDiffuser on image captions'),
        ('VAE', f'diffusers AutoencoderKL, channels {tuple(vae.block_out_channels)} '
         f'({2 ** (len(vae.block_out_channels) - 1)}x downsampling), '
         f'{vae.latent_channels} latent channels, {codec["params"]:,} parameters, trained here for '
         f'{config.demo.codec.steps} steps on {codec["faces"]} synthetic faces (held-out PSNR '
         f'{codec["heldout_psnr"]:.1f} dB); saved in the LDM layout and read by the real loader',
         'Stable Diffusion KL-f8 (84M parameters, 8x downsampling, 4 channels)'),
        ('U-ViT', f'EmpathDiffuser U-ViT, depth {nnet.depth}, width {nnet.embed_dim}, '
         f'{count_params(markers["train"]["summary"]["nnet"]):,} parameters, <b>trained from scratch</b> for '
         f'{train.n_steps} steps of {train.batch_size} pairs (no pretrained UniDiffuser exists at this size)',
         'UniDiffuser-v1 (952M parameters, depth 30, width 1536) fine-tuned on AvaMERG'),
        ('expression classifier', f'a 3-stage CNN trained on {config.demo.classifier.faces} faces drawn by '
         'libs.synthetic.render_face (accuracy on sharp held-out drawings '
         f'{markers["expression"]["summary"]["heldout_rendered_acc"]:.3f}); a measuring instrument, not part of the '
         'model', 'none (AvaMERG has no expression labels)'),
    ]


def example_rows(config, out: str, markers) -> list:
    """Speaker | generated (trained) | untrained | reference cells of the first held-out pairs."""
    from libs.avamerg import AvaMERG
    from libs.synthetic import expression_of
    reader = AvaMERG(config.data.root, 'test')
    trained = read_jsonl(os.path.join(out, 'eval', 'pairs.jsonl'))[:EXAMPLES]
    untrained = {r['index']: r for r in read_jsonl(os.path.join(out, 'baseline', 'pairs.jsonl'))}
    expression = markers['expression']['summary']
    face = lambda stem: img_tag(reader.load_face(stem).resize((96, 96)), scale=1)  # noqa: E731
    rows = []
    for r in trained:
        i, base = r['index'], untrained[r['index']]
        prescribed = expression_of(r['gold_emotion'], 'response')
        reads = {k: expression[k]['predicted'][str(i)] for k in ('eval', 'baseline')}
        mark = lambda e: f'<span class="good">{e}</span>' if e == prescribed else e  # noqa: E731
        top3 = ', '.join(f'{name} {p:.2f}' for name, p in r['top3'])
        rows.append((
            f'{face(r["speaker_stem"])}<br>{html.escape(r["speaker_text"])}',
            f'{img_tag(read_rgb(os.path.join(out, "eval", r["face"])), 3)}<br>{html.escape(r["generated"])}'
            f'<br><i>emotion:</i> {html.escape(top3)}<br><i>face reads as:</i> {mark(reads["eval"])}',
            f'{img_tag(read_rgb(os.path.join(out, "baseline", base["face"])), 3)}<br>'
            f'{html.escape(base["generated"][:120])}<br><i>face reads as:</i> {mark(reads["baseline"])}',
            f'{face(r["response_stem"])}<br>{html.escape(r["reference"])}<br><i>gold emotion:</i> '
            f'{html.escape(r["gold_emotion"])}<br><i>prescribed face:</i> {prescribed}'))
    return rows


def fmt(value) -> str:
    """A metric for a table cell."""
    return '&ndash;' if value is None else f'{value:.3f}' if isinstance(value, float) else str(value)


def write_report(out: str, config, markers: dict, schedule: str) -> dict:
    """Write <out>/metrics.json and the self-contained <out>/report.html; returns the metrics."""
    numbers = learning_numbers(markers)
    ev = markers['eval']['summary']
    fid = dict(computed=ev['metrics'].get('fid') is not None, value=ev['metrics'].get('fid'),
               skipped_because=ev['fid_skipped_because'])
    summary = dict(schedule=schedule, learning=numbers, fid=fid, evaluation=ev['settings'],
                   codec={k: v for k, v in markers['codec']['summary'].items() if k != 'curve'},
                   caption_decoder={k: markers['caption_decoder']['summary'][k] for k in ('bleu_before', 'bleu_after')},
                   expression_classifier={k: markers['expression']['summary'][k] for k in (
                                              'classes', 'heldout_rendered_acc', 'reference_faces',
                                              'codec_reconstructions')},
                   stage_seconds={name: m['seconds'] for name, m in markers.items()})
    atomic_write_json(os.path.join(out, 'metrics.json'), summary)

    labels = dict(emotion_fine_acc='emotion accuracy, 32-way', emotion_coarse_acc='emotion accuracy, 7-way',
                  emotion_fine_macro_f1='emotion macro-F1, 32-way', emotion_coarse_macro_f1='emotion macro-F1, 7-way',
                  bleu1='BLEU-1', bleu2='BLEU-2', bleu3='BLEU-3', bleu4='BLEU-4', dist1='Dist-1', dist2='Dist-2',
                  expression_agreement='response face shows the prescribed expression')
    metric_rows = [(labels[k], f'<b>{fmt(v["trained"])}</b>', fmt(v['untrained']), fmt(v.get('majority')),
                    fmt(v.get('uniform'))) for k, v in numbers.items()]
    curve = markers['train']['summary']['curve']
    train_points = [r for r in curve if 'loss' in r]
    val_points = [r for r in curve if 'val/ema/emotion_fine_acc' in r]
    charts = [
        svg_chart({k: [(r['step'], r[f'loss_{k}']) for r in train_points] for k in ('img', 'clip', 'text')},
                  'EmpathDiffuser: noise-prediction losses', 'MSE'),
        svg_chart({'emotion CE': [(r['step'], r['loss_emotion']) for r in train_points]},
                  'EmpathDiffuser: emotion cross-entropy', 'CE'),
        svg_chart({f'{n}-way': [(r['step'], r[f'val/ema/emotion_{k}_acc']) for r in val_points]
                   for n, k in ((32, 'fine'), (7, 'coarse'))}, 'held-out emotion accuracy (EMA)', 'accuracy'),
        svg_chart({'L1 per pixel': [(r['step'], r['l1']) for r in markers['codec']['summary']['curve']]},
                  'codec reconstruction', 'L1'),
        svg_chart({'LM loss': [(r['step'], r['loss']) for r in markers['caption_decoder']['summary']['loss_curve']]},
                  'caption decoder', 'CE'),
        svg_chart({'CE': [(r['step'], r['loss']) for r in markers['expression']['summary']['curve']]},
                  'expression classifier', 'CE')]
    codec_figure = ''.join(f'<p>{name}<br>{img_tag(read_rgb(os.path.join(out, "codec", name + ".png")), 3)}</p>'
                           for name in ('originals', 'reconstructions'))
    confusion_tag = img_tag(read_rgb(os.path.join(out, 'eval', 'confusion_7.png')), 1)
    fid_text = (f'FID {fid["value"]:.2f} ({ev["settings"]["samples"]} faces)' if fid['computed'] else
                f'FID not computed: {html.escape(fid["skipped_because"] or "")}')
    ex = summary['expression_classifier']
    expression_text = (f'The expression classifier ({", ".join(ex["classes"])}) reads the prescribed expression on '
                       f'{ex["reference_faces"]:.3f} of the reference faces and on {ex["codec_reconstructions"]:.3f} '
                       'of their codec reconstructions: what the generated faces could reach at best.')
    commands = [c for m in markers.values() for c in (m.get('summary') or {}).get('commands', [])]
    settings = ev['settings']
    sections = [
        ('What this is', '<p>The whole EmpathDiffuser pipeline on a <b>synthetic</b> AvaMERG: a speaker face and '
         'utterance in, a listener face and utterance out, plus the speaker\'s emotion. In the synthetic data the '
         'speaker\'s face and words follow the speaker\'s emotion, and the listener reacts with a prescribed '
         'expression and a templated reply (libs/synthetic.py), so learning can be measured exactly. The listener '
         f'is one avatar (ID {", ".join(map(str, config.demo.listeners))}), as an empathetic agent would be, and each '
         'of its expressions tints the complexion, so that the expression is still legible at 32 pixels after a '
         'tiny codec; speakers are drawn from all avatars. Every '
         'component is small and local (list below): the numbers show that the pipeline learns, not how good the '
         f'real model is. Schedule: <b>{schedule}</b>; evaluation on {settings["samples"]} held-out pairs, '
         f'{settings["sample_steps"]} DPM-Solver++ steps, guidance scale {settings["guidance_scale"]}, seed '
         f'{settings["seed"]}.</p>'),
        ('Learning', table(('metric (held-out pairs)', 'trained', 'untrained', 'majority class', 'uniform chance'),
                           metric_rows) + f'<p class="note">{expression_text}</p><p class="note">{fid_text}</p>'
         + confusion_tag),
        ('Examples', table(('speaker turn', 'EmpathDiffuser (trained)', 'untrained network', 'reference'),
                           example_rows(config, out, markers))),
        ('Curves', ''.join(charts)),
        ('Codec: held-out faces and their reconstructions', codec_figure),
        ('The small components (not the real ones)', table(('part', 'in this demo', 'in the real model'),
                                                            components_rows(config, markers))),
        ('Stages', table(('stage', 'seconds'), [(n, m['seconds']) for n, m in markers.items()])
         + '<pre>' + html.escape('\n'.join(commands)) + '</pre>'),
    ]
    page = html_page('EmpathDiffuser demo on synthetic AvaMERG', sections)
    atomic_write_bytes(os.path.join(out, 'report.html'), page.encode('utf-8'))
    return summary
