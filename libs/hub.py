"""Where pretrained weights come from: a local path, or a file or repository on the Hugging Face Hub.

A weight reference is a config value (``nnet_path``, ``autoencoder.pretrained_path``, ``clip_text.name_or_path``...):

- a local path: used as is when it exists (weights a user put in ``models/``);
- ``hf://OWNER/NAME[@REVISION]/FILE``: a file of a Hub repository (``hf://thu-ml/unidiffuser-v1@main/uvit_v1.pth``);
- ``hf://OWNER/NAME[@REVISION][/FOLDER]``: a transformers folder of a Hub repository (the CLIP encoders, the GPT-2
  tokenizer). For those, a transformers-style id (``openai/clip-vit-large-patch14``) means the same thing when no
  local folder of that name exists. A revision (branch, tag or commit) containing '/' is written URL-encoded.

Hub files live in the huggingface_hub cache (``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``) and are
fetched with ``snapshot_download``. A file already in the cache is used without contacting the Hub; a missing one is
downloaded unless ``HF_HUB_OFFLINE=1`` or the component's ``local_files_only`` forbids it. transformers is only ever
given local folders, so its offline traps (tokenizers that load empty without raising, minutes of retries) cannot
occur. ``preflight`` resolves every component a run needs before any network is built and reports all missing files
in one ``UserError``, each with the ``hf download`` command that gets it.
"""
import dataclasses
import glob
import logging
import os
import shlex
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import unquote

from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id
from tqdm.auto import tqdm

from libs.errors import UserError

logger = logging.getLogger(__name__)

HF_PREFIX = 'hf://'
UNIDIFFUSER_V0, UNIDIFFUSER_V1 = 'thu-ml/unidiffuser-v0', 'thu-ml/unidiffuser-v1'
CLIP_TEXT_REPO, CLIP_IMG_REPO, GPT2_REPO = 'openai/clip-vit-large-patch14', 'openai/clip-vit-base-patch32', \
    'openai-community/gpt2'
# Official names -> the repository holding them, so a missing local copy gets the exact download command.
OFFICIAL = {'uvit_v1.pth': UNIDIFFUSER_V1, 'uvit_v0.pth': UNIDIFFUSER_V0, 'autoencoder_kl.pth': UNIDIFFUSER_V1,
            'caption_decoder.pth': UNIDIFFUSER_V1, 'clip-vit-large-patch14': CLIP_TEXT_REPO,
            'clip-vit-base-patch32': CLIP_IMG_REPO, 'gpt2': GPT2_REPO}


# ----------------------------------------------------------------------------------------------------------------
# References and folder layouts
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HubRef:
    """A file (or, with path '' or a subfolder, a folder) of a Hub model repository at a revision."""
    repo_id: str
    revision: Optional[str] = None  # None: the default branch ('main')
    path: str = ''


def _is_repo_id(ref: str) -> bool:
    """A transformers-style hub id ('gpt2', 'openai/clip-vit-large-patch14') that cannot be meant as a local path."""
    if ref.startswith(('.', '/', '~')) or os.path.exists(ref) or os.path.isdir(ref.split('/')[0]):
        return False
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def parse(ref: str, folder: bool = False) -> Optional[HubRef]:
    """The Hub location a reference names, or None for a local path; a malformed ``hf://`` reference is an error."""
    if not ref.startswith(HF_PREFIX):
        return HubRef(ref) if folder and _is_repo_id(ref) else None
    owner, _, rest = ref[len(HF_PREFIX):].partition('/')
    name, _, path = rest.partition('/')
    name, _, revision = name.partition('@')
    try:
        validate_repo_id(f'{owner}/{name}')
    except HFValidationError as err:
        raise UserError(f'{ref}: not a Hub reference ({err}); write hf://OWNER/NAME[@REVISION]/FILE') from err
    if not folder and not path:
        raise UserError(f'{ref} names a repository, but a file is needed here: write hf://{owner}/{name}/FILE')
    return HubRef(f'{owner}/{name}', unquote(revision) or None, path.strip('/'))


