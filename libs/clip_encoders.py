"""Frozen CLIP encoders as UniDiffuser uses them, plus tiny offline builders for tests and demos.

Text: `CLIPTextModel` last hidden state of prompts padded to the model's context length with `<|endoftext|>`
(UniDiffuser's `FrozenCLIPEmbedder`). Image: `CLIPVisionModelWithProjection.image_embeds` (OpenAI
`encode_image`) of the image preprocessed like OpenAI's torchvision transform, done here with PIL.
Hub ids and ``hf://`` references are resolved to local folders by libs/hub.py first, so transformers only reads local
files; a folder that still loads as an empty tokenizer (transformers does not raise there) raises `UserError`.
"""
import collections
import json
import logging
import os
import pickle
import re

import numpy as np
import torch
from PIL import Image
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from libs import hub
from libs.errors import UserError
from libs.io import load_error
from libs.memory import chunked

logger = logging.getLogger(__name__)

TEXT_HUB_ID = 'openai/clip-vit-large-patch14'
IMAGE_HUB_ID = 'openai/clip-vit-base-patch32'
# OpenAI's normalisation constants, used when a model directory has no preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPENAI_CONTEXT_LENGTH = 77  # default context of the tiny builders, so they match the real text encoder
PREPROCESSOR_CONFIG = 'preprocessor_config.json'
BOS, EOS, END_OF_WORD = '<|startoftext|>', '<|endoftext|>', '</w>'
TINY_TOKENIZER_TEXTS = ('i feel so happy today', 'i am sorry to hear that', 'that sounds really hard',
                        'a happy dog runs in the park', 'what happened to you?')


def _how_to_get(hub_id, kind):
    """How to get a complete model folder: the Hub reference, or the command that puts a local copy in models/."""
    local = f'models/{hub_id.split("/")[-1]}'
    return (f'pass {hub.HF_PREFIX}{hub_id} (downloaded into the Hugging Face cache), or run '
            f'`{hub.download_command(hub_id, hub.LAYOUTS[kind].wanted(), local_dir=local)}` and pass {local}')


