"""Fine-tuning UniDiffuser's GPT-2 prefix caption decoder on the utterances of a feature cache
(``train_caption_decoder.py`` is its command line).

The official decoder was trained on image captions, not dialogue. ``train`` reads the cached CLIP text states and
raw texts of the cache's utterances (de-duplicated), holds out whole conversations, trains the decoder on the rest,
and scores the round trip text -> CLIP -> encode_prefix -> decode_prefix -> beam search on the held-out utterances
before and after (corpus BLEU-1..4). It writes ``<workdir>/<name>/caption_decoder.pth`` (official layout) and
``caption_decoder_report.json``; point ``config.caption_decoder.pretrained_path`` at the file to use it.
"""
import json
import logging
import os
from typing import List, NamedTuple

import torch
from torch import nn
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from libs import config_check, hub
from libs.caption_decoder import EOS_TOKEN, load_caption_decoder, save_official_layout
from libs.errors import UserError
from libs.features import FeatureDataset, derive_seed
from libs.io import atomic_write_json, writing
from libs.metrics import corpus_bleu_n

logger = logging.getLogger(__name__)
REPORT = 'caption_decoder_report.json'
NUM_SAMPLES = 8  # decoded held-out examples kept in the report


class Utterance(NamedTuple):
    """Where one distinct utterance's CLIP text states live in the cache."""
    pair: int             # pair index in the FeatureDataset
    key: str              # 'speaker_text' or 'response_text'
    conversation_id: str
    text: str


def read_utterances(root: str, manifest: dict) -> List[Utterance]:
    """Distinct utterances of a cache, in cache order: responses, and speaker turns unless they are histories."""
    # A 'history' speaker text is several utterances cut at the left, not something the decoder should produce.
    keys = ('speaker_text', 'response_text') if manifest.get('speaker_text', 'last') == 'last' else ('response_text',)
    seen, utterances, pair = set(), [], 0
    for shard in manifest['shards']:
        with open(os.path.join(root, shard['name'] + '.json'), encoding='utf-8') as f:
            for meta in json.load(f):
                for key in keys:
                    text = meta[key + '_raw'].strip()
                    if text and text not in seen:
                        seen.add(text)
                        utterances.append(Utterance(pair, key, meta['conversation_id'], text))
                pair += 1
    return utterances


def is_heldout(conversation_id: str, fraction: float) -> bool:
    """Hash split: a conversation is held out in every run and every cache that contains it, whatever the order."""
    return derive_seed('caption_decoder_heldout', conversation_id) / 2 ** 64 < fraction


def tokenize(tokenizer, texts: List[str], max_tokens: int) -> List[List[int]]:
    """GPT-2 ids of each text followed by <|EOS|>, the official decoder's stop token; at most max_tokens in all."""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    return [ids[:max_tokens - 1] + [eos] for ids in tokenizer(texts, add_special_tokens=False).input_ids]


class Utterances(torch.utils.data.Dataset):
    """Item i: (CLIP text states (T, D) float32, token ids) of utterance i."""

    def __init__(self, features: FeatureDataset, utterances: List[Utterance], tokens: List[List[int]]):
        self.features, self.utterances, self.tokens = features, utterances, tokens

    def __len__(self):
        return len(self.utterances)

    def __getitem__(self, i):
        u = self.utterances[i]
        return self.features[u.pair][u.key].float(), torch.tensor(self.tokens[i])


def collate(batch):
    """Stack the states; right-pad the ids with 0 and mark the real tokens in an attention mask."""
    hidden, ids = zip(*batch)
    mask = nn.utils.rnn.pad_sequence([torch.ones_like(x) for x in ids], batch_first=True)
    return torch.stack(hidden), nn.utils.rnn.pad_sequence(list(ids), batch_first=True), mask


class PrefixLM(nn.Module):
    """The decoder's training loss as `forward`, so that DDP syncs gradients and accelerate's autocast applies."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, hidden, ids, mask):
        return self.decoder.forward_loss(hidden, ids, mask)


@torch.no_grad()
def round_trip(decoder, cache: FeatureDataset, utterances: List[Utterance], batch_size: int, max_tokens: int, device):
    """Corpus BLEU-1..4 of the decoded bottlenecked prefixes of the utterances' CLIP states, and the decoded texts."""
    hypotheses = []
    for start in range(0, len(utterances), batch_size):
        hidden = torch.stack([cache[u.pair][u.key].float() for u in utterances[start:start + batch_size]])
        hypotheses += decoder.generate_captions(decoder.encode_prefix(hidden.to(device)), max_length=max_tokens)
    return corpus_bleu_n(hypotheses, [u.text for u in utterances]), hypotheses