@dataclasses.dataclass(frozen=True)
class Layout:
    """The files a transformers folder must hold (each requirement is met by any one of its alternatives)."""
    required: Tuple[Tuple[Tuple[str, ...], ...], ...]
    optional: Tuple[str, ...] = ()

    def unmet(self, has) -> List[Tuple[Tuple[str, ...], ...]]:
        """Requirements none of whose alternatives are fully present (``has(name) -> bool``)."""
        return [req for req in self.required if not any(all(has(f) for f in alt) for alt in req)]

    def wanted(self) -> List[str]:
        """The files to name in a download command (the repository's listing unknown): first alternatives, optional."""
        return [f for req in self.required for f in req[0]] + list(self.optional)


CONFIG = (('config.json',),)
WEIGHTS = (('model.safetensors',), ('pytorch_model.bin',))
BPE = (('vocab.json', 'merges.txt'), ('tokenizer.json',))
TOKENIZER_EXTRAS = ('tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.json')
LAYOUTS = {
    'clip_text': Layout((CONFIG, WEIGHTS, BPE), TOKENIZER_EXTRAS),
    'clip_img': Layout((CONFIG, WEIGHTS), ('preprocessor_config.json',)),
    'gpt2_tokenizer': Layout((BPE,), TOKENIZER_EXTRAS),
}


def describe(requirements) -> str:
    """'model.safetensors (or pytorch_model.bin), vocab.json + merges.txt (or tokenizer.json)'."""
    def one(req):
        names = [' + '.join(alt) for alt in req]
        return names[0] + (f' (or {", ".join(names[1:])})' if len(names) > 1 else '')
    return ', '.join(one(req) for req in requirements)


def download_command(repo_id: str, files: Sequence[str] = (), revision: Optional[str] = None,
                     local_dir: Optional[str] = None, repo_type: str = 'model', include: Sequence[str] = (),
                     exclude: Sequence[str] = ()) -> str:
    """The ``hf download`` command line that fetches files (or glob patterns) of a repository (into the cache, or
    into local_dir)."""
    args = ['hf', 'download', repo_id, *files] + (['--repo-type', repo_type] if repo_type != 'model' else [])
    for option, patterns in (('--include', include), ('--exclude', exclude)):
        for pattern in patterns or ():
            args += [option, pattern]
    if revision and revision != 'main':
        args += ['--revision', revision]
    if local_dir:
        args += ['--local-dir', local_dir]
    return shlex.join(args)


# ----------------------------------------------------------------------------------------------------------------
# The components of a run
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Part:
    """One pretrained component: where the config says it is, and what to tell the user when it is missing."""
    what: str                     # 'U-ViT', 'CLIP text encoder', ...
    key: str                      # the config key (or flag) holding the reference, for messages
    ref: str
    kind: str = 'file'            # 'file' or a LAYOUTS entry
    local_files_only: bool = False
    source: Optional[str] = None  # the official component on the Hub (OWNER/NAME[/FILE]), suggested for local paths
    produced_by: str = ''         # for components a script of this project writes: how to make one
    exports: str = ''             # where that script puts them, a glob under config.workdir


NNET_EXPORT = 'nnet_ema.safetensors'  # the EMA network train_empath.py writes into each checkpoint and its run folder
FINE_TUNED_NNET = dict(
    produced_by=f'a fine-tuned U-ViT is written by train_empath.py, as <workdir>/<name>/ckpts/<step>.ckpt/'
                f'{NNET_EXPORT} (EMA weights, the ones to sample with) and nnet.safetensors',
    exports=os.path.join('*', 'ckpts', '*.ckpt', NNET_EXPORT))
FINE_TUNED_DECODER = dict(
    produced_by='a fine-tuned caption decoder is written by train_caption_decoder.py, as '
                '<workdir>/<name>/caption_decoder.pth', exports=os.path.join('*', 'caption_decoder.pth'))
