"""Memory-saving fine-tuning: LoRA adapters through peft, 8-bit AdamW through bitsandbytes (both optional).

With ``train.lora.enabled`` the pretrained U-ViT is frozen and peft injects low-rank adapters (W + α/r · B·A, B
zero-initialised, so training starts from the pretrained network) into the configured Linear layers, by default
``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` of every block. The parameters UniDiffuser does not have
(speaker positions and segment embedding, per-block gates, [EMO], emotion head: ``UViT.condition_parameters``)
have nothing pretrained to adapt and are trained in full.

- Checkpoints hold only the trained tensors (peft's key layout, e.g. ``in_blocks.0.attn.qkv.lora_A.default.weight``);
  the frozen base is re-read from ``train.init_from`` on resume, and its SHA-256 must match the one the run
  started from.
- The EMA averages the trained tensors only, not the merged weights: it then costs what they cost (about 110 MB at
  full size) instead of a second copy of the network (3.6 GB), which matters on a 24 GB GPU. The exported EMA network is
  W + α/r · EMA(B)·EMA(A); an EMA of the merged weights would be W + α/r · EMA(B·A). The two differ by the
  covariance of B and A over the averaging window, a second-order term that shrinks as training settles.
- The exported ``nnet_ema.safetensors`` is merged into the ordinary key layout (``attn.qkv.weight``...), so sampling,
  evaluation and the web demo load it as any fine-tuned U-ViT, without peft.
"""
import copy
import hashlib
import logging
import os
from typing import Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from libs.errors import UserError

logger = logging.getLogger(__name__)

ADAPTER = 'default'        # peft's adapter name; one adapter per run
ADAPTER_KEY = '.lora_'     # peft's adapter tensors: <layer>.lora_A.default.weight, <layer>.lora_B.default.weight
BASE_KEY = '.base_layer.'  # the wrapped pretrained Linear of an adapted layer: <layer>.base_layer.weight


def enabled(config) -> bool:
    """Whether the config trains LoRA adapters (configs without a ``train.lora`` section do not)."""
    return bool(config.train.get('lora', {}).get('enabled', False))


# ----------------------------------------------------------------------------------------------------------------
# Injection
# ----------------------------------------------------------------------------------------------------------------