def _load_model(model_cls, name_or_path, local_files_only, hub_id, kind):
    """`from_pretrained` that fails loudly on missing files and on weights it would silently initialise."""
    try:
        model, info = model_cls.from_pretrained(name_or_path, local_files_only=local_files_only,
                                                output_loading_info=True, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as err:  # missing files / bad id / wrong shapes, respectively
        raise UserError(f'cannot load {model_cls.__name__} from {name_or_path!r} (not a complete model folder, or '
                        f'a different architecture): {err}\n'
                        f'To fix: {_how_to_get(hub_id, kind)}.') from err
    except pickle.UnpicklingError as err:  # a pytorch_model.bin holding objects: torch.load refused it
        raise UserError(f'cannot load {model_cls.__name__} from {name_or_path!r}: {load_error(err)}. '
                        f'To fix: {_how_to_get(hub_id, kind)}.') from err
    if info['missing_keys']:
        raise UserError(f'{name_or_path!r} holds no {model_cls.__name__} weights for {len(info["missing_keys"])} '
                        f'parameters (first: {sorted(info["missing_keys"])[:3]}); {_how_to_get(hub_id, kind)}.')
    return model.eval().requires_grad_(False)


def _load_tokenizer(name_or_path, local_files_only, vocab_size):
    """Load the CLIP tokenizer and check that it is real and matches the text model."""
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise UserError(f'cannot load the CLIP tokenizer from {name_or_path!r}: {err}\n'
                        f'To fix: {_how_to_get(TEXT_HUB_ID, "clip_text")}.') from err
    # Offline, transformers returns a tokenizer holding only the special tokens instead of raising.
    if len(tokenizer) <= len(tokenizer.all_special_ids):
        raise UserError(f'the CLIP tokenizer loaded from {name_or_path!r} is empty ({len(tokenizer)} tokens): '
                        f'vocab.json / merges.txt are missing there; {_how_to_get(TEXT_HUB_ID, "clip_text")}.')
    if len(tokenizer) > vocab_size:
        raise UserError(f'the tokenizer in {name_or_path!r} has {len(tokenizer)} tokens but the text model only '
                        f'{vocab_size} embeddings: tokenizer and model come from different checkpoints.')
    if tokenizer.pad_token != EOS:
        raise UserError(f'the tokenizer in {name_or_path!r} pads with {tokenizer.pad_token!r}; UniDiffuser '
                        f'features pad with {EOS!r} (OpenAI CLIP ViT-L/14 tokenizer).')
    return tokenizer


class CLIPTextEncoder(torch.nn.Module):
    """Frozen CLIP text transformer: prompts -> last hidden state (B, max_length, D)."""

    def __init__(self, name_or_path=TEXT_HUB_ID, local_files_only=False, max_length=None, device='cpu', chunk=None):
        super().__init__()
        self.chunk = chunk  # prompts per forward (config.encoders.clip_chunk; None: the whole batch)
        name_or_path = hub.local_path(name_or_path, 'clip_text', local_files_only, 'CLIP text encoder')
        self.model = _load_model(CLIPTextModel, name_or_path, local_files_only, TEXT_HUB_ID, 'clip_text')
        self.tokenizer = _load_tokenizer(name_or_path, local_files_only, self.model.config.vocab_size)
        context = self.model.config.max_position_embeddings
        if max_length is not None and not 0 < max_length <= context:
            raise UserError(f'max_length={max_length} is outside 1..{context}, the context of {name_or_path!r}')
        self.max_length = context if max_length is None else max_length
        self.to(device)

    @property
    def device(self):
        """Device of the model weights."""
        return next(self.model.parameters()).device

    def count_tokens(self, text):
        """Number of tokens of `text`, start and end tokens included, before any truncation."""
        return len(self.tokenizer(text, verbose=False).input_ids)

    def tokenize(self, texts):
        """Prompts -> ids (B, max_length), truncated (one warning line per call) and padded with <|endoftext|>."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        lengths = [len(ids) for ids in self.tokenizer(texts, verbose=False).input_ids]
        long = [i for i, n in enumerate(lengths) if n > self.max_length]
        if long:
            worst = max(long, key=lengths.__getitem__)
            logger.warning('%d of %d CLIP prompts truncated to %d tokens (longest: prompt %d, %d tokens, %r)',
                           len(long), len(texts), self.max_length, worst, lengths[worst], texts[worst][:60])
        return self.tokenizer(texts, padding='max_length', truncation=True, max_length=self.max_length,
                              return_tensors='pt').input_ids

    @torch.no_grad()
    def encode(self, texts):
        """Prompts -> last hidden state (B, max_length, D)."""
        # No attention mask, as in the official embedder: the causal mask alone shapes every position.
        return chunked(lambda ids: self.model(input_ids=ids).last_hidden_state, self.chunk,
                       self.tokenize(texts).to(self.device))


def _side(entry, default, square):
    """A side length from an image-processor size entry: int, {'shortest_edge': n} or, if square, {height, width}."""
    if entry is None:
        return default
    if isinstance(entry, int):
        return entry
    if not square and set(entry) == {'shortest_edge'}:
        return entry['shortest_edge']
    if square and set(entry) == {'height', 'width'} and entry['height'] == entry['width']:
        return entry['height']
    raise UserError(f'unsupported image-processor size entry {entry}: CLIP resizes the shortest edge '
                    '({"shortest_edge": n}) and centre-crops a square ({"height": n, "width": n})')


def _preprocessor_config(folder):
    """The saved image-processor settings of a model folder ({} when absent)."""
    path = os.path.join(folder, PREPROCESSOR_CONFIG)
    if not os.path.isfile(path):
        logger.info('no %s in %s: using OpenAI CLIP preprocessing defaults', PREPROCESSOR_CONFIG, folder)
        return {}
    with open(path) as f:
        return json.load(f)


class CLIPImageEncoder(torch.nn.Module):
    """Frozen CLIP vision tower + projection: PIL images -> image_embeds (B, 1, D), i.e. OpenAI encode_image."""

    def __init__(self, name_or_path=IMAGE_HUB_ID, local_files_only=False, device='cpu', chunk=None):
        super().__init__()
        self.chunk = chunk  # images per forward (config.encoders.clip_chunk; None: the whole batch)
        name_or_path = hub.local_path(name_or_path, 'clip_img', local_files_only, 'CLIP image encoder')
        self.model = _load_model(CLIPVisionModelWithProjection, name_or_path, local_files_only, IMAGE_HUB_ID,
                                 'clip_img')
        cfg = _preprocessor_config(name_or_path)
        image_size = self.model.config.image_size
        self.resize_to = _side(cfg.get('size'), image_size, square=False)
        self.crop_size = _side(cfg.get('crop_size'), image_size, square=True)
        if self.crop_size != image_size or self.resize_to < self.crop_size:
            raise UserError(f'{name_or_path!r}: preprocessing (resize {self.resize_to}, crop {self.crop_size}) '
                            f'does not produce the {image_size}px input the vision model expects')
        # Normalisation runs on the CPU in float32, as torchvision's Normalize does in OpenAI's pipeline.
        self.mean = torch.tensor(cfg.get('image_mean', OPENAI_CLIP_MEAN), dtype=torch.float32)
        self.std = torch.tensor(cfg.get('image_std', OPENAI_CLIP_STD), dtype=torch.float32)
        self.to(device)

    @property
    def device(self):
        """Device of the model weights."""
        return next(self.model.parameters()).device

    def preprocess(self, images):
        """PIL images -> CPU (B, 3, S, S): bicubic shortest-edge resize, centre crop, /255, mean/std (OpenAI)."""
        images = [images] if isinstance(images, Image.Image) else images
        return torch.stack([self._preprocess_one(image) for image in images])

    def _preprocess_one(self, image):
        """One PIL image -> (3, S, S), with torchvision's Resize(int) and CenterCrop rounding."""
        image = image.convert('RGB')
        width, height = image.size
        long_side = int(self.resize_to * max(width, height) / min(width, height))
        size = (self.resize_to, long_side) if width <= height else (long_side, self.resize_to)
        image = image.resize(size, Image.BICUBIC)
        left = int(round((size[0] - self.crop_size) / 2.0))
        top = int(round((size[1] - self.crop_size) / 2.0))
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        return (pixels - self.mean[:, None, None]) / self.std[:, None, None]

    @torch.no_grad()
    def encode(self, images):
        """PIL image(s) -> projected image embeddings (B, 1, projection_dim)."""
        return self.embed(self.preprocess(images))

    @torch.no_grad()
    def embed(self, pixel_values):
        """Preprocessed images (B, 3, S, S) -> projected image embeddings (B, 1, projection_dim), in chunks."""
        return chunked(lambda x: self.model(pixel_values=x).image_embeds[:, None, :], self.chunk,
                       pixel_values.to(self.device))


def _learn_merges(texts, num_merges):
    """Greedy byte-level BPE over the words of `texts`: the most frequent adjacent pair is merged first."""
    byte_char = bytes_to_unicode()  # maps no byte to whitespace, so words can be space-separated symbols
    words = collections.Counter()
    for text in texts:
        for word in re.findall(r'[a-z]+|[0-9]|[^\sa-z0-9]+', text.lower()):
            words[' '.join(byte_char[b] for b in word.encode('utf-8')) + END_OF_WORD] += 1
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            symbols = word.split()
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))  # ties broken deterministically
        merges.append(best)
        pattern = re.compile(r'(?<!\S)' + re.escape(' '.join(best)) + r'(?!\S)')
        merged = collections.Counter()
        for word, count in words.items():
            merged[pattern.sub(''.join(best), word)] += count
        words = merged
    return merges


