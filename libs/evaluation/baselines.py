"""Baselines, scored by the same code as the model, each into a run folder of its own (baselines/<name>/):

- ``copy_speaker``: the speaker's own face and utterance as the response (no emotion prediction);
- ``retrieval``: the response of the training pair whose speaker utterance is nearest in CLIP text space (cosine of
  the token-averaged last hidden state the feature cache stores, centred on the training utterances' mean), with its
  face and its gold emotion;
- ``shuffled_speaker``: the network answering every pair from another conversation's speaker turn (face latent, CLIP
  image embedding and utterance all moved together), with the pair's own noise: a network that ignores the speaker
  scores as the model does, one that follows it falls to chance;
- ``no_guidance``: the network with speaker guidance off (scale 0: the conditional prediction alone).
"""
import collections
import dataclasses
import json
import os
import random
import time
from typing import Callable, Optional

import torch

from libs.avamerg import label_index
from libs.errors import UserError
from libs.evaluation import generate

EMBED_CHUNK = 256  # speaker utterances embedded per step for the retrieval (memory, not results)


def same_config(config):
    """The model's own sampling config."""
    return config


def own_source(ev, config):
    """The evaluated pairs' own speaker turns."""
    return ev.source


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A response source. `respond(ev, source, out, rank, indices)` writes the records of pairs `indices` without
    the network; None: the network answers (`config` gives its sampling config, `source` its speaker turns)."""
    name: str
    what: str
    config: Callable = same_config
    source: Callable = own_source
    respond: Optional[Callable] = None


def response_record(index, pairs, face, text, pred_label, seconds, **extra):
    """A record of a response made without the network: the model's fields, no NFE, no top-3."""
    from libs.avamerg import EMOTIONS_32
    return dict(index=index, **pairs[index], generated=text, face=face, pred_label=pred_label,
                pred_emotion=None if pred_label is None else EMOTIONS_32[pred_label], top3=[], nfe=0, branches=0,
                seconds=seconds, **extra)


# ---------------------------------------------------------------- copy the speaker -----------------------------------
def copy_speaker(ev, source, out, rank, indices):
    """The speaker's face and utterance, returned as the listener's."""
    tic, pairs = time.perf_counter(), source.pairs
    faces = {i: generate.save_face(out, pairs[i]['pair_id'], source.face(i, 'speaker')) for i in indices}
    seconds = round((time.perf_counter() - tic) / len(indices), 4)
    generate.append_records(out, rank, [response_record(i, pairs, faces[i], pairs[i]['speaker_text'], None,
                                                        seconds) for i in indices])


# ---------------------------------------------------------------- retrieval ------------------------------------------
def token_average(states):
    """(B, T, D) CLIP text last hidden states -> (B, D): the mean over the T positions (under CLIP's causal mask every
    padding position after the end token summarises the whole utterance)."""
    return states.float().mean(1)


def train_cache(config):
    """The training split's feature cache the retrieval searches (config.data.train), checked without loading it."""
    folder = config.data.get('train')
    if not folder or not os.path.isdir(folder):
        raise UserError(f'the retrieval baseline searches the training pairs\' feature cache, and '
                        f'config.data.train={folder!r} is not one: set it to the train split\'s cache '
                        '(extract_features.py --split=train) or leave retrieval out of --baselines')
    generate.check_feature_split(folder, 'train')
    return folder


class TrainResponses:
    """The training split's speaker-utterance embeddings and responses, read shard by shard from its feature cache."""

    def __init__(self, ev, config):
        from safetensors import safe_open

        from libs import avamerg
        from libs.features import FeatureDataset
        folder = train_cache(config)
        self.comp, self.data, self.meta, chunks = ev.comp, FeatureDataset(folder), [], []
        for shard in self.data.shards:
            with safe_open(os.path.join(folder, shard['name'] + '.safetensors'), 'pt') as f:
                chunks.append(token_average(f.get_tensor('speaker_text')))
            with open(os.path.join(folder, shard['name'] + '.json'), encoding='utf-8') as f:
                self.meta += json.load(f)
        # Centred on the training utterances' mean: transformer states share a large common direction, which would
        # otherwise dominate every cosine.
        averages = torch.cat(chunks)
        self.centre = averages.mean(0)
        self.embeddings = self.embed(averages)
        root = config.data.get('root')
        self.reader = avamerg.from_config(config.data, 'train') if root and os.path.isdir(root) else None

    def embed(self, averages):
        """Token-averaged states (B, D) -> unit vectors after centring on the training utterances."""
        return torch.nn.functional.normalize(averages - self.centre, dim=-1)

    def nearest(self, states):
        """Index of the training pair whose speaker utterance is nearest (cosine) to each of the (B, T, D) states."""
        return (self.embed(token_average(states)) @ self.embeddings.T).argmax(1).tolist()

    def face(self, j):
        """Training pair j's response face: its frame, or the VAE reconstruction of its cached moments."""
        if self.reader is not None:
            return generate.frame(self.reader, self.meta[j]['response_stem'], self.comp.resolution)
        from libs.pipeline import decode_images
        mean = self.data[j]['response_moments'][None].float().to(self.comp.device).chunk(2, dim=1)[0]
        return decode_images(self.comp, self.comp.autoencoder.scale_factor * mean)[0]


