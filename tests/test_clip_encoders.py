"""CLIP encoders through the real from_pretrained path on tiny saved models: tokens, shapes, preprocessing, errors."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                          CLIPVisionModelWithProjection)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from libs.clip_encoders import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPImageEncoder, CLIPTextEncoder,
                                build_tiny_clip_text, build_tiny_clip_vision)
from libs.errors import UserError

CONTEXT = 16  # a short context keeps truncation cheap to exercise
IMAGE_SIZE = 32


@pytest.fixture(scope='module')
def text_dir(tmp_path_factory):
    """A tiny CLIP text model and tokenizer saved with save_pretrained."""
    return build_tiny_clip_text(str(tmp_path_factory.mktemp('clip') / 'text'), max_length=CONTEXT)


@pytest.fixture(scope='module')
def vision_dir(tmp_path_factory):
    """A tiny CLIP vision model with projection and its preprocessor config."""
    return build_tiny_clip_vision(str(tmp_path_factory.mktemp('clip') / 'vision'), image_size=IMAGE_SIZE)


def _reference_bpe_ids(text_dir, text):
    """Independent byte-level BPE of lower-case space-separated words with the saved vocab and merges."""
    with open(os.path.join(text_dir, 'vocab.json')) as f:
        vocab = json.load(f)
    with open(os.path.join(text_dir, 'merges.txt')) as f:
        ranks = {tuple(line.split()): i for i, line in enumerate(f.read().splitlines()[1:])}
    byte_char, ids = bytes_to_unicode(), []
    for word in text.lower().split():
        symbols = [byte_char[b] for b in word.encode()]
        symbols[-1] += '</w>'
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, float('inf')))
            if pair not in ranks:
                break
            i = next(i for i in range(len(symbols) - 1) if (symbols[i], symbols[i + 1]) == pair)
            symbols[i:i + 2] = [''.join(pair)]
        ids += [vocab[s] for s in symbols]
    return [vocab['<|startoftext|>']] + ids + [vocab['<|endoftext|>']]


def test_tiny_tokenizer_has_the_openai_layout(text_dir):
    with open(os.path.join(text_dir, 'vocab.json')) as f:
        vocab = json.load(f)
    byte_chars = list(bytes_to_unicode().values())
    assert [vocab[c] for c in byte_chars] == list(range(256))
    assert [vocab[c + '</w>'] for c in byte_chars] == list(range(256, 512))
    assert vocab['<|startoftext|>'] == len(vocab) - 2 and vocab['<|endoftext|>'] == len(vocab) - 1
    assert len(vocab) > 512 + 2  # some merges were learnt
    encoder = CLIPTextEncoder(text_dir, local_files_only=True)
    assert len(encoder.tokenizer) == len(vocab) == encoder.model.config.vocab_size


def test_padding_uses_endoftext_and_encode_shapes(text_dir):
    encoder = CLIPTextEncoder(text_dir, local_files_only=True)
    assert encoder.max_length == CONTEXT  # from max_position_embeddings
    prompts = ['a happy dog', 'I am so sorry to hear that']
    ids = encoder.tokenize(prompts)
    assert ids.shape == (2, CONTEXT)
    for row, prompt in zip(ids.tolist(), prompts):
        expected = _reference_bpe_ids(text_dir, prompt)
        assert encoder.count_tokens(prompt) == len(expected)
        assert row == expected + [expected[-1]] * (CONTEXT - len(expected))  # pad = <|endoftext|>
    hidden = encoder.encode(prompts)
    assert hidden.shape == (2, CONTEXT, encoder.model.config.hidden_size)
    # The full hidden state of an unmasked forward pass, as the official embedder takes it.
    reference = CLIPTextModel.from_pretrained(text_dir)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(hidden, reference)


def test_long_prompt_is_truncated_with_a_warning(text_dir, caplog):
    encoder = CLIPTextEncoder(text_dir, local_files_only=True)
    long_prompt = ' '.join(['happy'] * (CONTEXT + 5))
    full = _reference_bpe_ids(text_dir, long_prompt)
    with caplog.at_level(logging.WARNING, logger='libs.clip_encoders'):
        ids = encoder.tokenize(['short', long_prompt, ' '.join(['happy'] * CONTEXT)])[1].tolist()
    assert len(caplog.records) == 1  # one summary line per call, not one line per prompt
    message = caplog.records[0].getMessage()
    assert f'2 of 3 CLIP prompts truncated to {CONTEXT} tokens' in message
    assert 'prompt 1' in message and f'{len(full)} tokens' in message  # the longest one
    assert ids == full[:CONTEXT - 1] + [full[-1]]  # the end token survives truncation
    assert encoder.count_tokens(long_prompt) == len(full) > CONTEXT


def test_max_length_is_checked(text_dir):
    assert CLIPTextEncoder(text_dir, local_files_only=True, max_length=8).tokenize('hi').shape == (1, 8)
    with pytest.raises(UserError, match='max_length'):
        CLIPTextEncoder(text_dir, local_files_only=True, max_length=CONTEXT + 1)


def test_offline_failures_are_loud(text_dir, tmp_path):
    empty = str(tmp_path / 'no_vocab')
    shutil.copytree(text_dir, empty)
    os.remove(os.path.join(empty, 'vocab.json'))
    os.remove(os.path.join(empty, 'merges.txt'))
    with pytest.raises(UserError, match='empty'):  # transformers itself returns a 2-token tokenizer here
        CLIPTextEncoder(empty, local_files_only=True)
    no_weights = str(tmp_path / 'no_weights')
    shutil.copytree(text_dir, no_weights)
    os.remove(os.path.join(no_weights, 'model.safetensors'))
    for missing in (no_weights, str(tmp_path / 'absent')):
        with pytest.raises(UserError, match='hf download openai/clip-vit-large-patch14 config.json'):
            CLIPTextEncoder(missing, local_files_only=True)
    # A hub id is looked up in the Hugging Face cache (never by transformers): the command fetches that repository.
    with pytest.raises(UserError, match='hf download no-such-org/no-such-clip config.json'):
        CLIPTextEncoder('no-such-org/no-such-clip', local_files_only=True)
    for wrong in (str(tmp_path / 'absent'), text_dir):  # nothing there / a text model's weights
        with pytest.raises(UserError, match='openai/clip-vit-base-patch32'):
            CLIPImageEncoder(wrong, local_files_only=True)


def test_full_clip_checkpoint_as_on_the_hub(text_dir, tmp_path):
    # The hub repositories hold a whole CLIPModel; each encoder must take its own tower from it, nothing new.
    text_config = CLIPTextConfig.from_pretrained(text_dir).to_dict()
    vision_config = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
    full = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16))
    full.save_pretrained(str(tmp_path))
    for name in ('vocab.json', 'merges.txt', 'tokenizer_config.json'):
        shutil.copy(os.path.join(text_dir, name), str(tmp_path))
    text, image = CLIPTextEncoder(str(tmp_path), True), CLIPImageEncoder(str(tmp_path), True)
    ids = text.tokenize(['a happy dog'])
    torch.testing.assert_close(text.encode(['a happy dog']), full.text_model(input_ids=ids).last_hidden_state)
    picture = Image.fromarray(np.random.RandomState(1).randint(0, 256, (40, 40, 3), dtype=np.uint8))
    pooled = full.vision_model(pixel_values=image.preprocess(picture)).pooler_output
    torch.testing.assert_close(image.encode(picture)[:, 0], full.visual_projection(pooled))


@pytest.mark.parametrize('width, height, resized, offset', [
    (80, 50, (51, 32), (10, 0)),  # long side int(32 * 80 / 50) = 51; left = round(19 / 2) = 10 (torchvision)
    (50, 80, (32, 51), (0, 10)),
    (32, 32, (32, 32), (0, 0)),
])
def test_preprocessing_equals_numpy(vision_dir, width, height, resized, offset):
    encoder = CLIPImageEncoder(vision_dir, local_files_only=True)
    pixels = np.random.RandomState(width).randint(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    big = np.asarray(image.resize(resized, Image.BICUBIC)).astype(np.float32)
    left, top = offset
    crop = big[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE] / np.float32(255)
    expected = (crop - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD)
    np.testing.assert_array_equal(encoder.preprocess([image])[0].permute(1, 2, 0).numpy(), expected)


def test_image_embeds(vision_dir):
    encoder = CLIPImageEncoder(vision_dir, local_files_only=True)
    images = [Image.fromarray(np.full((40, 48, 3), v, dtype=np.uint8)) for v in (0, 200)]
    embeds = encoder.encode(images)
    model = CLIPVisionModelWithProjection.from_pretrained(vision_dir)
    assert embeds.shape == (2, 1, model.config.projection_dim)
    # image_embeds = visual_projection(pooled CLS state): OpenAI's encode_image.
    pooled = model.vision_model(pixel_values=encoder.preprocess(images)).pooler_output
    torch.testing.assert_close(embeds[:, 0], model.visual_projection(pooled))


def test_preprocessor_config_is_read_else_openai_defaults(vision_dir, tmp_path):
    custom = str(tmp_path / 'custom')
    shutil.copytree(vision_dir, custom)
    config_path = os.path.join(custom, 'preprocessor_config.json')
    with open(config_path) as f:
        config = json.load(f)
    config.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], size={'shortest_edge': 40})
    with open(config_path, 'w') as f:
        json.dump(config, f)
    encoder = CLIPImageEncoder(custom, local_files_only=True)
    assert (encoder.resize_to, encoder.crop_size) == (40, IMAGE_SIZE)
    assert encoder.mean.tolist() == [0.5] * 3 and encoder.std.tolist() == [0.25] * 3
    os.remove(config_path)
    encoder = CLIPImageEncoder(custom, local_files_only=True)
    assert (encoder.resize_to, encoder.crop_size) == (IMAGE_SIZE, IMAGE_SIZE)
    assert encoder.mean.tolist() == torch.tensor(OPENAI_CLIP_MEAN).tolist()
    assert encoder.std.tolist() == torch.tensor(OPENAI_CLIP_STD).tolist()
