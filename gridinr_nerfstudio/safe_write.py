"""Writing user files without losing data: the one rule every command that writes a file follows.

- Never over a file the command reads (a run's volume files, dataset.json, config.yml, checkpoints): compared by
  resolved path and by device and inode (hard links, symlinks, `..` all resolve to the same file), refused even
  with `--overwrite`.
- Never over an existing file unless the user says `--overwrite`.
- Written to a hidden temporary file beside the target (`.NAME.XXXXXXXX.partial.SUFFIX`, same file system), then
  renamed into place when complete: a failure, Ctrl-C or `kill` leaves the target as it was and removes the
  temporary file (only SIGKILL, which nothing can catch, can leave one behind; it is never the target). Renaming
  also keeps a file that is still memory-mapped intact: readers keep the old bytes until they close it.
- Outputs of several files (a dataset folder) are all checked before any is written and published last-file-last.

Refusals raise `OutputError`, whose message is one line naming the path; the command line tools print it.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

OVERWRITE_HINT = "use --overwrite to replace it"


class OutputError(ValueError):
    """An output that must not be written (exists, is an input, no room); one line naming the path."""


def _identity(path: Path) -> Optional[tuple[int, int]]:
    """(device, inode) of the file `path` names (symlinks followed), or None when there is none."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return None
    return stat.st_dev, stat.st_ino


