"""Fetch AvaMERG from the Hugging Face Hub into one folder that libs/avamerg.py reads, and check it.

    python scripts/get_avamerg.py --out data/avamerg                  # annotations and videos (ZhangHanXD/AvaMERG)
    python scripts/get_avamerg.py --out data/avamerg --frames         # annotations, test videos, AvaMERG_frame
    HF_HUB_OFFLINE=1 python scripts/get_avamerg.py --out data/avamerg # only what the hub cache already holds

Files are downloaded into the hub cache (HF_HUB_CACHE: resumable, shared with `hf download`, honours
HF_HUB_OFFLINE); audio is not fetched. OUT gets symlinks to the cached files (copies where links are impossible)
and the unpacked archives (.zip, .tar, .tar.gz, .tgz), each into a folder named after the archive, or beside it when
the archive holds just that folder (train_video.zip -> train_video/video_v5_0/). Media in a folder the reader does
not search are linked into one it does. The check prints, per split, dialogues, turns, media files found and the
stems whose media are missing (all of them in OUT/check.json); the exit code is 0 when everything is there and 2
otherwise, with the `hf download` commands that fetch what is missing.
"""
import os
import shutil
import sys
import tarfile
import zipfile

# Run as a file, Python puts scripts/ (not the repository root) on the path; libs/ lives in the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from huggingface_hub import constants, get_cached_repo_tree, snapshot_download  # noqa: E402
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,  # noqa: E402
                                    LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import filter_repo_objects  # noqa: E402
from tqdm import tqdm  # noqa: E402

from absl import flags  # noqa: E402

from libs import cli  # noqa: E402
from libs.avamerg import (FRAME_SUFFIXES, VIDEO_SUFFIX, MediaIndex, annotation_path, iter_pairs,  # noqa: E402
                          read_dialogues)
from libs.errors import UserError  # noqa: E402
from libs.hub import download_command  # noqa: E402

RELEASE_REPO, FRAMES_REPO = 'ZhangHanXD/AvaMERG', 'SIChoi/AvaMERG_frame'
AUDIO = ['*audio*', '*.wav']
# The test media of the release stay wanted with --frames: nothing shows that AvaMERG_frame holds test frames.
RELEASE_WITH_FRAMES = ['*.json', 'test*']
ARCHIVES = ('.tar.gz', '.tgz', '.tar', '.zip')
CHECKED_SPLITS = ('train', 'test')   # 'val' is a part of train.json, checked with it
# Where media of a split found in a folder the reader does not search are linked, by kind.
LINK_TARGETS = {'train': {'frames': 'image_v5_0', 'videos': 'video_v5_0'},
                'test': {'frames': 'test/test_image', 'videos': 'test/test_video'}}
SHOWN = 10           # missing stems printed per split
CHECK_FILE = 'check.json'


def wanted(frames):
    """(repo, allow_patterns, ignore_patterns) of each repository to fetch."""
    if frames:
        return [(RELEASE_REPO, RELEASE_WITH_FRAMES, AUDIO), (FRAMES_REPO, None, AUDIO)]
    return [(RELEASE_REPO, None, AUDIO)]


def hf_command(repo, revision, files=(), include=None, exclude=None):
    """The `hf download` command line that fetches these files (or patterns) of a dataset repository."""
    return download_command(repo, files, revision, repo_type='dataset', include=include or (), exclude=exclude or ())


def missing_from_snapshot(repo, revision, folder, allow, ignore):
    """Files of the cached tree listing of `repo` that the snapshot folder lacks."""
    listed = [f.path for f in get_cached_repo_tree(repo, repo_type='dataset', revision=revision)]
    return [p for p in filter_repo_objects(listed, allow_patterns=allow, ignore_patterns=ignore)
            if not os.path.isfile(os.path.join(folder, *p.split('/')))]


