"""Reading weights and images safely and writing files atomically (a crash never leaves a half-written file behind)."""
import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from typing import Dict, Optional

import torch
from PIL import Image

from libs.errors import UserError
from libs.hub import local_path


def weights_format(path: str) -> Optional[str]:
    """'safetensors' or 'torch' as a file's first bytes say (whatever its name), or None for anything else."""
    with open(path, 'rb') as f:
        head = f.read(9)
    # safetensors: the JSON header's size (8 bytes, little-endian: its first byte may be anything), then the header
    if len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < os.path.getsize(path):
        return 'safetensors'
    if head[:4] == b'PK\x03\x04' or head[:1] == b'\x80':  # torch.save's zip archive, or a legacy pickle
        return 'torch'
    return None


def not_weights(path: str) -> str:
    """What a file that is neither safetensors nor a PyTorch checkpoint is, for messages."""
    with open(path, 'rb') as f:
        head = f.read(4096)
    if not head:
        return 'the file is empty'
    if head[8:9] == b'{':  # a safetensors header whose stated length exceeds the file: cut short or damaged
        return (f'it starts like a safetensors file, but its header claims {int.from_bytes(head[:8], "little")} '
                f'bytes and the file has {os.path.getsize(path)}: it is cut short or damaged')
    try:
        text = head.decode('utf-8')
    except UnicodeDecodeError:
        return 'it is neither a safetensors file nor a PyTorch checkpoint'
    return f'it is a {"JSON" if text.lstrip()[:1] in "{[" else "text"} file, not a safetensors file or a PyTorch ' \
           'checkpoint'


REFUSED_PICKLE = 'Weights only load failed'  # how torch.load(weights_only=True) starts a refusal (2.4 to 2.13)


def load_error(err: Exception) -> str:
    """A loader's error in one short line; torch's refusal to unpickle an object (a paragraph whose wording changes
    between versions) becomes the name of the blocked object."""
    text = str(err)
    if REFUSED_PICKLE in text:
        blocked = re.search(r'GLOBAL ([\w.]+)', text)  # 'Unsupported global: GLOBAL x.y', 'unsupported GLOBAL x.y'
        if blocked:
            return f'it holds a pickled Python object ({blocked[1]}), which is never unpickled: only tensors are read'
        detail = re.search(r'WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)', text, re.S)
        return (f'it holds pickled data besides tensors ({detail[1].strip() if detail else "refused by torch.load"}),'
                ' which is never unpickled')
    lines = text.strip().splitlines()
    return f'{type(err).__name__}: {lines[0]}' if lines else type(err).__name__


def read_state_dict(path: str, what: str = 'checkpoint', how_to_get: str = '') -> Dict[str, torch.Tensor]:
    """Load a flat tensor dict from a safetensors file or a .pth/.pt/.ckpt file (local, or an ``hf://`` reference,
    see libs/hub.py), never unpickling arbitrary objects. The format is read off the file's first bytes."""
    path = local_path(path, what=what)
    hint = f' {how_to_get}' if how_to_get else ''
    if not os.path.isfile(path):
        raise UserError(f'{what} not found: {path}.{hint}')
    kind = weights_format(path)
    if kind is None:
        raise UserError(f'cannot read {what} {path}: {not_weights(path)}.{hint}')
    try:
        if kind == 'safetensors':
            from safetensors.torch import load_file
            return load_file(path)
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one, not a stack trace
        raise UserError(f'cannot read {what} {path}: {load_error(e)}.{hint}') from e
    if isinstance(sd, dict) and 'state_dict' in sd and isinstance(sd['state_dict'], dict):
        sd = sd['state_dict']
    if not isinstance(sd, dict):
        raise UserError(f'{what} {path} holds a {type(sd).__name__}, not a dict of tensors.{hint}')
    other = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None:
        raise UserError(f'{what} {path} is not a flat dict of tensors ({other!r}: {type(sd[other]).__name__}, not a '
                        f'tensor).{hint}')
    return sd


def not_a_file(path: str) -> str:
    """What is at ``path`` instead of a readable file, for messages: a folder, a link loop, a broken link, nothing."""
    if os.path.isdir(path):
        return 'it is a folder, not an image file: name a file in it'
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return 'it is a symbolic link that leads back to itself (a loop): fix the link or name the file'
            return f'it is a symbolic link to {os.readlink(path)}, which does not exist: fix the link'
    if os.path.exists(path):
        return 'it is not a regular file (a device, socket or pipe): name an image file'
    return 'no such file'