# What a U-ViT reference (--nnet_path, config.nnet_path) may name, for the messages about one that names something else.
NNET_EXPECTED = (f'Expected an official UniDiffuser U-ViT (uvit_v1.pth or uvit_v0.pth, e.g. hf://{UNIDIFFUSER_V1}/'
                 f'uvit_v1.pth), a network train_empath.py exported (<workdir>/<name>/{NNET_EXPORT} or '
                 f'<workdir>/<name>/ckpts/<step>.ckpt/{NNET_EXPORT}, which carry their config), or a '
                 f'<workdir>/<name>/ckpts/<step>.ckpt folder.')


def nnet_ref(config, nnet_path: Optional[str] = None) -> str:
    """The U-ViT a run samples with: --nnet_path, else config.nnet_path; a checkpoint (or run) folder of
    train_empath.py stands for the EMA network in it. Any other folder is a UserError."""
    ref = nnet_path or config.nnet_path
    if parse(ref) is not None or not os.path.isdir(ref):
        return ref
    export = os.path.join(ref, NNET_EXPORT)
    if os.path.isfile(export):
        return export
    raise UserError(f'{"--nnet_path" if nnet_path else "config.nnet_path"}={ref} is a folder without '
                    f'{NNET_EXPORT}, so not a checkpoint of train_empath.py. {NNET_EXPECTED}')


def _nnet(config, nnet_path):
    """The U-ViT to sample with: the --nnet_path flag, else config.nnet_path (``nnet_ref``)."""
    return [Part('U-ViT', '--nnet_path' if nnet_path else 'nnet_path', nnet_ref(config, nnet_path),
                 **FINE_TUNED_NNET)]


def _init_from(config, nnet_path):
    """The U-ViT a fine-tuning starts from (none when training from scratch)."""
    init = config.train.init_from
    return [Part('U-ViT to fine-tune', 'train.init_from', init, **FINE_TUNED_NNET)] if init else []


def _autoencoder(config, nnet_path):
    """The VAE checkpoint (LDM layout)."""
    return [Part('VAE', 'autoencoder.pretrained_path', config.autoencoder.pretrained_path,
                 source=f'{UNIDIFFUSER_V1}/autoencoder_kl.pth')]


def _caption_decoder(config, nnet_path):
    """The caption decoder checkpoint and its GPT-2 tokenizer."""
    cd, local = config.caption_decoder, config.caption_decoder.get('local_files_only', False)
    return [Part('caption decoder', 'caption_decoder.pretrained_path', cd.pretrained_path, local_files_only=local,
                 source=f'{UNIDIFFUSER_V1}/caption_decoder.pth', **FINE_TUNED_DECODER),
            Part('GPT-2 tokenizer', 'caption_decoder.tokenizer', cd.tokenizer, 'gpt2_tokenizer', local, GPT2_REPO)]


def _clip_text(config, nnet_path):
    """The CLIP text encoder folder (model and tokenizer)."""
    return [Part('CLIP text encoder', 'clip_text.name_or_path', config.clip_text.name_or_path, 'clip_text',
                 config.clip_text.get('local_files_only', False), CLIP_TEXT_REPO)]


def _clip_img(config, nnet_path):
    """The CLIP image encoder folder (model and preprocessing)."""
    return [Part('CLIP image encoder', 'clip_img.name_or_path', config.clip_img.name_or_path, 'clip_img',
                 config.clip_img.get('local_files_only', False), CLIP_IMG_REPO)]


PARTS = {'nnet': _nnet, 'init_from': _init_from, 'autoencoder': _autoencoder, 'caption_decoder': _caption_decoder,
         'clip_text': _clip_text, 'clip_img': _clip_img}


def config_parts(config, names: Sequence[str], nnet_path: Optional[str] = None) -> List[Part]:
    """The components ``names`` (keys of PARTS; the caption decoder brings its tokenizer) of a config."""
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise ValueError(f'unknown components {unknown}; valid names: {", ".join(PARTS)}')
    return [part for name in names for part in PARTS[name](config, nnet_path)]


