"""Caption decoder: official key layout, the official beam search (hand-checked; batched == per-sample reference),
strict loading of official-layout checkpoints and tokenizers, and the training loss."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from configs.common import unidiffuser
from libs.caption_decoder import (EOS_TOKEN, Beams, CaptionDecoder, build_tiny_gpt2_tokenizer, decode_beams,
                                  load_caption_decoder, load_gpt2_tokenizer, save_official_layout)
from libs.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')  # official layouts, see tests/fixtures/README.md
TINY = dict(hidden_dim=8, gpt2=dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=-1))
PREFIX_LEN = 5
TEXTS = ['I am so sorry to hear that, how are you holding up?', 'That sounds wonderful, congratulations!',
         'Have you talked to your friends about it?', 'I know how you feel, it was hard for me too.'] * 5


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
    return build_tiny_gpt2_tokenizer(TEXTS, str(tmp_path_factory.mktemp('gpt2_tokenizer')), vocab_size=300)


@pytest.fixture(scope='module')
def tokenizer(tokenizer_dir):
    return load_gpt2_tokenizer(tokenizer_dir)


def random_decoder(tokenizer, seed, eos_boost=0.0, dtype=torch.float64):
    """Tiny random decoder with peaked next-token distributions; `eos_boost` makes <|EOS|> likelier everywhere."""
    torch.manual_seed(seed)
    decoder = CaptionDecoder(TINY, tokenizer).to(dtype).eval()
    with torch.no_grad():
        decoder.gpt.transformer.wte.weight.mul_(20)  # tied with the LM head: sharper distributions, fewer near-ties
        # The final LayerNorm's bias is in every output state: aligning the <|EOS|> row with it raises its logit.
        decoder.gpt.transformer.ln_f.bias.normal_()
        decoder.gpt.transformer.wte.weight[decoder.eos_token_id] = eos_boost * decoder.gpt.transformer.ln_f.bias
    return decoder


@pytest.mark.reference
def test_official_key_layout():
    with open(os.path.join(FIXTURES, 'caption_decoder.keys.json')) as f:
        official = json.load(f)
    with torch.device('meta'):
        decoder = CaptionDecoder(unidiffuser('v1').caption_decoder)
    assert {'module.' + k: list(v.shape) for k, v in decoder.state_dict().items()} == official


def test_prefix_shapes(tokenizer):
    decoder = random_decoder(tokenizer, 0, dtype=torch.float32)
    z = decoder.encode_prefix(torch.randn(3, PREFIX_LEN, 32))
    assert z.shape == (3, PREFIX_LEN, 8) and decoder.decode_prefix(z).shape == (3, PREFIX_LEN, 32)


class MarkovLM(nn.Module):
    """Stand-in for GPT-2 whose next-token log-probabilities depend only on the last (one-hot) input embedding."""

    def __init__(self, log_probs):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=log_probs.shape[0])
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding.from_pretrained(torch.eye(log_probs.shape[0], dtype=torch.float64))
        self.log_probs = log_probs

    def forward(self, inputs_embeds):
        return SimpleNamespace(logits=inputs_embeds @ self.log_probs)


def markov_decoder(rows):
    """Decoder whose GPT-2 is a Markov chain over tokens {0: start/pad, 1: a, 2: b, 3: <|EOS|>}."""
    decoder = CaptionDecoder(dict(hidden_dim=2, gpt2=dict(n_embd=4, n_layer=1, n_head=1, n_positions=8, vocab_size=4)),
                             SimpleNamespace(convert_tokens_to_ids={EOS_TOKEN: 3}.get))
    decoder.gpt = MarkovLM(torch.tensor(rows, dtype=torch.float64).clamp_min(1e-12).log())
    return decoder


def test_reference_beam_search_by_hand():
    start = torch.eye(4, dtype=torch.float64)[None, :1]  # the prefix ends in the start state
    # Step 1 keeps "a EOS" (avg log(.6*.55)/2 = -0.554) and "b b" (log(.4*.7)/2 = -0.637). Step 2: "b b b" averages
    # log(.196)/3 = -0.543 and wins over the stopped "a EOS" (-0.554), which extends by token 0 at no cost and
    # keeps length 2, although its summed log-probability (-1.109) beats that of "b b b" (-1.630).
    decoder = markov_decoder([[0, .6, .4, 0], [0, .3, .15, .55], [0, 0, .7, .3], [.25] * 4])
    beams = decoder.generate_beam_reference(start, beam_size=2, max_length=3)
    assert beams.tokens.tolist() == [[2, 2, 2], [1, 3, 0]] and beams.lengths.tolist() == [3, 2]
    torch.testing.assert_close(beams.scores, torch.tensor([.196, .33], dtype=torch.float64).log())
    # When every beam has stopped the search ends early: "b EOS" (log(.36)/2) and "a EOS" (log(.33)/2) at step 1.
    decoder = markov_decoder([[0, .6, .4, 0], [0, .3, .15, .55], [0, 0, .1, .9], [.25] * 4])
    beams = decoder.generate_beam_reference(start, beam_size=2, max_length=10)
    assert beams.tokens.tolist() == [[2, 3], [1, 3]] and beams.lengths.tolist() == [2, 2]


def test_decode_beams_truncates_and_ranks(tokenizer):
    long_text = 'I am so sorry to hear that'
    eos, hello, sorry = tokenizer.eos_token_id, tokenizer.encode(' hello'), tokenizer.encode(long_text)
    width = len(sorry) + 3  # stopped beams carry padding after <|EOS|>; the length must cut it off
    rows = [hello + [eos] + [0] * (width - len(hello) - 1), sorry + [eos] + [7] * (width - len(sorry) - 1)]
    lengths = torch.tensor([len(hello) + 1., len(sorry) + 1.])
    scores = torch.tensor([-1.5, -1.]) * lengths  # the longer beam has the better average, the worse sum
    assert scores[0] > scores[1]
    assert decode_beams(tokenizer, Beams(torch.tensor(rows), lengths, scores)) == [long_text, ' hello']


def test_batched_beam_search_matches_reference(tokenizer):
    """Token-for-token equality, run in float64 so that the cached and uncached logits cannot flip a near-tie."""
    max_length, seen = 16, dict(all_stopped_early=False, ran_to_max=False, mixed_lengths=False, beam_left=False)
    cases = [(1, 4, 5, .5), (2, 4, 5, .5), (3, 3, 3, .35), (4, 1, 5, 0.), (5, 2, 1, .5)]  # seed, B, beams, EOS boost
    for seed, batch, beam_size, eos_boost in cases:
        decoder = random_decoder(tokenizer, seed, eos_boost)
        features = torch.randn(batch, PREFIX_LEN, 8, dtype=torch.float64)
        features *= torch.logspace(-1, 1, batch, dtype=torch.float64)[:, None, None]
        prefix = decoder.decode_prefix(features)
        batched = decoder.beam_search(prefix, beam_size, max_length)
        reference = [decoder.generate_beam_reference(prefix[i:i + 1], beam_size, max_length) for i in range(batch)]
        for got, want in zip(batched, reference):
            assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
            torch.testing.assert_close(got.scores, want.scores, rtol=1e-12, atol=0)
            assert decode_beams(tokenizer, got) == decode_beams(tokenizer, want)
        steps = [want.tokens.shape[1] for want in reference]
        seen['all_stopped_early'] |= min(steps) < max_length
        seen['ran_to_max'] |= max(steps) == max_length
        seen['beam_left'] |= min(steps) < max_length and max(steps) > min(steps)  # a sample left a running batch
        seen['mixed_lengths'] |= any(len(set(want.lengths.tolist())) > 1 for want in reference)
    assert all(seen.values()), seen


def test_generate_captions_is_the_best_reference_beam(tokenizer):
    decoder = random_decoder(tokenizer, 11, eos_boost=.5)
    features = torch.randn(3, PREFIX_LEN, 8, dtype=torch.float64)
    best = [decode_beams(tokenizer, decoder.generate_beam_reference(decoder.decode_prefix(f[None]), 5, 12))[0]
            for f in features]
    assert decoder.generate_captions(features, max_length=12) == best


def test_max_length_one_is_the_first_top_k(tokenizer):
    decoder = random_decoder(tokenizer, 6)
    prefix = decoder.decode_prefix(torch.randn(2, PREFIX_LEN, 8, dtype=torch.float64))
    for i, beams in enumerate(decoder.beam_search(prefix, beam_size=4, max_length=1)):
        top = decoder.gpt(inputs_embeds=prefix[i:i + 1]).logits[0, -1].log_softmax(-1).topk(4)
        assert torch.equal(beams.tokens[:, 0], top.indices) and beams.lengths.tolist() == [1.] * 4
        torch.testing.assert_close(beams.scores, top.values)


def test_checkpoint_and_tokenizer_round_trip(tmp_path, tokenizer, tokenizer_dir):
    decoder = random_decoder(tokenizer, 7, eos_boost=.3, dtype=torch.float32)
    path = str(tmp_path / 'caption_decoder.pth')
    save_official_layout(decoder, path)
    saved = torch.load(path, weights_only=True)
    assert all(k.startswith('module.') for k in saved) and len(saved) == len(decoder.state_dict())
    from safetensors.torch import save_file
    save_file({k: v.clone() for k, v in saved.items()}, str(tmp_path / 'caption_decoder.safetensors'))
    features = torch.randn(2, PREFIX_LEN, 8)
    expected = decoder.generate_captions(features, max_length=8)
    for name in ['caption_decoder.pth', 'caption_decoder.safetensors']:
        loaded = load_caption_decoder(str(tmp_path / name), tokenizer_dir, config=TINY)
        assert not loaded.training and len(loaded.tokenizer) == len(tokenizer)
        assert all(torch.equal(v, decoder.state_dict()[k]) for k, v in loaded.state_dict().items())
        assert loaded.generate_captions(features, max_length=8) == expected


@pytest.mark.parametrize('edit, accepted, named', [
    (dict(add={'module.gpt.transformer.h.0.attn.bias': torch.ones(1, 1, 64, 64),
               'module.gpt.transformer.h.1.attn.masked_bias': torch.tensor(-1e4),
               'module.clip_project.weight': torch.ones(2)}), True, None),
    (dict(add={'module.gpt.transformer.h.0.attn.extra': torch.ones(1)}), False, 'gpt.transformer.h.0.attn.extra'),
    (dict(add={'module.gpt.transformer.ln_f.masked_bias': torch.ones(1)}), False, 'ln_f.masked_bias'),
    (dict(drop='module.encode_prefix.bias'), False, 'encode_prefix.bias'),
    (dict(add={'module.decode_prefix.bias': torch.zeros(33)}), False, 'decode_prefix.bias'),
])
def test_loader_tolerates_only_legacy_and_clip_keys(tmp_path, tokenizer, tokenizer_dir, edit, accepted, named):
    state = {'module.' + k: v for k, v in random_decoder(tokenizer, 8, dtype=torch.float32).state_dict().items()}
    state.update(edit.get('add', {}))
    state.pop(edit.get('drop'), None)
    torch.save(state, tmp_path / 'ckpt.pth')
    if accepted:
        load_caption_decoder(str(tmp_path / 'ckpt.pth'), tokenizer_dir, config=TINY)
    else:
        with pytest.raises(UserError, match=named):
            load_caption_decoder(str(tmp_path / 'ckpt.pth'), tokenizer_dir, config=TINY)


def test_missing_checkpoint_says_where_to_get_it(tmp_path, tokenizer_dir):
    with pytest.raises(UserError, match=r'(?s)nowhere\.pth.*thu-ml/unidiffuser-v1.*caption_decoder\.pth'):
        load_caption_decoder(str(tmp_path / 'nowhere.pth'), tokenizer_dir, config=TINY)


def test_empty_or_mismatched_tokenizer_is_rejected(tmp_path, tokenizer, tokenizer_dir):
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(UserError, match='hf download openai-community/gpt2 vocab.json merges.txt'):
        load_gpt2_tokenizer(str(tmp_path / 'empty'))  # transformers returns a 1-token tokenizer here, silently
    with pytest.raises(UserError, match='hf download openai-community/gpt2'):
        load_gpt2_tokenizer(tokenizer_dir, vocab_size=len(tokenizer) + 1)
    official = unidiffuser('v1').caption_decoder
    with pytest.raises(UserError, match='50258'):  # the official checkpoint needs the full GPT-2 tokenizer
        load_caption_decoder(str(tmp_path / 'unused.pth'), tokenizer_dir, config=official)


def test_forward_loss_matches_independent_cross_entropy(tokenizer):
    decoder = random_decoder(tokenizer, 9, dtype=torch.float32)
    clip_text = torch.randn(2, PREFIX_LEN, 32)
    tokens = torch.tensor([tokenizer.encode('That sounds wonderful!') + [tokenizer.eos_token_id]] * 2)
    mask = torch.ones_like(tokens)
    mask[1, -3:] = 0  # the second caption is three tokens shorter (right padding)
    prefix = decoder.decode_prefix(decoder.encode_prefix(clip_text))
    embeds = torch.cat([prefix, decoder.gpt.transformer.wte(tokens)], 1)
    full_mask = torch.cat([torch.ones(2, PREFIX_LEN, dtype=mask.dtype), mask], 1)
    logits = decoder.gpt(inputs_embeds=embeds, attention_mask=full_mask).logits
    # Position p predicts token p + 1 of the joint sequence; the last prefix position predicts the first token.
    terms = [F.cross_entropy(logits[b, PREFIX_LEN - 1 + j], tokens[b, j], reduction='sum')
             for b in range(2) for j in range(tokens.shape[1]) if mask[b, j]]
    torch.testing.assert_close(decoder.forward_loss(clip_text, tokens, mask), sum(terms) / len(terms))
    # score_prefix=True: the official forward's labels, dummy zeros at prefix positions then the tokens.
    terms += [F.cross_entropy(logits[b, p], torch.tensor(0), reduction='sum') for b in range(2)
              for p in range(PREFIX_LEN - 1)]
    torch.testing.assert_close(decoder.forward_loss(clip_text, tokens, mask, score_prefix=True),
                               sum(terms) / len(terms))


def test_forward_loss_decreases_when_training(tokenizer):
    decoder = random_decoder(tokenizer, 10, dtype=torch.float32)
    clip_text = torch.randn(4, PREFIX_LEN, 32)
    encoded = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in TEXTS[:4]]
    width = max(map(len, encoded))
    tokens = torch.tensor([e + [0] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = decoder.forward_loss(clip_text, tokens, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.75 * losses[0], losses
