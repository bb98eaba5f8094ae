"""train_caption_decoder.py on a tiny decoder and a synthetic dialogue corpus: the held-out split, tokens, training
that lowers the loss and raises round-trip BLEU, and a saved decoder that loads strictly and reproduces the report."""
import itertools
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from avamerg_tiny import get_config
from libs.caption_decoder import EOS_TOKEN, load_caption_decoder, load_gpt2_tokenizer
from libs.clip_encoders import CLIPTextEncoder
from libs.features import FeatureDataset, make_manifest, tensor_spec, write_manifest, write_shard
from libs.metrics import corpus_bleu_n
from libs.tiny_models import make_tiny_models
from libs.caption_decoder_training import is_heldout, read_utterances, tokenize, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMBOS = [f'{s} {v} {o}' for s, v, o in itertools.product(
    ('i', 'you', 'we', 'they'), ('love', 'miss', 'hate', 'need'),
    ('my dog', 'the rain', 'our home', 'this song', 'the city', 'my job'))]
REPEATED = 'that sounds hard'  # the second response of every conversation: de-duplicated to one utterance
TURNS = 2


def conversations():
    """{conversation id: [(speaker, response) per turn]}: every combination once, plus REPEATED in each."""
    texts = random.Random(0).sample(COMBOS, len(COMBOS))
    per = 2 * TURNS - 1
    return {f'{k:05d}': [(texts[per * k], texts[per * k + 1]), (texts[per * k + 2], REPEATED)]
            for k in range(len(COMBOS) // per)}


def write_cache(root, encoder, dialogues, shard_size=20):
    """A feature cache whose text states are the tiny CLIP encoder's; image tensors are dummies."""
    records = []
    for cid, turns in dialogues.items():
        for t, (speaker, response) in enumerate(turns):
            text = encoder.encode([speaker, response])
            records.append(dict(speaker_moments=torch.zeros(8, 2, 2), response_moments=torch.zeros(8, 2, 2),
                                speaker_clip_img=torch.zeros(1, 4), response_clip_img=torch.zeros(1, 4),
                                speaker_text=text[0], response_text=text[1], label=-1, coarse_label=-1,
                                split='train', conversation_id=cid, turn_id=str(t), speaker_stem=f'dia{cid}utt{2 * t}_1',
                                response_stem=f'dia{cid}utt{2 * t + 1}_2', speaker_text_raw=speaker,
                                response_text_raw=response, emotion='sad'))
    shards = [write_shard(root, k, records[i:i + shard_size])
              for k, i in enumerate(range(0, len(records), shard_size))]
    write_manifest(root, make_manifest(shards, tensor_spec(records[0]), speaker_text='last'))
    return root


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Run single-threaded: on a busy two-core machine, intra-op threads make these tiny steps ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def setup(tmp_path_factory, one_thread):
    """(config, cache folder): tiny components trained on the corpus' words and a two-shard feature cache."""
    base = tmp_path_factory.mktemp('caption_decoder')
    config = get_config(str(base / 'models'))
    config.workdir = str(base / 'workdir')
    make_tiny_models(config, seed=0, corpus=COMBOS + [REPEATED])
    encoder = CLIPTextEncoder(config.clip_text.name_or_path, local_files_only=True, max_length=config.num_text_tokens)
    config.data.train = write_cache(str(base / 'features'), encoder, conversations())
    return config, encoder


def test_utterances_are_distinct_and_point_at_their_states(setup):
    config, encoder = setup
    cache = FeatureDataset(config.data.train)
    utterances = read_utterances(config.data.train, cache.manifest)
    assert sorted(u.text for u in utterances) == sorted(COMBOS + [REPEATED])
    for u in utterances[::7] + utterances[-3:]:   # across both shards
        assert torch.equal(cache[u.pair][u.key], encoder.encode([u.text])[0].half())
    # A speaker text that is a dialogue history is no utterance the decoder should learn to produce.
    responses = read_utterances(config.data.train, dict(cache.manifest, speaker_text='history'))
    assert {u.key for u in responses} == {'response_text'} and len(responses) == len(conversations()) + 1


def test_heldout_split_is_by_conversation_deterministic_and_disjoint(setup):
    config, _ = setup
    fraction = config.caption_decoder_train.heldout_fraction
    utterances = read_utterances(config.data.train, FeatureDataset(config.data.train).manifest)
    heldout = {u.text for u in utterances if is_heldout(u.conversation_id, fraction)}
    training = {u.text for u in utterances if not is_heldout(u.conversation_id, fraction)}
    assert heldout and training and not heldout & training
    assert heldout | training == {u.text for u in utterances}
    assert {u.text for u in reversed(utterances) if is_heldout(u.conversation_id, fraction)} == heldout
    ids = [f'{k:05d}' for k in range(2000)]
    split = [is_heldout(c, 0.1) for c in ids]
    assert split == [is_heldout(c, 0.1) for c in ids] and 0.07 < sum(split) / len(ids) < 0.13
    assert all(is_heldout(c, 0.3) for c, h in zip(ids, split) if h)   # a larger fraction only adds conversations


def test_tokens_end_with_eos_and_are_cut_to_max_tokens(setup):
    config, _ = setup
    tokenizer = load_gpt2_tokenizer(config.caption_decoder.tokenizer)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    short, long = tokenize(tokenizer, ['i miss my dog', ' '.join(COMBOS[:5])], max_tokens=8)
    assert short == tokenizer.encode('i miss my dog') + [eos]
    assert long == tokenizer.encode(' '.join(COMBOS[:5]))[:7] + [eos]


def test_training_improves_round_trip_and_saves_the_official_layout(setup):
    config, encoder = setup
    cd = config.caption_decoder
    initial = load_caption_decoder(cd.pretrained_path, cd.tokenizer, config=cd)
    config = config.copy_and_resolve_references()
    tc = config.caption_decoder_train
    tc.n_steps = 200  # enough for the tiny decoder to reconstruct unseen combinations of known words
    report = train(config)
    assert report['steps'] == tc.n_steps and report['utterances'] == len(COMBOS) + 1
    assert report['train_utterances'] + report['heldout_utterances'] == report['utterances']
    curve = [c['loss'] for c in report['loss_curve']]
    assert len(curve) == tc.n_steps // tc.log_every and curve[-1] < 0.3 * curve[0]
    before, after = report['bleu_before'], report['bleu_after']
    assert after['bleu1'] > before['bleu1'] + 50 and after['bleu4'] > before['bleu4'] + 30, (before, after)

    # The saved file loads strictly; the GPT-2 moved, the (frozen) prefix encoder did not.
    saved = load_caption_decoder(report['output'], cd.tokenizer, config=cd)
    assert report['output'] == os.path.join(config.workdir, config.name, 'caption_decoder.pth')
    assert torch.equal(saved.encode_prefix.weight, initial.encode_prefix.weight)
    assert not torch.equal(saved.gpt.transformer.wte.weight, initial.gpt.transformer.wte.weight)
    # The reported BLEU is what the saved decoder gives on the held-out texts, encoded afresh with CLIP.
    heldout = sorted({u.text for u in read_utterances(config.data.train, FeatureDataset(config.data.train).manifest)
                      if is_heldout(u.conversation_id, tc.heldout_fraction)})
    hidden = encoder.encode(heldout).half().float()
    hypotheses = saved.generate_captions(saved.encode_prefix(hidden).detach(), max_length=tc.max_tokens)
    assert report['evaluated_utterances'] == report['heldout_utterances'] == len(heldout)
    assert corpus_bleu_n(hypotheses, heldout) == pytest.approx(after, abs=1e-9)
    with open(os.path.join(config.workdir, config.name, 'caption_decoder_report.json')) as f:
        assert json.load(f)['bleu_after'] == after


def test_train_encode_prefix_flag_and_cli_errors(setup, tmp_path):
    config, _ = setup
    config = config.copy_and_resolve_references()
    config.workdir = str(tmp_path)
    config.caption_decoder_train.update(train_encode_prefix=True, n_steps=3, eval_utterances=2)
    report = train(config)
    cd = config.caption_decoder
    moved, initial = (load_caption_decoder(path, cd.tokenizer, config=cd).encode_prefix.weight
                      for path in (report['output'], cd.pretrained_path))
    assert not torch.equal(moved, initial)
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'train_caption_decoder.py'),
                             f'--config={os.path.join(ROOT, "configs", "avamerg_tiny.py")}',
                             f'--features={tmp_path / "missing"}'], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1'))
    assert result.returncode == 2 and 'manifest.json is missing' in result.stderr, result.stderr