def retrieval(ev, source, out, rank, indices):
    """The nearest training pair's response utterance, face and gold emotion (None if it has no known label)."""
    if ev.retrieval is None:
        raise RuntimeError('prepare() builds the retrieval index when the retrieval baseline is selected')
    tic, pairs, train = time.perf_counter(), source.pairs, ev.retrieval
    found = []
    for start in range(0, len(indices), EMBED_CHUNK):
        found += train.nearest(source.speaker_text_states(indices[start:start + EMBED_CHUNK]))
    records = []
    for i, j in zip(indices, found):
        m = train.meta[j]
        label = None if m['emotion'] is None or label_index(m['emotion']) < 0 else label_index(m['emotion'])
        face = generate.save_face(out, pairs[i]['pair_id'], train.face(j))
        records.append((i, face, m['response_text_raw'] or '', label,
                        generate.pair_identity(m['split'], m['conversation_id'], m['turn_id'])))
    seconds = round((time.perf_counter() - tic) / len(indices), 4)
    generate.append_records(out, rank, [response_record(i, pairs, face, text, label, seconds, retrieved=which)
                                        for i, face, text, label, which in records])


# ---------------------------------------------------------------- shuffled speaker -----------------------------------
def derangement(conversations, seed, tries=10000):
    """A permutation p with conversations[p[i]] != conversations[i] for every i (seeded, deterministic)."""
    rng, n = random.Random(f'{seed}/shuffled-speakers'), len(conversations)
    order = list(range(n))
    for _ in range(tries):
        rng.shuffle(order)
        # Each pair takes the speaker of the next pair in a random cycle: a single cycle, so no pair keeps its own.
        p = [0] * n
        for a, b in zip(order, order[1:] + order[:1]):
            p[a] = b
        if all(conversations[p[i]] != conversations[i] for i in range(n)):
            return p
    largest = max(collections.Counter(conversations).values())
    raise UserError(f'the shuffled-speaker baseline answers every pair from another conversation, which these {n} '
                    f'pairs do not allow (one conversation holds {largest} of them, more than half): evaluate more '
                    'pairs (--limit) or leave shuffled_speaker out of --baselines')


class ShuffledSource:
    """A speaker-turn source whose pair i answers the speaker turn of pair order[i]: every speaker input (VAE
    moments, CLIP image embedding, utterance, its text states and face) moves together; the response side stays."""

    def __init__(self, base, order):
        self.base, self.order, self.root, self.reader = base, order, base.root, base.reader
        self.pairs = [dict(p, **{k: base.pairs[order[i]][k] for k in ('speaker_stem', 'speaker_text')},
                           speaker_of=base.pairs[order[i]]['pair_id']) for i, p in enumerate(base.pairs[:len(order)])]

    def speaker(self, indices):
        return self.base.speaker([self.order[i] for i in indices])

    def speaker_text_states(self, indices):
        return self.base.speaker_text_states([self.order[i] for i in indices])

    def face(self, i, role):
        return self.base.face(self.order[i] if role == 'speaker' else i, role)


def shuffled_source(ev, config):
    """The evaluated pairs, each answering a speaker turn of another conversation (seeded by config.seed)."""
    return ShuffledSource(ev.source, derangement([p['conversation_id'] for p in ev.pairs], config.seed))


# ---------------------------------------------------------------- no speaker guidance --------------------------------
def without_guidance(config):
    """The sampling config with every speaker-guidance scale at 0 (the conditional prediction alone)."""
    config = config.copy_and_resolve_references()
    config.sample.update(scale=0.0, scale_text=0.0, scale_face=0.0)
    return config


BASELINES = {b.name: b for b in (
    Baseline('copy_speaker', 'the speaker\'s own face and utterance as the response', respond=copy_speaker),
    Baseline('retrieval', 'the response (face, utterance, gold emotion) of the training pair whose speaker utterance '
             'is nearest in CLIP text space', respond=retrieval),
    Baseline('shuffled_speaker', 'the network answering a speaker turn of another conversation (face, CLIP image '
             'embedding and utterance shuffled together)', source=shuffled_source),
    Baseline('no_guidance', 'the network without speaker guidance (scale 0)', config=without_guidance),
)}


def get(names):
    """The Baselines of these names, in the given order; an unknown name is a UserError listing the known ones."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise UserError(f'unknown baseline(s) {", ".join(unknown)}; choose from {", ".join(BASELINES)} '
                        '(--baselines=a,b or config.eval.baselines)')
    if len(set(names)) < len(names):
        raise UserError(f'--baselines={",".join(names)} repeats a baseline; list each once')
    return [BASELINES[n] for n in names]