def train(config, features: str = None) -> dict:
    """Fine-tune the configured caption decoder; returns the report (also written to the run folder)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    config_check.check(config, 'model', 'caption_decoder_train')
    tc, cd = config.caption_decoder_train, config.caption_decoder
    root = features or tc.features or config.data.train
    run_dir = os.path.join(config.workdir, config.name)
    mixed_precision = config.mixed_precision if torch.cuda.is_available() else 'no'  # bf16 autocast pays on GPUs only
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=config.log_with or None, project_dir=run_dir)
    device, is_main = accelerator.device, accelerator.is_main_process
    set_seed(config.seed)

    # Data: distinct utterances, whole conversations held out, ids ending in <|EOS|> ------------------------------
    cache = FeatureDataset(root)
    text_shape = cache.manifest['tensors']['response_text']['shape']
    if text_shape[-1] != cd.gpt2.n_embd or text_shape[0] + tc.max_tokens > cd.gpt2.n_positions:
        raise UserError(f'{root} holds CLIP text states of shape {text_shape}; the caption decoder needs width '
                        f'{cd.gpt2.n_embd} and at most {cd.gpt2.n_positions} prefix + max_tokens={tc.max_tokens} '
                        'positions: extract features with this config or lower caption_decoder_train.max_tokens')
    utterances = read_utterances(root, cache.manifest)
    heldout = [u for u in utterances if is_heldout(u.conversation_id, tc.heldout_fraction)]
    train_split = [u for u in utterances if not is_heldout(u.conversation_id, tc.heldout_fraction)]
    if not heldout or not train_split:
        raise UserError(f'{root}: {len(train_split)} training and {len(heldout)} held-out utterances; both must be '
                        'non-empty (use a larger cache or change caption_decoder_train.heldout_fraction)')
    evaluated = heldout[:tc.eval_utterances]
    hub.preflight(config, ('caption_decoder',))
    decoder = load_caption_decoder(cd.pretrained_path, cd.tokenizer, cd.local_files_only, config=cd, device=device)
    tokens = tokenize(decoder.tokenizer, [u.text for u in train_split], tc.max_tokens)
    truncated = sum(len(t) == tc.max_tokens for t in tokens)
    train_set = Utterances(cache, train_split, tokens)
    logger.info('%s: %d distinct utterances, %d for training (%d cut at %d tokens), %d held out (%d for BLEU)', root,
                len(utterances), len(train_split), truncated, tc.max_tokens, len(heldout), len(evaluated))

    # Model and optimizer. encode_prefix stays frozen by default: it defines the reduced text space the pretrained
    # U-ViT was trained in and train_empath.py encodes its targets with, so the official and the fine-tuned decoder
    # then read the same U-ViT outputs. Training it (train_encode_prefix=True) moves that space, and any U-ViT must
    # afterwards be trained with this decoder's encode_prefix.
    decoder.train()
    decoder.encode_prefix.requires_grad_(tc.train_encode_prefix)
    params = [p for p in decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, tc.warmup_steps, tc.n_steps)  # ClipCap's schedule
    loader = torch.utils.data.DataLoader(train_set, batch_size=tc.batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=tc.num_workers, drop_last=len(train_set) >= tc.batch_size)
    model, optimizer, loader = accelerator.prepare(PrefixLM(decoder), optimizer, loader)
    accelerator.init_trackers('caption_decoder', config=tc.to_dict())

    # Round-trip BLEU before, training, round-trip BLEU after ---------------------------------------------------------
    if is_main:
        bleu_before, before = round_trip(decoder, cache, evaluated, tc.batch_size, tc.max_tokens, device)
        logger.info('held-out round-trip BLEU before: %s', bleu_before)
    curve, window, step, batches = [], [], 0, iter(())
    for step in tqdm(range(1, tc.n_steps + 1), disable=not is_main, desc='caption decoder', dynamic_ncols=True):
        batch = next(batches, None)
        if batch is None:  # next epoch
            batches = iter(loader)
            batch = next(batches)
        loss = model(*batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(accelerator.reduce(loss.detach(), 'mean').item())
        if step % tc.log_every == 0 or step == tc.n_steps:
            curve.append(dict(step=step, loss=sum(window) / len(window), lr=scheduler.get_last_lr()[0]))
            accelerator.log({'caption_decoder/loss': curve[-1]['loss'], 'caption_decoder/lr': curve[-1]['lr']},
                            step=step)
            window = []
    report = {}
    if is_main:
        bleu_after, after = round_trip(decoder, cache, evaluated, tc.batch_size, tc.max_tokens, device)
        logger.info('held-out round-trip BLEU after: %s', bleu_after)
        accelerator.log({f'caption_decoder/{k}': v for k, v in bleu_after.items()}, step=step)
        path = os.path.join(run_dir, tc.output)
        with writing(path):  # torch.save reports a full disk without an errno
            os.makedirs(run_dir, exist_ok=True)
            save_official_layout(decoder, path + '.tmp')  # then renamed: a crash never leaves a half-written file
            os.replace(path + '.tmp', path)
        report = dict(features=root, initial_decoder=cd.pretrained_path, output=path, steps=step,
                      batch_size=tc.batch_size * accelerator.num_processes, lr=tc.lr,
                      train_encode_prefix=tc.train_encode_prefix, max_tokens=tc.max_tokens,
                      heldout_fraction=tc.heldout_fraction, utterances=len(utterances),
                      train_utterances=len(train_set), truncated_train_utterances=truncated,
                      heldout_utterances=len(heldout), evaluated_utterances=len(evaluated),
                      bleu_before=bleu_before, bleu_after=bleu_after, loss_curve=curve,
                      samples=[dict(reference=u.text, before=b, after=a)
                               for u, b, a in zip(evaluated[:NUM_SAMPLES], before, after)])
        atomic_write_json(os.path.join(run_dir, REPORT), report)
        logger.info('wrote %s; use it with --config.caption_decoder.pretrained_path=%s', path, path)
    accelerator.end_training()
    return report