# ----------------------------------------------------------------------------------------------------------------
# Locating (no network) and downloading
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Missing:
    """Why a component is not available, and the command that gets it."""
    part: Part
    detail: str
    command: str = ''
    note: str = ''


def _cache_dir(cache_dir=None) -> str:
    """The hub cache in use (read at call time, so HF_HUB_CACHE changes made before a run are seen)."""
    return str(cache_dir or constants.HF_HUB_CACHE)


def _cached(hub: HubRef, filename: str, cache_dir: str) -> Optional[str]:
    """Path of a repository file in the cache at the reference's revision, or None."""
    path = try_to_load_from_cache(hub.repo_id, filename, cache_dir=cache_dir, revision=hub.revision)
    return path if isinstance(path, str) and os.path.isfile(path) else None


def _in_repo(hub: HubRef, name: str) -> str:
    """A folder file's path inside the repository."""
    return f'{hub.path}/{name}' if hub.path else name


def _revision_note(hub: HubRef) -> str:
    """' at revision X' for a pinned revision, '' for the default branch."""
    return f' at revision {hub.revision}' if hub.revision not in (None, 'main') else ''


def _locate_hub(part: Part, hub: HubRef, cache_dir: str):
    """(local path, None) when the cache holds everything the part needs at its revision, else (None, Missing)."""
    where = f'{hub.repo_id}{_revision_note(hub)}, not in the Hugging Face cache'  # the cache: once, at the end
    if part.kind == 'file':
        path = _cached(hub, hub.path, cache_dir)
        if path:
            return path, None
        return None, Missing(part, f'{hub.path} of {where}', download_command(hub.repo_id, [hub.path], hub.revision))
    layout, found = LAYOUTS[part.kind], {}

    def has(name):
        found[name] = found.get(name) or _cached(hub, _in_repo(hub, name), cache_dir)
        return found[name] is not None
    unmet = layout.unmet(has)
    if not unmet:  # every file of a revision lies in its snapshot folder: the folder of any one of them
        return os.path.dirname(next(path for path in found.values() if path)), None
    return None, Missing(part, f'{describe(unmet)} of {where}',
                         download_command(hub.repo_id, [_in_repo(hub, f) for f in layout.wanted()], hub.revision))


def _inside(path: str, folder: str) -> bool:
    """Whether path lies in folder."""
    folder = os.path.abspath(folder)
    return os.path.commonpath([os.path.abspath(path), folder]) == folder


def _local_hint(part: Part, path: str, config) -> Tuple[str, str]:
    """(command, note) for a local path that is missing or incomplete."""
    name = os.path.basename(os.path.normpath(path))
    workdir = os.path.abspath(config.get('workdir') or 'workdir')
    local = config.get('local_weights')  # a folder of weights a script of this project writes (the tiny ones)
    if local and _inside(path, local['folder']):
        return '', f'{local["folder"]} is written by `{local["made_by"]}`'
    if part.produced_by and (name not in OFFICIAL or _inside(path, workdir)):  # written by a training script
        found = sorted(glob.glob(os.path.join(workdir, part.exports)), key=os.path.getmtime)[-3:]  # newest
        return '', part.produced_by + (f' (found: {", ".join(map(os.path.relpath, found))})' if found else '')
    if name in OFFICIAL:
        if part.kind == 'file':
            return download_command(OFFICIAL[name], [name], local_dir=os.path.dirname(path) or '.'), ''
        return download_command(OFFICIAL[name], LAYOUTS[part.kind].wanted(), local_dir=path), ''
    what = 'a folder saved with save_pretrained' if part.kind in LAYOUTS else 'the file'
    return '', f'point {part.key} at {what}, or at hf://{part.source} to have it downloaded'