def fetch(repo, revision, allow, ignore):
    """{folder, missing, note}: the snapshot in the hub cache (downloaded unless offline) and the files it lacks.

    folder is None when nothing of the repository is cached and the Hub cannot be reached; missing is None when the
    repository's file list is unknown.
    """
    try:
        folder = snapshot_download(repo, repo_type='dataset', revision=revision, allow_patterns=allow,
                                   ignore_patterns=ignore)
        return {'folder': folder, 'missing': [], 'note': None}
    except IncompleteSnapshotError as exc:
        return {'folder': exc.snapshot_path, 'note': str(exc),
                'missing': missing_from_snapshot(repo, revision, exc.snapshot_path, allow, ignore)}
    except GatedRepoError as exc:
        raise UserError(f'{repo} is gated: accept its conditions on https://huggingface.co/datasets/{repo} and log '
                        f'in (hf auth login) ({exc})') from exc
    except RevisionNotFoundError as exc:
        raise UserError(f'{repo} has no revision {revision!r}; pass an existing --revision ({exc})') from exc
    except RepositoryNotFoundError as exc:
        raise UserError(f'{repo}: no such dataset repository, or it is private and you are not logged in '
                        f'(hf auth login) ({exc})') from exc
    except (LocalEntryNotFoundError, HfHubHTTPError) as exc:
        return {'folder': None, 'missing': None, 'note': str(exc).splitlines()[0]}


def archive_stem(name):
    """The name of an archive without its archive suffix, or None for a file that is not an archive."""
    for suffix in ARCHIVES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return None


def safe_members(archive):
    """(member name, is_dir) of an archive, refusing absolute paths, '..', links and devices (no path traversal)."""
    if archive.endswith('.zip'):
        with zipfile.ZipFile(archive) as zf:
            # The upper 16 bits of external_attr are the Unix mode; 0o120000 marks a symbolic link.
            members = [(i.filename, i.is_dir(), (i.external_attr >> 16) & 0o170000 == 0o120000) for i in zf.infolist()]
    else:
        with tarfile.open(archive) as tf:
            members = [(m.name, m.isdir(), not (m.isfile() or m.isdir())) for m in tf.getmembers()]
    for name, _, special in members:
        parts = name.replace('\\', '/').split('/')
        if special or name.startswith(('/', '\\')) or ':' in parts[0] or '..' in parts:
            raise UserError(f'{archive}: member {name!r} is a link or points outside the archive folder; not '
                            'unpacking it (re-download the archive or unpack it by hand)')
    return [(name, is_dir) for name, is_dir, _ in members]


def extract_all(archive, dest):
    """Extract every member of a checked archive under dest, with a progress bar."""
    if archive.endswith('.zip'):
        with zipfile.ZipFile(archive) as zf:
            for info in tqdm(zf.infolist(), desc=f'unpack {os.path.basename(archive)}', unit='file'):
                zf.extract(info, dest)
    else:
        with tarfile.open(archive) as tf:
            for member in tqdm(tf.getmembers(), desc=f'unpack {os.path.basename(archive)}', unit='file'):
                # The 'data' filter (the standard library's safe extraction) is a second guard after safe_members.
                tf.extract(member, dest, filter='data')


