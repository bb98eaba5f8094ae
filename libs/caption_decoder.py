"""UniDiffuser's caption decoder: a GPT-2 language model reading a prefix of (reduced) CLIP text embeddings.

The U-ViT sees CLIP text features through `encode_prefix` (clip_text_dim -> hidden_dim); `decode_prefix` maps them
back to GPT-2's width, and beam search decodes the prefix into text (5 beams, at most 67 tokens, stop at <|EOS|>,
beams ranked by length-normalised log-probability). `beam_search` runs the official per-sample search for a whole
batch at once with a key/value cache; `generate_beam_reference` restates the official search plainly (no cache, one
sample) and is the specification the batched search is tested against.
"""
import logging
import os
import re
from contextlib import contextmanager
from typing import List, NamedTuple

import torch
from torch import nn
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, GPT2TokenizerFast

from libs import hub
from libs.errors import UserError
from libs.io import describe_mismatch, read_state_dict

logger = logging.getLogger(__name__)

EOS_TOKEN = '<|EOS|>'  # the stop token UniDiffuser adds to GPT-2's vocabulary (last id)
GPT2_SPECIAL = '<|endoftext|>'
CHECKPOINT_PREFIX = 'module.'  # the official file was saved from a DataParallel wrapper
# Per-layer causal-mask buffers that older transformers releases stored in GPT-2 state dicts.
LEGACY_BUFFER = re.compile(r'gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)')
CHECKPOINT_HINT = (f'The official decoder is {hub.HF_PREFIX}{hub.UNIDIFFUSER_V1}/caption_decoder.pth (fetched into the '
                   'Hugging Face cache when config.caption_decoder.pretrained_path names it); for a local copy run '
                   f'`{hub.download_command(hub.UNIDIFFUSER_V1, ["caption_decoder.pth"], local_dir="models")}`.')
TOKENIZER_HINT = (f'Point config.caption_decoder.tokenizer at {hub.HF_PREFIX}{hub.GPT2_REPO} (fetched into the Hugging '
                  'Face cache), or run `'
                  + hub.download_command(hub.GPT2_REPO, hub.LAYOUTS['gpt2_tokenizer'].wanted(), local_dir='models/gpt2')
                  + '` and point it at models/gpt2.')


class Beams(NamedTuple):
    """One sample's beams as the official search leaves them (unsorted)."""
    tokens: torch.Tensor   # (beams, steps) int64; a stopped beam is padded with token 0
    lengths: torch.Tensor  # (beams,) float: tokens up to and including <|EOS|>
    scores: torch.Tensor   # (beams,) summed log-probabilities of those tokens


@contextmanager
def _evaluating(module: nn.Module):
    """Run `module` without dropout, then restore its previous train/eval mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities computed as the official code does (softmax, then log), so near-ties rank alike."""
    return logits.softmax(-1).log()


