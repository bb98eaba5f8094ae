"""Sharded data parallel (FSDP2) for train_empath.py where accelerate does not apply it, and DTensor helpers.

``accelerate launch --config_file configs/accelerate/fsdp.yaml`` sets ``ACCELERATE_USE_FSDP=true`` and the
``FSDP_*`` options for the processes it starts. On GPUs accelerate's FSDP plugin then wraps the model with torch's
``fully_shard`` (FSDP2) in ``accelerator.prepare``. On CPU processes (``ACCELERATE_USE_CPU=true``, gloo) it ignores
those options and silently wraps the model in DDP (measured with accelerate 1.15.0), although torch's
``fully_shard`` itself runs there. So where the launch asks for FSDP and accelerate will not shard, ``shard_model``
applies ``fully_shard`` itself, as accelerate's TRANSFORMER_BASED_WRAP policy with ``Block`` would: one FSDP unit per
U-ViT block, then the root (embeddings, output layers and the speaker-path parameters). Every parameter becomes a
``DTensor`` sharded along dim 0 over the processes; the checkpoint code gathers full state dicts from it
(``torch.distributed.checkpoint.state_dict``).
"""
import logging
import os

import torch

from libs.errors import UserError

logger = logging.getLogger(__name__)


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was asked for FSDP (``--use_fsdp`` or an FSDP config file)."""
    return os.environ.get('ACCELERATE_USE_FSDP', 'false').lower() == 'true'


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded or replicated) DTensor; other tensors unchanged."""
    return t.full_tensor() if hasattr(t, 'full_tensor') else t


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _env_flag(name: str, default: str) -> bool:
    """A true/false FSDP_* option that accelerate launch exported."""
    value = os.environ.get(name, default).lower()
    if value not in ('true', 'false'):
        raise UserError(f'{name}={value!r}: with FSDP2 (fsdp_version: 2) it must be true or false; check the '
                        'fsdp_config of your accelerate config file')
    return value == 'true'


def shard_model(nnet, accelerator) -> bool:
    """Apply FSDP2 to the U-ViT, block by block, when the launch asks for FSDP but accelerate will not (CPU runs).

    Returns whether it did. Call it before building the optimizer (sharding replaces the parameters).
    """
    from accelerate.utils import DistributedType
    if not fsdp_requested() or accelerator.num_processes == 1:
        return False
    if any(not p.requires_grad for p in nnet.parameters()):
        raise UserError('train.lora.enabled with FSDP is not supported: with LoRA only the adapters and the new '
                        'parameters are trained, so there is little to shard; launch with '
                        'configs/accelerate/ddp.yaml (or --multi_gpu) instead')
    if accelerator.distributed_type == DistributedType.FSDP:
        return False  # accelerate's FSDP plugin shards the model in accelerator.prepare
    if os.environ.get('FSDP_VERSION', '1') != '2':
        raise UserError(f'FSDP on CPU processes runs through torch fully_shard (FSDP2) only, but the accelerate '
                        f'config asks for fsdp_version {os.environ.get("FSDP_VERSION")}: set fsdp_version: 2 '
                        '(configs/accelerate/fsdp.yaml does)')
    from torch.distributed.fsdp import fully_shard
    reshard = _env_flag('FSDP_RESHARD_AFTER_FORWARD', 'true')
    if _env_flag('FSDP_OFFLOAD_PARAMS', 'false'):
        logger.info('FSDP: fsdp_offload_params ignored, the parameters of a CPU run are in CPU memory already')
    from libs.uvit import Block
    blocks = [m for m in nnet.modules() if isinstance(m, Block)]
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard)
    fully_shard(nnet, reshard_after_forward=reshard)
    local = sum(p.to_local().numel() for p in nnet.parameters())
    total = sum(p.numel() for p in nnet.parameters())
    logger.info('FSDP2 (torch fully_shard, %s): %d blocks and the root sharded over %d processes; this process '
                'holds %d of %d parameter elements', torch.distributed.get_backend(), len(blocks),
                accelerator.num_processes, local, total)
    return True


def prepare(accelerator, nnet, optimizer):
    """``accelerator.prepare(nnet, optimizer)``, except that a model ``shard_model`` sharded is left as it is
    (accelerate would wrap it in DDP on top of FSDP); then only the optimizer is prepared."""
    from accelerate.utils import DistributedType
    if is_sharded(nnet) and accelerator.distributed_type != DistributedType.FSDP:
        return nnet, accelerator.prepare(optimizer)
    return accelerator.prepare(nnet, optimizer)
