"""Walking collection roots: a generator of file records, in a stable (sorted) order."""

from __future__ import annotations

import os
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


def walk(root: str | os.PathLike[str], errors: list[tuple[str, str]] | None = None) -> Iterator[FileRecord]:
    """Yield every image file below ``root`` (recursively, symlinked folders followed once, sorted).

    Files are recognised by extension (case-insensitive); what cannot be listed or stat'ed is appended to
    ``errors`` as (relpath, reason) instead of stopping the walk.
    """
    root = Path(os.path.abspath(root))
    seen_dirs: set[tuple[int, int]] = set()

    def visit(folder: Path) -> Iterator[FileRecord]:
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen_dirs:  # symlink loop or a folder reached twice
                return
            seen_dirs.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            if errors is not None:
                errors.append((folder.relative_to(root).as_posix(), f"cannot list folder: {exc.strerror or exc}"))
            return
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=True):
                    yield from visit(Path(entry.path))
                    continue
                if not entry.is_file(follow_symlinks=True):
                    continue
                if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                st = entry.stat(follow_symlinks=True)
            except OSError as exc:
                if errors is not None:
                    rel = Path(entry.path).relative_to(root).as_posix()
                    errors.append((rel, f"cannot read file information: {exc.strerror or exc}"))
                continue
            rel = Path(entry.path).relative_to(root).as_posix()
            yield FileRecord(rel, entry.path, st.st_size, st.st_mtime_ns)

    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    yield from visit(root)
