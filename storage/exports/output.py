"""An export's files appear whole or not at all.

Everything is written under a hidden sibling of the final directory
(``.NAME.partial-XXXX``); on success every file and directory is fsynced, each file hashed
(SHA-256 of the bytes on disk), and the temporary directory renamed to the final name in one
``rename(2)``, then the parent directory fsynced. A failure removes the temporary directory;
a killed process leaves only the ``.partial`` name, never a file under the final one.

``open_file`` is how files are opened for writing; a test passes one whose files fail part
way to show that nothing is left under the final name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from storage.exports.errors import OutputExists

log = logging.getLogger(__name__)

HASH_BLOCK = 1 << 20

OpenFile = Callable[[Path], BinaryIO]


def open_for_writing(path: Path) -> BinaryIO:
    return open(path, "xb")


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """One file of a finished export: its path relative to the export's directory."""

    path: str
    sha256: str
    bytes: int
    rows: int

    def as_json(self) -> dict[str, object]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes, "rows": self.rows}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


class OutputDir:
    def __init__(self, final: Path, *, open_file: OpenFile = open_for_writing) -> None:
        self.final = final
        if final.exists() and (not final.is_dir() or any(final.iterdir())):
            raise OutputExists(f"{final} exists and is not an empty directory")
        final.parent.mkdir(parents=True, exist_ok=True)
        self.temp = final.parent / f".{final.name}.partial-{secrets.token_hex(4)}"
        self.temp.mkdir()
        self._open_file = open_file
        self._rows: dict[str, int] = {}

    def path(self, relative: str) -> Path:
        """Where ``relative`` is written for now (for libraries that want a path)."""
        target = self.temp / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        self._rows.setdefault(relative, 0)
        return target

    def open(self, relative: str) -> BinaryIO:
        return self._open_file(self.path(relative))

    def count(self, relative: str, rows: int) -> None:
        self._rows[relative] = self._rows.get(relative, 0) + rows

    def commit(self) -> list[WrittenFile]:
        """Make the files durable and give the directory its final name."""
        written: list[WrittenFile] = []
        dirs: set[Path] = {self.temp}
        for relative in sorted(self._rows):
            p = self.temp / relative
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            size = p.stat().st_size
            written.append(WrittenFile(relative, _sha256(p), size, self._rows[relative]))
            dirs.update(q for q in p.parents if q.is_relative_to(self.temp))
        for d in sorted(dirs, key=lambda q: len(q.parts), reverse=True):
            _fsync_dir(d)
        # rename(2) replaces an empty directory: the final name exists whole or not at all.
        os.rename(self.temp, self.final)
        _fsync_dir(self.final.parent)
        log.info("export written dir=%s files=%d", self.final, len(written))
        return written

    def abort(self) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)
