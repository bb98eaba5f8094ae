"""Config values checked in one place, before anything heavy is built.

Every entry point calls ``check(config, *groups)`` first; it raises one UserError listing every missing key and every
value out of range in those groups, e.g. ``optimizer.lr=nan (must be a finite number > 0)``. A rule is a function of
the value returning what it must be, or None when the value is fine; cross-key rules see the whole config. Unknown
keys given on the command line (``--config.train.n_stepz=5``) are refused earlier, while the flags are parsed
(libs/cli.py).
"""
import math
from typing import Callable, Dict, Optional

from libs.errors import UserError


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def integer(low: int = None) -> Callable:
    """An integer, at least ``low``."""
    wanted = 'an integer' + (f' >= {low}' if low is not None else '')
    return lambda x: None if _is_int(x) and (low is None or x >= low) else wanted


SEED_END = 2 ** 63  # seeds are 0 .. 2^63 - 1: what torch.Generator.manual_seed and a signed int64 both take


def seed() -> Callable:
    """A random seed: a whole number from 0 up to 2^63 - 1 (the rule of every entry point and the web app)."""
    return lambda x: None if _is_int(x) and 0 <= x < SEED_END else f'a whole number from 0 to {SEED_END - 1}'


def interval() -> Callable:
    """Every how many steps something happens: an integer >= 1, or 0 for never."""
    return lambda x: None if _is_int(x) and x >= 0 else 'an integer >= 1, or 0 to turn it off'


def number(low: float = None, high: float = None, low_open: bool = False, high_open: bool = False) -> Callable:
    """A finite number in [low, high] (either end open or absent)."""
    bounds = ([f'{">" if low_open else ">="} {low:g}'] if low is not None else []) + \
             ([f'{"<" if high_open else "<="} {high:g}'] if high is not None else [])
    wanted = 'a finite number' + (f' {" and ".join(bounds)}' if bounds else '')

    def rule(x):
        ok = _is_number(x) and (low is None or (x > low if low_open else x >= low)) and \
            (high is None or (x < high if high_open else x <= high))
        return None if ok else wanted
    return rule


def probability() -> Callable:
    """A probability in [0, 1]."""
    return number(0, 1)


def choice(*options) -> Callable:
    """One of the options."""
    return lambda x: None if x in options else f'one of {", ".join(repr(o) for o in options)}'


def text(empty: bool = True) -> Callable:
    """A string (non-empty unless ``empty``)."""
    return lambda x: None if isinstance(x, str) and (empty or x) else 'a non-empty string' if not empty else 'a string'


def boolean() -> Callable:
    """True or False."""
    return lambda x: None if isinstance(x, bool) else 'True or False'


def shape(n: int) -> Callable:
    """A tuple of n positive integers."""
    return lambda x: None if isinstance(x, (tuple, list)) and len(x) == n and all(_is_int(v) and v > 0 for v in x) \
        else f'{n} positive integers'


def names(empty: bool = False) -> Callable:
    """A tuple of non-empty strings (non-empty unless ``empty``)."""
    return lambda x: None if isinstance(x, (tuple, list)) and (empty or x) and \
        all(isinstance(v, str) and v for v in x) else 'a tuple of names' if empty else 'a non-empty tuple of names'


def pair_in_unit_interval() -> Callable:
    """Two numbers in [0, 1) (Adam's betas)."""
    single = number(0, 1, high_open=True)
    return lambda x: None if isinstance(x, (tuple, list)) and len(x) == 2 and not any(map(single, x)) \
        else 'two numbers in [0, 1)'


def registry(name: str) -> Callable:
    """A key of one of the project's registries (imported only when checked)."""
    def rule(x):
        options = _registries()[name]
        return None if x in options else f'one of {", ".join(repr(o) for o in options)}'
    return rule


def _registries() -> Dict[str, tuple]:
    """The valid names of the registries the configs refer to."""
    from accelerate.utils import LoggerType

    from libs import avamerg, diffusion, modes, precision, uvit
    return dict(nets=tuple(uvit.NETS), precisions=precision.PRECISIONS, samplers=tuple(diffusion.SAMPLERS), skip_types=tuple(diffusion.SKIP_TYPES),
                loss_weightings=tuple(diffusion.LOSS_WEIGHTINGS), speaker_guidance=tuple(modes.SPEAKER_GUIDANCE),
                speaker_text=tuple(avamerg.SPEAKER_TEXT_MODES), trackers=('', *(t.value for t in LoggerType)))


