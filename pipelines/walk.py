"""Walking collection roots: a generator of file records, in a stable (sorted) order."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imgrec.config import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class FileRecord:
    relpath: str  # relative to the root, '/'-separated
    path: str  # absolute
    size: int
    mtime_ns: int


def printable_name(name: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogates) shown as \\xNN."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def _inside(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([root, path]) == root


def walk(root: str | os.PathLike[str], errors: list[tuple[str, str]] | None = None) -> Iterator[FileRecord]:
    """Yield every regular image file below ``root`` (recursively, sorted; symlinked folders followed once).

    Files are recognised by extension (case-insensitive). What is not yielded but looks like an image or a folder is
    appended to ``errors`` as (relpath, reason) instead of stopping the walk: a folder that cannot be listed, a file
    that cannot be stat'ed, a broken symbolic link or a link loop, a FIFO, socket or device named like an image, a
    symbolic link that leads outside the root (never followed: a collection holds only what lies in its folder), and a
    name that is not valid UTF-8 (which the lake's text columns cannot hold). Nothing is ever opened here.
    """
    root = Path(os.path.abspath(root))
    real_root = os.path.realpath(root)
    seen_dirs: set[tuple[int, int]] = set()

    def report(rel: str, why: str) -> None:
        if errors is not None:
            errors.append((printable_name(rel), why))

    def visit(folder: Path, rel_folder: str) -> Iterator[FileRecord]:
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen_dirs:  # symlink loop or a folder reached twice
                return
            seen_dirs.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            report(rel_folder or ".", f"cannot list folder: {exc.strerror or exc}")
            return
        for entry in entries:
            rel = f"{rel_folder}/{entry.name}" if rel_folder else entry.name
            is_image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            try:
                is_link = entry.is_symlink()
                st = entry.stat(follow_symlinks=True)
            except OSError as exc:
                if is_image:
                    if exc.errno == errno.ELOOP:
                        report(rel, "symbolic link loop: the link never reaches a file")
                    elif exc.errno == errno.ENOENT and entry.is_symlink():
                        report(rel, "broken symbolic link: its target does not exist")
                    else:
                        report(rel, f"cannot read file information: {exc.strerror or exc}")
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if not (is_dir or is_image):
                continue
            if printable_name(rel) != rel:
                report(rel, "the name is not valid UTF-8 text: rename the file or folder to include it")
                continue
            if is_link and not _inside(os.path.realpath(entry.path), real_root):
                report(rel, "symbolic link to outside the collection's folder: not followed")
                continue
            if is_dir:
                yield from visit(Path(entry.path), rel)
            elif not stat.S_ISREG(st.st_mode):
                report(rel, "not a regular file (a FIFO, socket or device named like an image); not read")
            else:
                yield FileRecord(rel, entry.path, st.st_size, st.st_mtime_ns)

    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    yield from visit(root, "")


def walk_store(root: str, errors: list[tuple[str, str]] | None = None) -> Iterator[FileRecord]:
    """Every image object below an ``s3://bucket/prefix`` root, sorted by key: relpath, URL, size, and the object's
    LastModified as its modification time (an object is replaced whole: a new upload changes it, and its size or
    time, so the incremental run reads it again). Keys with ``..`` or empty segments are recorded as errors: their
    relpath could not name a file inside the root."""
    from imgrec.storage import open_store

    store = open_store(root)
    for e in sorted(store.list(""), key=lambda e: e.path):
        if os.path.splitext(e.path)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        if any(part in ("", ".", "..") for part in e.path.split("/")):
            if errors is not None:
                errors.append((e.path, "an object key with an empty, '.' or '..' segment: not read"))
            continue
        yield FileRecord(e.path, store.join(e.path), e.size, e.mtime_ns)


def walk_any(root: str | os.PathLike[str], errors: list[tuple[str, str]] | None = None) -> Iterator[FileRecord]:
    """``walk`` for a folder, ``walk_store`` for an ``s3://`` root."""
    if str(root).startswith("s3://"):
        return walk_store(str(root), errors)
    return walk(root, errors)