def read_rgb(path: str) -> Image.Image:
    """An RGB image read fully into memory (no file handle stays open)."""
    with Image.open(path) as image:
        return image.convert('RGB')


def describe_mismatch(expected: Dict[str, torch.Size], found: Dict[str, torch.Size], limit: int = 5) -> str:
    """Human summary of missing keys, unexpected keys and shape mismatches between two key->shape maps."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f'{k}: expected {tuple(expected[k])}, found {tuple(found[k])}'
              for k in expected if k in found and tuple(expected[k]) != tuple(found[k])]
    parts = []
    for name, items in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', shapes)):
        if items:
            more = f' (+{len(items) - limit} more)' if len(items) > limit else ''
            parts.append(f'{len(items)} {name}: {", ".join(items[:limit])}{more}')
    return '; '.join(parts)


FULL_DISK_BYTES = 64 * 2 ** 20  # free space below which a failed write is taken for a full disk


def write_error_code(path: str, err: Exception) -> Optional[int]:
    """The errno behind a failed write that did not raise an OSError, or None when it was not the disk's fault.

    safetensors names the OS error in its message ('... (os error 28)'); torch.save only says 'unexpected pos ...',
    so a full disk is recognised by the free space left where it was writing.
    """
    found = re.search(r'os error (\d+)', str(err))
    if found:
        return int(found[1])
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return errno.ENOSPC if shutil.disk_usage(folder).free < FULL_DISK_BYTES else None
    except OSError:
        return None


@contextlib.contextmanager
def writing(path: str):
    """Re-raise a failed write under ``path`` as an OSError that names it (libs.cli reports those in one line).

    Writes to open files raise OSErrors without a file name, and torch.save / safetensors report a full disk as a
    RuntimeError / SafetensorError without an errno.
    """
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, path) from err
        raise
    except Exception as err:
        code = write_error_code(path, err)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), path) from err


def _create_temp(folder: str, prefix: str):
    """A new file in folder opened for writing, as (fd, path), with the permissions the umask gives new files.

    tempfile.mkstemp always creates mode 0600, which would make every atomically written output unreadable to other
    users (a shared results folder, a web server); os.open with 0666 lets the kernel apply the umask as open() does.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0)
    while True:
        path = os.path.join(folder, f'{prefix}.{secrets.token_hex(6)}')
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:  # a name another writer drew too: draw again
            continue


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write bytes to path via a temp file in the same folder and an atomic rename (permissions as the umask says)."""
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = _create_temp(folder, '.tmp-' + os.path.basename(path))
        try:
            with os.fdopen(fd, 'wb') as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def atomic_write_json(path: str, obj) -> None:
    """Atomically write a JSON document (indented, UTF-8)."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False).encode('utf-8'))


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str] = None) -> None:
    """Atomically write tensors as safetensors."""
    from safetensors.torch import save
    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def atomic_replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Move a finished temp folder into place; an older folder of that name is removed only afterwards.

    A directory cannot be renamed over a non-empty one, so the old folder first moves aside to ``<final>.old``. If
    the second rename fails, the old folder is put back; if the process dies between the two renames, the next
    call (or ``recover_replaced_dir``) puts it back first. Either way the published folder is never lost.
    """
    recover_replaced_dir(final_dir)
    old = final_dir + '.old'
    if os.path.exists(old):  # left by a run that died after publishing, before removing the old folder
        shutil.rmtree(old)
    if not os.path.exists(final_dir):
        os.replace(tmp_dir, final_dir)
        return
    os.replace(final_dir, old)
    try:
        os.replace(tmp_dir, final_dir)
    except BaseException:
        os.replace(old, final_dir)
        raise
    shutil.rmtree(old)


def recover_replaced_dir(final_dir: str) -> str:
    """Undo an ``atomic_replace_dir`` that died between its renames (only ``<final>.old`` exists); returns final_dir.

    Readers of a published folder may call it before reading; writers get it from ``atomic_replace_dir``.
    """
    old = final_dir + '.old'
    if not os.path.exists(final_dir) and os.path.isdir(old):
        os.replace(old, final_dir)
    return final_dir