def move_tree(src, dest):
    """Move the files under src into dest, merging with folders already there, then remove src."""
    for folder, _, files in os.walk(src):
        target = os.path.join(dest, os.path.relpath(folder, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            os.replace(os.path.join(folder, name), os.path.join(target, name))
    shutil.rmtree(src)


def unpack(archive, parent):
    """Unpack an archive into parent/<its stem>/ (or into parent when it holds only that folder), once.

    It is extracted into a temporary folder and moved into place; a marker holding the cached blob's path records a
    finished unpack, so a rerun skips it and an interrupted one starts again.
    """
    name, stem = os.path.basename(archive), archive_stem(os.path.basename(archive))
    marker = os.path.join(parent, f'.{name}.unpacked')
    blob = os.path.realpath(archive)   # the cached blob: another download, another name
    if os.path.isfile(marker):
        with open(marker, encoding='utf-8') as f:
            if f.read() == blob:
                return
    tmp = os.path.join(parent, f'.{name}.partial')
    try:
        members = safe_members(archive)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        extract_all(archive, tmp)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise UserError(f'{archive} ({os.path.realpath(archive)}): not a readable archive ({exc}); delete that '
                        'cached file and run again to download it anew') from exc
    tops = {m.replace('\\', '/').split('/')[0] for m, _ in members}
    move_tree(tmp, parent if tops == {stem} else os.path.join(parent, stem))
    with open(marker, 'w', encoding='utf-8') as f:
        f.write(blob)


def link(src, dest):
    """Make dest a symlink to src (a copy where symlinks are impossible); a regular file already at dest stays."""
    if os.path.islink(dest):
        if os.readlink(dest) == src:
            return
        os.remove(dest)
    elif os.path.exists(dest):
        return
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        os.symlink(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def arrange(folder, out, allow, ignore):
    """Link the snapshot's files into out at their paths and unpack its archives there; returns the files seen."""
    files = []
    for base, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        files += [os.path.relpath(os.path.join(base, n), folder).replace(os.sep, '/') for n in names
                  if not n.startswith('.')]
    files = list(filter_repo_objects(sorted(files), allow_patterns=allow, ignore_patterns=ignore))
    for path in files:
        src, dest = os.path.abspath(os.path.join(folder, *path.split('/'))), os.path.join(out, *path.split('/'))
        if archive_stem(os.path.basename(path)) is not None:
            unpack(src, os.path.dirname(dest))
        else:
            link(src, dest)
    return files


def split_stems(out, split):
    """(dialogue file or None, dialogues, turns, turns with a gold response, media stems) of a split under out."""
    try:
        path = annotation_path(out, split)
    except UserError:
        return None, 0, 0, 0, []
    dialogues = read_dialogues(path, require_gold=split != 'test')
    pairs = list(iter_pairs(dialogues, split))
    stems = list(dict.fromkeys(s for p in pairs for s in (p.speaker_stem, p.response_stem)))
    return path, len(dialogues), len(pairs), sum(p.has_gold_response for p in pairs), stems


def link_stray_media(out, split, stems):
    """When the reader finds none of a split's media, link the folder holding most of them where it looks."""
    index = MediaIndex(out, split)
    if not stems or any(index.has(s) for s in stems):
        return
    wanted_stems, best = set(stems), (0, None, None)
    for folder, dirs, names in os.walk(out):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        for kind, suffixes in (('frames', FRAME_SUFFIXES), ('videos', (VIDEO_SUFFIX,))):
            hits = sum(os.path.splitext(n)[1] in suffixes and os.path.splitext(n)[0] in wanted_stems for n in names)
            if hits > best[0]:
                best = (hits, folder, kind)
    hits, folder, kind = best
    if folder is None:
        return
    target = os.path.join(out, LINK_TARGETS[split][kind])
    if not os.path.lexists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.path.abspath(folder), target, target_is_directory=True)
        print(f'{split}: linked {target} -> {folder} ({hits} of {len(stems)} media files)')


def check(out):
    """Per split: the dialogue file, counts, and the stems whose media are missing."""
    report = {}
    for split in CHECKED_SPLITS:
        path, dialogues, turns, gold, stems = split_stems(out, split)
        link_stray_media(out, split, stems)
        index = MediaIndex(out, split)
        report[split] = {'json': path, 'dialogues': dialogues, 'turns': turns, 'turns_with_gold_response': gold,
                         'media_needed': len(stems), 'media_found': sum(index.has(s) for s in stems),
                         'frames_found': sum(s in index.frames for s in stems),
                         'videos_found': sum(s in index.videos for s in stems),
                         'missing': [s for s in stems if not index.has(s)]}
    return report


def print_report(report, out):
    """One paragraph per split."""
    for split, r in report.items():
        if r['json'] is None:
            print(f'{split}: no dialogue file under {out}')
            continue
        print(f"{split}: {os.path.relpath(r['json'], out)}: {r['dialogues']} dialogues, {r['turns']} turns "
              f"({r['turns_with_gold_response']} with a gold response); media {r['media_found']} of "
              f"{r['media_needed']} found ({r['frames_found']} frames, {r['videos_found']} videos)")
        if r['missing']:
            more = f", ... ({len(r['missing']) - SHOWN} more)" if len(r['missing']) > SHOWN else ''
            print(f"  {len(r['missing'])} missing: {', '.join(r['missing'][:SHOWN])}{more} "
                  f"(all in {os.path.join(out, CHECK_FILE)})")


def hints(fetched, report, frames, revisions):
    """The `hf download` commands that fetch what is missing."""
    commands = []
    for repo, allow, ignore in wanted(frames):
        state, revision = fetched[repo], revisions[repo]
        if state['folder'] is None or state['missing'] is None or len(state['missing']) > SHOWN:
            commands.append(hf_command(repo, revision, include=allow, exclude=ignore))
        elif state['missing']:
            commands.append(hf_command(repo, revision, files=state['missing']))
    if not commands:   # the snapshots look whole, yet files are missing: name the ones the reader needs
        release = revisions[RELEASE_REPO]
        if report['train']['json'] is None:
            commands.append(hf_command(RELEASE_REPO, release, files=['train.json']))
        if report['test']['json'] is None or report['test']['missing']:
            commands.append(hf_command(RELEASE_REPO, release, include=['test*'], exclude=AUDIO))
        if report['train']['missing']:
            commands.append(hf_command(FRAMES_REPO, revisions[FRAMES_REPO]) if frames else
                            hf_command(RELEASE_REPO, release, exclude=AUDIO))
    return list(dict.fromkeys(commands))


def get(out, frames=False, revision=None, frames_revision=None):
    """Fetch, arrange and check AvaMERG under out; returns the exit code (0 complete, 2 otherwise)."""
    os.makedirs(out, exist_ok=True)
    fetched, revisions = {}, {RELEASE_REPO: revision, FRAMES_REPO: frames_revision}
    for repo, allow, ignore in wanted(frames):
        fetched[repo] = state = fetch(repo, revisions[repo], allow, ignore)
        if state['note']:
            print(f'{repo}: {state["note"]}')
        if state['folder'] is not None:
            files = arrange(state['folder'], out, allow, ignore)
            print(f'{repo}: {len(files)} files from {state["folder"]}')
    from libs.io import atomic_write_json   # imports torch, which nothing else here needs
    report = check(out)
    atomic_write_json(os.path.join(out, CHECK_FILE), report)
    print_report(report, out)
    fetched_all = all(s['folder'] is not None and s['missing'] == [] for s in fetched.values())
    if fetched_all and all(r['json'] is not None and not r['missing'] for r in report.values()):
        print(f'complete: {out}')
        return 0
    if fetched_all and not constants.HF_HUB_OFFLINE:
        print('not complete, although every file of the repositories is downloaded: the release itself lacks the '
              'files above (the reader skips the pairs whose faces are missing)')
        return 2
    where = (f'offline (HF_HUB_OFFLINE): run these where the Hub is reachable, into the hub cache '
             f'{constants.HF_HUB_CACHE} (or copy that cache here)' if constants.HF_HUB_OFFLINE else
             'not complete; these fetch what is missing')
    again = f'python scripts/get_avamerg.py --out {out}' + (' --frames' if frames else '')
    print(f'{where}, then run {again} again:', *(f'  {c}' for c in hints(fetched, report, frames, revisions)),
          sep='\n')
    return 2


FLAGS = flags.FLAGS


def define_flags():
    """The command line (defined only when run as a script)."""
    flags.DEFINE_string('out', None, 'folder to arrange the dataset in (created if needed)', required=True)
    flags.DEFINE_bool('frames', False, f'the frames of {FRAMES_REPO} instead of the release videos (test videos '
                      'still fetched)')
    flags.DEFINE_string('revision', None, f'branch, tag or commit of {RELEASE_REPO} (default main)')
    flags.DEFINE_string('frames_revision', None, f'the same for {FRAMES_REPO}')


def main(argv):
    """Run get(); returns the exit code (2 when something is still missing)."""
    del argv
    return get(os.path.abspath(FLAGS.out), FLAGS.frames, FLAGS.revision, FLAGS.frames_revision)


if __name__ == '__main__':
    define_flags()
    cli.run(main)