class CaptionDecoder(nn.Module):
    """GPT-2 prefix decoder whose state dict is the official caption_decoder.pth without its `module.` prefix.

    config: `hidden_dim` and `gpt2` (n_embd, n_layer, n_head, n_positions, vocab_size; vocab_size <= 0 means the
    tokenizer's size, for tiny test components). Submodules: `encode_prefix` (B, L, n_embd) -> (B, L, hidden_dim),
    `decode_prefix` (B, L, hidden_dim) -> (B, L, n_embd), `gpt` (transformers' GPT2LMHeadModel).
    """

    def __init__(self, config, tokenizer=None):
        super().__init__()
        gpt2 = config['gpt2']
        vocab_size = gpt2['vocab_size'] if gpt2['vocab_size'] > 0 else len(tokenizer)
        self.tokenizer = tokenizer
        # Special-token ids only steer transformers' own generate(), which is not used: the stop token is <|EOS|>.
        self.gpt = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=gpt2['n_positions'],
                                              n_embd=gpt2['n_embd'], n_layer=gpt2['n_layer'], n_head=gpt2['n_head'],
                                              bos_token_id=None, eos_token_id=None))
        self.encode_prefix = nn.Linear(gpt2['n_embd'], config['hidden_dim'])
        self.decode_prefix = nn.Linear(config['hidden_dim'], gpt2['n_embd'])

    @property
    def eos_token_id(self) -> int:
        """Id of <|EOS|> in the attached tokenizer."""
        if self.tokenizer is None:
            raise ValueError('this CaptionDecoder has no tokenizer; build it with load_gpt2_tokenizer()')
        return self.tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    def forward_loss(self, clip_text_hidden, token_ids, attention_mask, score_prefix=False):
        """GPT-2 LM loss of `token_ids` (B, T) after the bottlenecked prefix `clip_text_hidden` (B, L, n_embd).

        As in the official ClipCaptionModel.forward, the prefix is encode_prefix -> decode_prefix of the CLIP text
        states, placed before the token embeddings; position L-1 predicts the first token. By default only caption
        tokens are scored, as in ClipCap's training loop (which calls that forward without labels and takes the
        cross-entropy of logits[:, L-1:-1]); padding (attention_mask 0) is neither attended to nor scored, where
        ClipCap ignored token id 0. `score_prefix=True` instead reproduces the forward's own `labels` path, which
        also scores a dummy label 0 at every prefix position.
        """
        prefix = self.decode_prefix(self.encode_prefix(clip_text_hidden))                   # (B, L, n_embd)
        embeds = torch.cat([prefix, self.gpt.transformer.wte(token_ids)], dim=1)          # (B, L + T, n_embd)
        batch, prefix_len = prefix.shape[:2]
        mask = torch.cat([attention_mask.new_ones(batch, prefix_len), attention_mask], dim=1)
        prefix_labels = token_ids.new_full((batch, prefix_len), 0 if score_prefix else -100)
        labels = torch.cat([prefix_labels, token_ids.masked_fill(attention_mask == 0, -100)], dim=1)
        return self.gpt(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def generate_beam_reference(self, prefix_embeds, beam_size=5, max_length=67) -> Beams:
        """The official per-sample beam search, restated without a cache; `prefix_embeds` is (1, L, n_embd)."""
        eos, vocab = self.eos_token_id, self.gpt.config.vocab_size
        generated = prefix_embeds  # every step re-reads the whole sequence, exactly as the official code
        tokens = scores = None
        lengths = torch.ones(beam_size, device=prefix_embeds.device)
        stopped = torch.zeros(beam_size, dtype=torch.bool, device=prefix_embeds.device)
        with _evaluating(self):
            for _ in range(max_length):
                logp = _log_probs(self.gpt(inputs_embeds=generated).logits[:, -1])
                if scores is None:  # first step: the single prefix row branches into the beams
                    scores, next_tokens = logp[0].topk(beam_size)
                    generated = generated.expand(beam_size, -1, -1)
                    tokens = next_tokens[:, None]
                else:
                    logp[stopped] = -float('inf')
                    logp[stopped, 0] = 0  # a stopped beam can only append token 0, at no cost
                    scores_sum = scores[:, None] + logp
                    lengths[~stopped] += 1
                    average, flat = (scores_sum / lengths[:, None]).view(-1).topk(beam_size)
                    source, next_tokens = flat // vocab, flat % vocab
                    lengths, stopped, generated = lengths[source], stopped[source], generated[source]
                    tokens = torch.cat([tokens[source], next_tokens[:, None]], dim=1)
                    scores = average * lengths
                generated = torch.cat([generated, self.gpt.transformer.wte(next_tokens)[:, None]], dim=1)
                stopped = stopped | (next_tokens == eos)
                if stopped.all():
                    break
        return Beams(tokens, lengths, scores)

    @torch.no_grad()
    def beam_search(self, prefix_embeds, beam_size=5, max_length=67) -> List[Beams]:
        """The official beam search for a batch (B, L, n_embd) at once with a KV cache; one Beams per sample.

        Same arithmetic as `generate_beam_reference`, vectorised over samples; a sample leaves the batch (and the
        cache) as soon as all its beams have stopped, where the official loop breaks.
        """
        batch, vocab, eos = prefix_embeds.shape[0], self.gpt.config.vocab_size, self.eos_token_id
        device = prefix_embeds.device
        if prefix_embeds.shape[1] + max_length - 1 > self.gpt.config.n_positions:
            raise ValueError(f'a {prefix_embeds.shape[1]}-token prefix plus {max_length} generated tokens exceeds '
                             f"GPT-2's {self.gpt.config.n_positions} positions")
        cache = DynamicCache(config=self.gpt.config)
        results: List[Beams] = [None] * batch
        with _evaluating(self):
            # The cache is passed positionally: transformers 5 renamed `past_key_values` to `cache`.
            logits = self.gpt(None, cache, inputs_embeds=prefix_embeds, use_cache=True, logits_to_keep=1).logits
            scores, next_tokens = _log_probs(logits[:, -1]).topk(beam_size)                 # (B, beams)
            cache.batch_repeat_interleave(beam_size)  # row b * beams + k holds beam k of sample b
            tokens = next_tokens[..., None]                                                  # (B, beams, steps)
            lengths = torch.ones(batch, beam_size, device=device)
            stopped = next_tokens == eos
            alive = torch.arange(batch, device=device)  # sample index of each state row
            for step in range(1, max_length + 1):
                done = stopped.all(-1) | (step == max_length)
                for row in done.nonzero()[:, 0].tolist():
                    results[int(alive[row])] = Beams(tokens[row].clone(), lengths[row].clone(), scores[row].clone())
                if done.all():
                    break
                if done.any():  # drop finished samples from the state and the cache
                    keep = (~done).nonzero()[:, 0]
                    alive, tokens, lengths, scores = alive[keep], tokens[keep], lengths[keep], scores[keep]
                    stopped, next_tokens = stopped[keep], next_tokens[keep]
                    cache.batch_select_indices((keep[:, None] * beam_size + torch.arange(beam_size, device=device))
                                               .view(-1))
                n = alive.shape[0]
                embeds = self.gpt.transformer.wte(next_tokens).view(n * beam_size, 1, -1)
                logp = _log_probs(self.gpt(None, cache, inputs_embeds=embeds, use_cache=True).logits[:, -1])
                logp = logp.view(n, beam_size, vocab)
                logp[stopped] = -float('inf')
                logp[stopped, 0] = 0
                scores_sum = scores[..., None] + logp
                lengths[~stopped] += 1
                average, flat = (scores_sum / lengths[..., None]).view(n, -1).topk(beam_size)
                source, next_tokens = flat // vocab, flat % vocab                               # (n, beams)
                lengths, stopped = lengths.gather(1, source), stopped.gather(1, source)
                tokens = torch.cat([tokens.gather(1, source[..., None].expand_as(tokens)), next_tokens[..., None]], 2)
                scores = average * lengths
                stopped = stopped | (next_tokens == eos)
                cache.reorder_cache((source + beam_size * torch.arange(n, device=device)[:, None]).view(-1))
        return results

    @torch.no_grad()
    def generate_captions(self, features, beam_size=5, max_length=67, chunk=None) -> List[str]:
        """Best beam-search caption for each row of the U-ViT text output `features` (B, L, hidden_dim), searched
        for at most `chunk` rows at a time (config.encoders.caption_chunk; None: all), which bounds the beams' cache."""
        prefix = self.decode_prefix(features.to(self.decode_prefix.weight))  # back to GPT-2's embedding width
        step = chunk or max(len(prefix), 1)
        return [decode_beams(self.tokenizer, beams)[0] for s in range(0, len(prefix), step)
                for beams in self.beam_search(prefix[s:s + step], beam_size, max_length)]


def decode_beams(tokenizer, beams: Beams) -> List[str]:
    """Texts of all beams, best first by average log-probability, post-processed as the official code does."""
    order = (beams.scores / beams.lengths).argsort(descending=True)
    return [tokenizer.decode(beams.tokens[i, :int(beams.lengths[i])].tolist(), skip_special_tokens=True)
            for i in order.tolist()]


def load_gpt2_tokenizer(path_or_id=hub.GPT2_REPO, vocab_size=None, local_files_only=True):
    """GPT-2 tokenizer plus the <|EOS|> token, checked to be complete (and of `vocab_size` if given)."""
    path_or_id = hub.local_path(path_or_id, 'gpt2_tokenizer', local_files_only, 'GPT-2 tokenizer')
    try:
        tokenizer = GPT2Tokenizer.from_pretrained(path_or_id, local_files_only=local_files_only)
    except OSError as err:
        raise UserError(f'cannot load the GPT-2 tokenizer {path_or_id!r}: {err}. {TOKENIZER_HINT}') from err
    tokenizer.add_special_tokens({'eos_token': EOS_TOKEN})
    # Offline hub loading can silently return an empty tokenizer; a byte-level BPE has at least 256 byte tokens.
    byte_alphabet = 256
    if len(tokenizer) <= byte_alphabet or (vocab_size is not None and vocab_size > 0 and len(tokenizer) != vocab_size):
        raise UserError(f'the GPT-2 tokenizer loaded from {path_or_id!r} has {len(tokenizer)} tokens with <|EOS|>, '
                        f'expected {vocab_size if vocab_size and vocab_size > 0 else "a full byte-level vocabulary"} '
                        f'(offline, an uncached hub id loads as an empty tokenizer). {TOKENIZER_HINT}')
    return tokenizer


def load_caption_decoder(path, tokenizer_path_or_id=hub.GPT2_REPO, local_files_only=True, *, config, device='cpu'):
    """Build the decoder from `config` (e.g. configs.common's `caption_decoder`) and load `path` strictly."""
    tokenizer = load_gpt2_tokenizer(tokenizer_path_or_id, config['gpt2']['vocab_size'], local_files_only)
    decoder = CaptionDecoder(config, tokenizer)
    state = {k.removeprefix(CHECKPOINT_PREFIX): v
             for k, v in read_state_dict(path, 'caption decoder checkpoint', CHECKPOINT_HINT).items()}
    # The official loader ignores `clip*` keys; old transformers stored causal-mask buffers. Nothing else is skipped.
    ignored = [k for k in state if k.startswith('clip') or LEGACY_BUFFER.fullmatch(k)]
    state = {k: v for k, v in state.items() if k not in ignored}
    problems = describe_mismatch({k: v.shape for k, v in decoder.state_dict().items()},
                                 {k: v.shape for k, v in state.items()})
    if problems:
        raise UserError(f'caption decoder checkpoint {path} does not fit the configured decoder ({problems}). '
                        f'Check config.caption_decoder (hidden_dim, gpt2 sizes) and the tokenizer. {CHECKPOINT_HINT}')
    decoder.load_state_dict(state)
    logger.info('loaded caption decoder from %s (ignored %d legacy/clip keys)', path, len(ignored))
    return decoder.to(device).eval()


def build_tiny_gpt2_tokenizer(texts, out_dir, vocab_size=300):
    """Train a byte-level BPE on `texts` and save it as a GPT-2 tokenizer directory (for tests and the demo)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's pre-tokenisation
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[GPT2_SPECIAL],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    GPT2TokenizerFast(tokenizer_object=bpe, bos_token=GPT2_SPECIAL, eos_token=GPT2_SPECIAL,
                      unk_token=GPT2_SPECIAL).save_pretrained(out_dir)
    return out_dir


def save_official_layout(decoder: CaptionDecoder, path):
    """Write the decoder's weights as the official caption_decoder.pth does: a plain `module.`-prefixed dict."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({CHECKPOINT_PREFIX + k: v.detach().cpu() for k, v in decoder.state_dict().items()}, path)