def apply_lora(nnet: torch.nn.Module, lora_config) -> None:
    """Freeze the U-ViT, inject peft LoRA adapters into the target Linear layers, train the new parameters in full."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    rank, targets = lora_config.rank, list(lora_config.target_modules)  # values checked in libs/config_check.py
    new = set(nnet.condition_parameters()) if getattr(nnet, 'condition', False) else set()
    linear = [n for n, m in nnet.named_modules() if isinstance(m, torch.nn.Linear)]
    matched = [n for n in linear if any(n == t or n.endswith('.' + t) for t in targets)]
    clash = [n for n in matched if any(p.startswith(n + '.') for p in new)]
    if clash:
        raise UserError(f'train.lora.target_modules {targets} match {clash}, which belong to the new speaker-path '
                        'parameters; those are trained in full, so leave them out of the targets')
    unmatched = [t for t in targets if not any(n == t or n.endswith('.' + t) for n in linear)]
    if unmatched:
        suffixes = sorted({n.split('.', 2)[-1] for n in linear if n.startswith(('in_blocks.0.', 'out_blocks.0.'))})
        others = sorted(n for n in linear if not n.startswith(('in_blocks.', 'mid_block.', 'out_blocks.')))
        raise UserError(f'train.lora.target_modules {unmatched} match no Linear layer of the U-ViT; block layers '
                        f'are {suffixes}, other layers {others}')
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=lora_config.alpha, lora_dropout=lora_config.dropout,
                                       target_modules=targets, bias='none'), nnet, adapter_name=ADAPTER)
    for name, p in nnet.named_parameters():  # peft froze everything but its adapters
        if name in new:
            p.requires_grad_(True)
    n_layers = sum(isinstance(m, LoraLayer) for m in nnet.modules())
    trained = sum(p.numel() for p in nnet.parameters() if p.requires_grad)
    total = sum(p.numel() for p in nnet.parameters())
    logger.info('LoRA rank %d, alpha %g on %d layers (%s): %.2fM of %.2fM parameters trained (adapters and the '
                'new speaker-path parameters)', rank, lora_config.alpha, n_layers, ', '.join(targets), trained / 1e6,
                total / 1e6)


def adapter_keys(state_dict_keys) -> list:
    """The adapter tensors among state-dict keys."""
    return [k for k in state_dict_keys if ADAPTER_KEY in k]


def copy_sharing(model: torch.nn.Module, own) -> torch.nn.Module:
    """A deep copy of ``model`` that shares every parameter with it except those named in ``own`` (copied)."""
    shared = {id(p): p for n, p in model.named_parameters() if n not in own}
    return copy.deepcopy(model, memo=shared)


# ----------------------------------------------------------------------------------------------------------------
# The frozen base: resume only on the weights the adapters were trained on
# ----------------------------------------------------------------------------------------------------------------

def base_digest(config) -> Optional[str]:
    """SHA-256 of ``train.init_from`` for a LoRA run (its frozen weights are not in the checkpoints), else None."""
    if not enabled(config):
        return None
    digest = hashlib.sha256()
    with open(config.train.init_from, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 24), b''):
            digest.update(chunk)
    return digest.hexdigest()


def check_same_base(saved: Optional[str], current: Optional[str], path: str, checkpoint: str) -> None:
    """A LoRA checkpoint resumes only on the base weights it was trained on."""
    if saved != current:
        raise UserError(f'{checkpoint} was trained on frozen base weights with SHA-256 {saved}, but train.init_from '
                        f'= {path} has {current}. Put back the original file, or start a new run (config.name)')


# ----------------------------------------------------------------------------------------------------------------
# Merged export: the ordinary U-ViT layout, no peft needed to load it
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def merged_state_dict(model: torch.nn.Module, trained: Optional[Dict[str, torch.Tensor]] = None):
    """The ordinary-layout state dict (CPU) of a LoRA model with every adapter merged: W + α/r · B·A.

    ``trained`` (e.g. a checkpoint's tensors) replaces those of the model's tensors first, on a copy that shares the
    others; the model itself is unchanged.
    """
    from peft.tuners.lora import LoraLayer
    if trained is not None:
        model = copy_sharing(model, set(trained))
        result = model.load_state_dict(trained, strict=False)
        if adapter_keys(result.missing_keys) or result.unexpected_keys:
            raise UserError(f'the LoRA tensors do not fit this model: adapters missing '
                            f'{adapter_keys(result.missing_keys)[:3]}, unexpected tensors {result.unexpected_keys[:3]}')
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    merged = {}
    for key, value in model.state_dict().items():
        if ADAPTER_KEY in key:
            continue
        layer, sep, rest = key.partition(BASE_KEY)
        if sep and layer in layers:
            key = f'{layer}.{rest}'
            if rest == 'weight':
                value = value + layers[layer].get_delta_weight(ADAPTER).to(value.dtype)
        merged[key] = value.detach().cpu().contiguous()
    return merged


def write_merged(model: torch.nn.Module, source: str, dest: str) -> None:
    """Write the merged network of the LoRA tensors in ``source`` (a checkpoint's file) to ``dest``, same metadata."""
    with safe_open(source, 'pt') as f:
        metadata = f.metadata()
    save_file(merged_state_dict(model, load_file(source)), dest, metadata=metadata)


# ----------------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------------

def adamw_class(eight_bit: bool):
    """torch's AdamW, or bitsandbytes' 8-bit AdamW (``optimizer.eight_bit``; CUDA only, optional)."""
    if not eight_bit:
        return torch.optim.AdamW
    if not torch.cuda.is_available():
        raise UserError('optimizer.eight_bit needs a CUDA GPU (bitsandbytes quantises the AdamW states on the GPU); '
                        'set --config.optimizer.eight_bit=False on this machine')
    try:
        import bitsandbytes
    except ImportError as err:
        raise UserError(f'optimizer.eight_bit needs bitsandbytes ({err}): pip install -r requirements-gpu-extra.txt, '
                        'or set --config.optimizer.eight_bit=False') from err
    return bitsandbytes.optim.AdamW8bit


def checkpoint_hint(path: str) -> str:
    """What to do with a LoRA checkpoint file where a whole network was expected."""
    run = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    return (f'{path} holds only the tensors a LoRA run trains (adapters and new parameters); the whole network is '
            f'the run\'s merged export {os.path.join(run, "nnet_ema.safetensors")}')