def build_tiny_clip_tokenizer(out_dir, texts=None, num_merges=64, max_length=OPENAI_CONTEXT_LENGTH):
    """Write a small CLIP BPE tokenizer (vocab.json, merges.txt) in the layout of the OpenAI one; return out_dir."""
    merges = _learn_merges(TINY_TOKENIZER_TEXTS if texts is None else texts, num_merges)
    base = list(bytes_to_unicode().values())
    tokens = base + [c + END_OF_WORD for c in base] + [a + b for a, b in merges] + [BOS, EOS]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'vocab.json'), 'w') as f:
        json.dump({token: i for i, token in enumerate(dict.fromkeys(tokens))}, f)
    with open(os.path.join(out_dir, 'merges.txt'), 'w') as f:
        f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
    with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
        json.dump(dict(tokenizer_class='CLIPTokenizer', model_max_length=max_length, bos_token=BOS,
                       eos_token=EOS, pad_token=EOS, unk_token=EOS), f, indent=1)
    return out_dir


def build_tiny_clip_text(out_dir, texts=None, hidden_size=32, num_layers=2, num_heads=2,
                         max_length=OPENAI_CONTEXT_LENGTH, seed=0):
    """Save a tiny random CLIPTextModel with its tokenizer in out_dir (loadable by CLIPTextEncoder)."""
    tokenizer = CLIPTokenizer.from_pretrained(build_tiny_clip_tokenizer(out_dir, texts, max_length=max_length))
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=num_layers, num_attention_heads=num_heads,
                            max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        CLIPTextModel(config).save_pretrained(out_dir)
    return out_dir


def build_tiny_clip_vision(out_dir, image_size=32, patch_size=8, hidden_size=32, projection_dim=16,
                           num_layers=2, num_heads=2, seed=0, intermediate_size=None):
    """Save a tiny random CLIPVisionModelWithProjection and an OpenAI-style preprocessor config in out_dir.

    intermediate_size: the MLP width (default 2 * hidden_size; OpenAI's towers use 4 * hidden_size).
    """
    config = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                              intermediate_size=intermediate_size or 2 * hidden_size, projection_dim=projection_dim,
                              num_hidden_layers=num_layers, num_attention_heads=num_heads)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        CLIPVisionModelWithProjection(config).save_pretrained(out_dir)
    with open(os.path.join(out_dir, PREPROCESSOR_CONFIG), 'w') as f:
        json.dump(dict(image_processor_type='CLIPImageProcessor', do_resize=True, size={'shortest_edge': image_size},
                       resample=int(Image.BICUBIC), do_center_crop=True,
                       crop_size={'height': image_size, 'width': image_size}, do_rescale=True,
                       rescale_factor=1 / 255, do_normalize=True, image_mean=list(OPENAI_CLIP_MEAN),
                       image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True), f, indent=1)
    return out_dir
