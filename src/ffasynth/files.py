"""Writing outputs safely, in one place.

Atomic writes: a reader (or a run killed mid-write) never sees a half-written file or folder, and a
write that fails (disk full, no permission, a file where a folder should be) leaves nothing behind
and raises OutputError, one line naming the path and what to do.

Output checks, run by a verb before any work: an output folder that cannot be one (a file, below a
file, not writable) or whose outputs could land on an input is refused in one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ffasynth.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    for folder in (path, *path.absolute().parents):
        if folder.exists():
            return folder
    return Path.cwd()


def _file_above(path: Path) -> Path | None:
    """The nearest ancestor of `path` that exists as something other than a folder, if any."""
    return next((p for p in path.absolute().parents if p.exists() and not p.is_dir()), None)


def write_error(path: str | os.PathLike, error: OSError, what: str | None = None) -> OutputError:
    """A failed write of `path` (or of `what`) as one line that says what to do; the errno is kept."""
    if isinstance(error, OutputError):
        return error
    path = Path(path)
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(_nearest_existing(path.parent)).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        why = f"the disk is full ({free}); free space or write elsewhere"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"no permission to write in {_nearest_existing(path.parent)}; choose a folder you may write to"
    elif code in (errno.ENOTDIR, errno.EEXIST) and (blocker := _file_above(path)) is not None:
        why = f"{blocker} is a file, not a folder"
    elif code == errno.EISDIR:
        why = "a folder of that name is in the way"
    else:
        why = (error.strerror or str(error)).splitlines()[0] if str(error) else type(error).__name__
    return OutputError(f"cannot write {what or path}: {why}", code, error.strerror)


def as_os_error(error: BaseException) -> BaseException:
    """safetensors' writer reports a failed write (a full disk) as a SafetensorError whose message holds the
    OS error ("Os { code: 28, ... }" or "(os error 28)"): that OSError, so write_error can say it in one line;
    any other error as it is."""
    found = re.search(r"Os \{ code: (\d+)|os error (\d+)", str(error))
    if type(error).__name__ != "SafetensorError" or found is None:
        return error
    code = int(found[1] or found[2])
    return OSError(code, os.strerror(code))


def _fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then each folder (deepest first): its contents are on disk before a
    rename makes them visible, and before anything older is deleted in their favour."""
    folders = [folder]
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        folders += [Path(root) / name for name in dirs]
    for each in reversed(folders):
        _fsync_folder(each)


def _fsync_folder(folder: Path) -> None:
    """fsync a folder's entries (a rename into it survives a power cut); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder: nothing more to be done there
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], what: str | None = None) -> Path:
    """Call write(tmp_path) for a temporary file beside `path`, fsync it, rename it onto `path`, fsync the
    folder (the rename itself then survives a power cut). A failed write is one OutputError naming `what`
    (default: the path)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        tmp = Path(tmp_name)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(failed := as_os_error(error), OSError):
            raise write_error(path, failed, what) from error
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_folder(path: str | os.PathLike, fill: Callable[[Path], object]) -> Path:
    """Fill a temporary folder beside `path`, then rename it to `path` (replacing an old folder, which
    is put back if the rename fails). Temporary folders start with '.' and end in '.tmp', so a reader
    can skip what a kill left. A file at `path` is never replaced."""
    path = Path(path)
    if path.is_symlink() and path.is_dir():  # a link to a folder elsewhere (a larger disk): write there, keep the link
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write {path}: it is a file, not a folder", errno.EEXIST)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        fill(tmp)
        _fsync_tree(tmp)  # the contents on disk before the rename shows them (and before callers prune older ones)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if path.exists():
            old = path.with_name(f".{path.name}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OutputError) and tmp is not None:  # name the folder asked for, not its gone temporary
            raise OutputError(str(error).replace(str(tmp), str(path)), error.errno, error.strerror) from error
        if isinstance(failed := as_os_error(error), OSError):
            raise write_error(path, failed) from error
        raise
    return path


@contextlib.contextmanager
def removed_if_left_empty(folder: str | os.PathLike) -> Iterator[Path]:
    """On an exception inside the block, remove the folders it created on the way to `folder` that it
    left empty: a run that wrote nothing leaves no trace."""
    folder = Path(folder).absolute()
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        yield Path(folder)
    except BaseException:
        for created in missing:  # deepest first
            with contextlib.suppress(OSError):
                created.rmdir()  # only an empty folder goes
        raise


def _probe(folder: Path, what: str) -> None:
    """Create and remove a file in the nearest existing folder of `folder`: is writing allowed there?"""
    existing = _nearest_existing(folder)
    try:
        handle, name = tempfile.mkstemp(prefix=".ffasynth-probe.", suffix=".tmp", dir=existing)
        os.close(handle)
        os.unlink(name)
    except OSError as error:  # write_error names the folder its path is in: here `folder` itself
        raise write_error(folder / ".ffasynth-probe", error, what) from None


def check_output_folder(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), option: str = "--out", replaces=False
) -> Path:
    """Refuse, in one line naming `option`, an output folder that cannot be one: a file, below a file,
    not writable; or one whose outputs could land on an input: an input folder itself, or the folder an
    input file lies in; with `replaces` (the folder is replaced whole), any folder that holds an input.
    Writes nothing (a probe file is made and removed)."""
    out = Path(out)
    where = f"{option} {out}"
    if out.exists() and not out.is_dir():
        raise OutputError(f"{where} is a file, not a folder; name a new or existing folder", errno.EEXIST)
    blocker = _file_above(out)
    if blocker is not None:
        raise OutputError(f"{where}: {blocker} is a file, not a folder", errno.ENOTDIR)
    target = out.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        folder = source if source.is_dir() else source.parent
        if target == folder:
            kind = "the input folder" if source.is_dir() else "the folder of the input"
            raise OutputError(
                f"{where} is {kind} {given}: outputs would be written among the inputs and could replace "
                "them; choose another folder"
            )
        if replaces and source.is_relative_to(target):
            raise OutputError(f"{where} holds the input {given} and is replaced whole when written; choose another")
    _probe(out, where)
    return out


def check_not_replaced(out: str | os.PathLike, names: Iterable[str], overwrite: bool, option: str = "--out") -> None:
    """Refuse, in one line, a run whose outputs `names` would replace files already in `out` (an earlier run's
    results, or the user's own files of those names) unless `overwrite`."""
    out = Path(out)
    taken = [name for name in names if (out / name).exists()]
    if taken and not overwrite:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise OutputError(
            f"{option} {out} already holds {taken[0]}{more}; pass --overwrite to replace, or another {option}"
        )


def check_output_file(
    path: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    option: str = "--out",
    suffixes: tuple[str, ...] = (),
) -> Path:
    """Refuse, in one line naming `option`, an output file that cannot be one: a folder, below a file,
    not writable, an input itself, or an existing file of another kind than `suffixes` (e.g. `.json`:
    a report never replaces an image or a manifest)."""
    path = Path(path)
    where = f"{option} {path}"
    if path.is_dir():
        raise OutputError(f"{where} is a folder; name a file", errno.EISDIR)
    blocker = _file_above(path)
    if blocker is not None:
        raise OutputError(f"{where}: {blocker} is a file, not a folder", errno.ENOTDIR)
    if any(given is not None and Path(given).exists() and Path(given).resolve() == path.resolve() for given in inputs):
        raise OutputError(f"{where} is an input; name another file")
    if suffixes and path.exists() and path.suffix.lower() not in suffixes:
        raise OutputError(f"{where} exists and is not a {' or '.join(suffixes)} file; it is not replaced")
    _probe(path.parent, where)
    return path