RULES = {
    'model': {
        'seed': seed(), 'z_shape': shape(3), 'clip_img_dim': integer(1), 'clip_text_dim': integer(1),
        'text_dim': integer(1), 'num_text_tokens': integer(1), 'data_type': choice(0, 1),
        'mixed_precision': choice('no', 'fp16', 'bf16'), 'autoencoder.scale_factor': number(0, low_open=True),
        'nnet.name': registry('nets'), 'nnet.embed_dim': integer(1), 'nnet.depth': integer(1),
        'nnet.num_heads': integer(1), 'nnet.patch_size': integer(1), 'nnet.img_size': integer(1),
        'nnet.compile': boolean(),
        'encoders.vae_encode_chunk': integer(1), 'encoders.vae_decode_chunk': integer(1),
        'encoders.clip_chunk': integer(1), 'encoders.caption_chunk': integer(1),
    },
    'sample': {
        'sample.sample_steps': integer(1), 'sample.scale': number(), 'sample.sampler': registry('samplers'),
        'sample.skip_type': registry('skip_types'), 'sample.t2i_cfg_mode': choice('true_uncond', 'empty_token'),
        'sample.speaker_guidance': registry('speaker_guidance'), 'sample.scale_text': number(),
        'sample.scale_face': number(), 'sample.precision': registry('precisions'),
        'sample.batch_samples': integer(1),
    },
    'train': {
        'workdir': text(empty=False), 'name': text(empty=False), 'log_with': registry('trackers'),
        'train.init_from': text(), 'train.resume': boolean(), 'train.n_steps': integer(1),
        'train.batch_size': integer(1), 'train.grad_accum': integer(1), 'train.p_drop_face': probability(),
        'train.p_drop_text': probability(), 'train.p_drop_both': probability(),
        'train.emotion_weight': number(0), 'train.loss_weighting': registry('loss_weightings'),
        'train.ema_rate': number(0, 1, high_open=True), 'train.grad_clip': number(0),
        'train.max_nonfinite': integer(1), 'train.log_every': integer(1), 'train.val_every': interval(),
        'train.val_pairs': integer(1), 'train.ckpt_every': integer(1), 'train.keep_last': integer(1),
        'train.sample_every': interval(), 'train.sample_n': integer(1),
        'train.lora.enabled': boolean(), 'train.lora.rank': integer(1), 'train.lora.alpha': number(0, low_open=True),
        'train.lora.dropout': number(0, 1, high_open=True), 'train.lora.target_modules': names(),
        'train.lora.lr': number(0, low_open=True), 'optimizer.eight_bit': boolean(),
        'optimizer.lr': number(0, low_open=True), 'optimizer.condition_lr_scale': number(0, low_open=True),
        'optimizer.weight_decay': number(0), 'optimizer.betas': pair_in_unit_interval(),
        'optimizer.eps': number(0, low_open=True), 'optimizer.warmup_steps': integer(0),
        'data.train': text(empty=False), 'data.val': text(), 'data.shuffle_window': integer(1),
        'data.max_open_shards': integer(1), 'data.num_workers': integer(0),
    },
    'extract': {
        'data.root': text(empty=False), 'data.speaker_text': registry('speaker_text'),
        'data.val_fraction': number(0, 1, high_open=True), 'data.shard_size': integer(1),
        'data.batch_size': integer(1), 'data.num_workers': integer(0),
    },
    'eval': {
        'eval.inception_path': text(), 'eval.expression_classifier': text(empty=False), 'eval.baselines': names(empty=True),
        'eval.bootstrap_resamples': integer(1), 'eval.fid_bootstrap_resamples': integer(0),
        'eval.bootstrap_seed': integer(0), 'eval.confidence': number(0, 1, low_open=True, high_open=True),
    },
    'caption_decoder_train': {
        'workdir': text(empty=False), 'name': text(empty=False), 'log_with': registry('trackers'),
        **{f'caption_decoder_train.{k}': rule for k, rule in dict(
            features=text(), heldout_fraction=number(0, 1, low_open=True, high_open=True),
            eval_utterances=integer(1), max_tokens=integer(2), train_encode_prefix=boolean(), n_steps=integer(1),
            batch_size=integer(1), lr=number(0, low_open=True), weight_decay=number(0), warmup_steps=integer(0),
            grad_clip=number(0, low_open=True), log_every=integer(1), num_workers=integer(0),
            output=text(empty=False)).items()},
    },
}


def _divisible_batch(config) -> Optional[str]:
    tc = config.train
    if tc.batch_size % tc.grad_accum:
        return f'train.batch_size={tc.batch_size} is not divisible by train.grad_accum={tc.grad_accum}'
    return None


def _dropout_total(config) -> Optional[str]:
    total = sum(config.train[f'p_drop_{k}'] for k in ('face', 'text', 'both'))
    return None if total <= 1 else f'train.p_drop_face + p_drop_text + p_drop_both = {total:g} must be at most 1'


def _lora_needs_weights(config) -> Optional[str]:
    tc = config.train
    return 'train.lora.enabled needs train.init_from: LoRA adapts pretrained weights, a frozen random network has ' \
        'nothing to adapt' if tc.lora.enabled and not tc.init_from else None


def _heads_divide_width(config) -> Optional[str]:
    n = config.nnet
    return None if n.embed_dim % n.num_heads == 0 else \
        f'nnet.embed_dim={n.embed_dim} is not divisible by nnet.num_heads={n.num_heads}'


CROSS_RULES = {'model': (_heads_divide_width,), 'train': (_divisible_batch, _dropout_total, _lora_needs_weights)}


def flatten(settings: dict, prefix: str = '') -> dict:
    """Nested dict -> {'a.b': value}."""
    out = {}
    for key, value in settings.items():
        out.update(flatten(value, f'{prefix}{key}.') if isinstance(value, dict) else {prefix + key: value})
    return out


def lookup(config, path: str):
    """The value at a dotted key path; KeyError if some part is missing."""
    node = config
    for part in path.split('.'):
        if not hasattr(node, 'keys') or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def problems(config, *groups) -> list:
    """Every missing key and bad value of the given rule groups, as 'key=value (must be ...)' strings."""
    found = []
    for group in groups:
        for path, rule in RULES[group].items():
            try:
                value = lookup(config, path)
            except KeyError:
                found.append(f'{path} is missing')
                continue
            wanted = rule(value)
            if wanted:
                found.append(f'{path}={value!r} (must be {wanted})')
        if not found:  # cross-key rules read keys the per-key rules have vouched for
            found += [p for rule in CROSS_RULES.get(group, ()) for p in [rule(config)] if p]
    return found


def check(config, *groups) -> None:
    """Raise one UserError naming every problem of the config in the given groups (see RULES)."""
    found = problems(config, *groups)
    if found:
        raise UserError(f'bad config: {"; ".join(found)}. Fix the config file or override the key on the command '
                        f'line (--config.<key>=...)')