def _resolved(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


class ProtectedFiles:
    """Files a command reads and must never write: a run's inputs, identified when they were read."""

    def __init__(self, files: Iterable[tuple[Path, str]] = ()) -> None:
        self._files: list[tuple[Path, Optional[tuple[int, int]], str]] = []
        for path, what in files:
            self.add(path, what)

    def add(self, path: Path, what: str) -> None:
        """Protect `path`, described as `what` ("the run's volume file", ...)."""
        self._files.append((_resolved(path), _identity(path), what))

    def __iter__(self) -> Iterator[Path]:
        return iter(path for path, _, _ in self._files)

    def __len__(self) -> int:
        return len(self._files)

    def which(self, target: Path) -> Optional[str]:
        """What `target` is if it is one of the protected files (same resolved path, or same device and inode)."""
        resolved, identity = _resolved(target), _identity(target)
        for path, known, what in self._files:
            if resolved == path or (identity is not None and identity in (known, _identity(path))):
                return what
        return None

    def __add__(self, other: "ProtectedFiles") -> "ProtectedFiles":
        joined = ProtectedFiles()
        joined._files = self._files + other._files
        return joined


def check_target(path: Path, overwrite: bool = False, protected: Optional[ProtectedFiles] = None) -> None:
    """Raise OutputError (one line) unless `path` may be written as a file."""
    path = Path(path)
    what = protected.which(path) if protected is not None else None
    if what is not None:
        raise OutputError(f"{path}: is {what}; refusing to write over it (not even with --overwrite): "
                          "choose another output")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder (give a file name)")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"{path} exists ({OVERWRITE_HINT})")
    folder = _existing_ancestor(path.parent)
    if not folder.is_dir():
        raise OutputError(f"{path}: cannot write: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write: folder {folder} is not writable")


def check_free_space(path: Path, needed_bytes: int) -> None:
    """Raise OutputError when the file system that would hold `path` has less than `needed_bytes` free."""
    folder = _existing_ancestor(Path(path).parent)
    free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise OutputError(f"{path}: needs {format_bytes(needed_bytes)} on disk, {format_bytes(free)} free in {folder}")


def format_bytes(count: float) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            break
        count /= 1024
    return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"


def _existing_ancestor(folder: Path) -> Path:
    folder = Path(folder) if str(folder) else Path(".")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _umask() -> int:
    """The process's umask (mkstemp and mkdtemp make 0600 files and 0700 folders; outputs get the usual modes)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`, no traceback


@contextmanager
def sigterm_cleans_up() -> Iterator[None]:
    """Within the block, SIGTERM (`kill PID`) unwinds (exit status 143) so temporary files are removed."""
    try:
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def staged_outputs(targets: Sequence[Path], overwrite: bool = False,
                   protected: Optional[ProtectedFiles] = None) -> Iterator[list[Path]]:
    """Temporary paths to write `targets` to; each is renamed onto its target when the block ends without error.

    Every target is checked (`check_target`) before anything is written, missing folders are created (and removed
    again on failure), and targets are published in the order given (put an index file such as dataset.json last).
    Without `overwrite`, publishing refuses a target that appeared in the meantime (hard link, no clobbering).
    """
    targets = [Path(target) for target in targets]
    for target in targets:
        check_target(target, overwrite, protected)
    created: list[Path] = []
    temporaries: list[Path] = []
    published = 0
    try:
        with sigterm_cleans_up():
            for target in targets:
                created += _make_folders(target.parent)
                handle, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".partial{target.suffix}",
                                                dir=target.parent if str(target.parent) else ".")
                os.close(handle)
                os.chmod(name, 0o666 & ~_umask())
                temporaries.append(Path(name))
            yield list(temporaries)
            for temporary in temporaries:
                _flush_to_disk(temporary)
            for target, temporary in zip(targets, temporaries):
                _publish(temporary, target, overwrite, protected)
                published += 1
    finally:
        for temporary in temporaries[published:]:
            temporary.unlink(missing_ok=True)
        if published == 0:
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    pass


@contextmanager
def atomic_output(target: Path, overwrite: bool = False, protected: Optional[ProtectedFiles] = None) -> Iterator[Path]:
    """One file: `with atomic_output(path) as temporary: write(temporary)` (see `staged_outputs`)."""
    with staged_outputs([target], overwrite, protected) as (temporary,):
        yield temporary


def write_text(target: Path, text: str, overwrite: bool = False, protected: Optional[ProtectedFiles] = None) -> Path:
    """`Path.write_text`, under the rule of this module."""
    with atomic_output(target, overwrite, protected) as temporary:
        temporary.write_text(text)
    return Path(target)


@contextmanager
def staged_folder(target: Path, pattern: str, overwrite: bool = False,
                  protected: Optional[ProtectedFiles] = None) -> Iterator[Path]:
    """A temporary folder to fill with files named like `pattern` (e.g. "frame_*.png"), moved into `target` when
    the block ends without error.

    A new target is the temporary folder renamed. An existing one holding files that match `pattern` is refused
    unless `overwrite`; then its matching files are replaced by the new ones (those the new set lacks are removed,
    so no frame of an older, longer render stays behind). Other files in it are never touched.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder")
    existing = sorted(target.glob(pattern)) if target.is_dir() else []
    if existing and not overwrite:
        raise OutputError(f"{target} holds {len(existing)} {pattern} file(s) (use --overwrite to replace them)")
    for path in existing:
        check_target(path, overwrite=True, protected=protected)
    created = _make_folders(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    done = False
    try:
        with sigterm_cleans_up():
            yield staging
            if target.exists():
                new = {path.name for path in staging.iterdir()}
                for path in sorted(staging.iterdir()):
                    os.replace(path, target / path.name)
                for path in existing:
                    if path.name not in new:
                        path.unlink(missing_ok=True)
            else:
                os.chmod(staging, 0o777 & ~_umask())
                staging.rename(target)
            done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # (gone already when it became the target)
        if not done:
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    pass


def _make_folders(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it created, outermost first."""
    missing = []
    folder = Path(folder) if str(folder) else Path(".")
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    for path in missing:
        path.mkdir(exist_ok=True)
    return missing


def _flush_to_disk(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _publish(temporary: Path, target: Path, overwrite: bool, protected: Optional[ProtectedFiles]) -> None:
    if protected is not None and protected.which(target) is not None:
        check_target(target, overwrite, protected)  # raises: an input appeared at the target meanwhile
    if overwrite:
        os.replace(temporary, target)
        return
    try:
        os.link(temporary, target)  # fails if the target exists: never clobbers a file made meanwhile
    except FileExistsError:
        raise OutputError(f"{target} exists ({OVERWRITE_HINT})") from None
    except OSError:  # a file system without hard links
        if target.exists() or target.is_symlink():
            raise OutputError(f"{target} exists ({OVERWRITE_HINT})") from None
        os.replace(temporary, target)
        return
    temporary.unlink()