def _locate(part: Part, hub: Optional[HubRef], config, cache_dir: str):
    """(local path, None) or (None, Missing), without any network access."""
    if hub is not None:
        return _locate_hub(part, hub, cache_dir)
    path = part.ref
    if part.kind == 'file':
        if os.path.isfile(path):
            return path, None
        detail = f'{path} is a folder, not a file' if os.path.isdir(path) else f'no such file: {path}'
    elif os.path.isdir(path):
        unmet = LAYOUTS[part.kind].unmet(lambda f: os.path.isfile(os.path.join(path, f)))
        if not unmet:
            return path, None
        detail = f'{path} lacks {describe(unmet)}'
    else:
        detail = f'no such folder: {path}'
    return None, Missing(part, detail, *_local_hint(part, path, config))


def _choose(layout: Layout, available) -> Tuple[List[str], list]:
    """The files to fetch from a listed repository (the first alternative it has for each requirement, and the
    optional files it has), and the requirements it cannot meet."""
    chosen = []
    for req in layout.required:
        chosen += next((alt for alt in req if all(available(f) for f in alt)), ())
    return chosen + [f for f in layout.optional if available(f) and f not in chosen], layout.unmet(available)


class DownloadBar(tqdm):
    """Download progress, shown on terminals even where the libraries' progress bars are off (libs/logs.py)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('disable', None)  # tqdm's 'only on a terminal'
        super().__init__(*args, **kwargs)


def _first_line(err: Exception) -> str:
    """'ErrorType: first line of the message', for one-line reports."""
    text = str(err).strip()
    return f'{type(err).__name__}: {text.splitlines()[0]}' if text else type(err).__name__


def _download(items: List[Tuple[Part, HubRef]], cache_dir: str) -> Dict[int, str]:
    """Fetch what the parts need, one ``snapshot_download`` per repository and revision; returns {index: reason}."""
    groups: Dict[Tuple[str, Optional[str]], List[int]] = {}
    for i, (part, hub) in enumerate(items):
        groups.setdefault((hub.repo_id, hub.revision), []).append(i)
    failed, unreachable = {}, None
    for (repo_id, revision), indices in groups.items():
        if unreachable:
            failed.update({i: unreachable for i in indices})
            continue
        try:  # one quick call (no retries) that also tells a missing repository or revision from no connection
            files = {s.rfilename for s in HfApi().model_info(repo_id, revision=revision).siblings or ()}
        except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
            failed.update({i: _first_line(err) for i in indices})
            continue
        except Exception as err:  # no connection: every other repository would fail the same way
            unreachable = f'cannot reach the Hub ({_first_line(err)})'
            failed.update({i: unreachable for i in indices})
            continue
        wanted = []
        for i in indices:
            part, hub = items[i]
            if part.kind == 'file':
                chosen, unmet = [hub.path], ([] if hub.path in files else [((hub.path,),)])
            else:
                chosen, unmet = _choose(LAYOUTS[part.kind], lambda f: _in_repo(hub, f) in files)
                chosen = [_in_repo(hub, f) for f in chosen]
            if unmet:
                failed[i] = f'{repo_id} has no {describe(unmet)}{_revision_note(hub)}'
            else:
                wanted += [f for f in chosen if f not in wanted]
        if not wanted:
            continue
        logger.info('downloading %s from %s%s into %s', ', '.join(wanted), repo_id,
                    f'@{revision}' if revision else '', cache_dir)
        try:
            snapshot_download(repo_id, revision=revision, allow_patterns=wanted, cache_dir=cache_dir,
                              tqdm_class=DownloadBar)
        except Exception as err:  # network, disk or permission trouble: reported with the other missing files
            failed.update({i: f'download failed ({_first_line(err)})' for i in indices if i not in failed})
    return failed


def resolve(parts: Sequence[Part], config=None, cache_dir=None) -> List[str]:
    """Local paths of the parts, downloading missing Hub files when allowed; else one UserError listing them all."""
    cache_dir, config, offline = _cache_dir(cache_dir), config or {}, constants.HF_HUB_OFFLINE
    hubs = [parse(part.ref, folder=part.kind != 'file') for part in parts]
    located = [_locate(part, hub, config, cache_dir) for part, hub in zip(parts, hubs)]
    may_fetch = [hub is not None and not offline and not part.local_files_only for part, hub in zip(parts, hubs)]
    repos = {(hubs[i].repo_id, hubs[i].revision) for i, (_, missing) in enumerate(located)
             if missing is not None and may_fetch[i]}
    if repos:
        # Every part from those repositories is fetched at one revision: when 'main' has moved on, the files cached
        # at the old commit are linked into the new snapshot (and downloaded again only if they changed).
        fetch = [i for i, hub in enumerate(hubs) if may_fetch[i] and (hub.repo_id, hub.revision) in repos]
        failed = _download([(parts[i], hubs[i]) for i in fetch], cache_dir)
        for k, i in enumerate(fetch):
            located[i] = _locate(parts[i], hubs[i], config, cache_dir)
            if located[i][1] is not None and k in failed:
                located[i][1].detail += f'; {failed[k]}'
    missing = [m for _, m in located if m is not None]
    if missing:
        raise UserError(*missing_message(missing, len(parts), offline, cache_dir))
    return [path for path, _ in located]


def missing_message(missing: List[Missing], total: int, offline: bool,
                    cache_dir: Optional[str] = None) -> Tuple[str, List[str]]:
    """One message for every missing component: a first line, then (the details) one line per component saying
    what it is and where it was looked for, each followed by the command that gets it on a line of its own."""
    if total == 1:
        headline = 'A pretrained component is missing:'
    else:
        count = f'All {total}' if len(missing) == total else f'{len(missing)} of the {total}'
        headline = f'{count} pretrained components this run needs are missing (nothing was loaded):'
    lines = []
    for m in missing:
        where = f'{m.part.key}={m.part.ref}' if m.part.key else m.part.ref
        lines.append(f'- {m.part.what} ({where}): {m.detail}')
        if m.command:
            lines.append(f'    {m.command}')
        if m.note:
            lines.append(f'    {m.note}')
    blocked = sorted(m.part.key or m.part.ref for m in missing if m.part.local_files_only and m.command)
    if any(parse(m.part.ref, folder=m.part.kind != 'file') for m in missing):  # looked for in the cache
        lines.append(f'The Hugging Face cache looked in: {_cache_dir(cache_dir)}')
    if offline and any(m.command for m in missing):
        lines.append('HF_HUB_OFFLINE=1, so nothing was downloaded: run the commands where the Hub is reachable (they '
                     'fill the Hugging Face cache, which can be copied here), or unset HF_HUB_OFFLINE.')
    if blocked:
        lines.append(f'local_files_only is set for {", ".join(blocked)}, so those were not downloaded.')
    return headline, lines


def preflight(config, names: Sequence[str], nnet_path: Optional[str] = None) -> Dict[str, str]:
    """Make sure every component ``names`` of the config is on this machine before any network is built.

    Missing Hub files are downloaded when allowed; whatever stays missing is reported in one UserError. Returns
    {config key: local path}.
    """
    parts = config_parts(config, [n for n in names if n], nnet_path)
    paths = resolve(parts, config)
    for part, path in zip(parts, paths):
        logger.debug('%s: %s -> %s', part.key, part.ref, path)
    return {part.key: path for part, path in zip(parts, paths)}


def cached_path(ref: str) -> Optional[str]:
    """The local file a file reference stands for when it is already on this machine (no network), else None."""
    hub = parse(ref)
    if hub is None:
        return ref if os.path.isfile(ref) else None
    return _cached(hub, hub.path, _cache_dir())


def local_path(ref: str, kind: str = 'file', local_files_only: bool = False, what: str = 'weights') -> str:
    """The local file or folder a reference stands for (Hub references are fetched when allowed); local paths pass
    through unchanged, for the caller's own checks."""
    if parse(ref, folder=kind != 'file') is None:
        return ref
    return resolve([Part(what, '', ref, kind, local_files_only)])[0]
