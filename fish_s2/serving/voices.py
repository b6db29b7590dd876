"""Registered voices on disk (one folder per voice id: reference codes and transcript).

``<root>/<voice_id>/codes.npy`` (int32 [num_codebooks, T], read back with ``allow_pickle=False``)
and ``voice.json`` (transcript and sizes). A voice appears and disappears with one ``rename``, so
concurrent readers see it whole or not at all, and two registrations of one id cannot both win.
Ids are checked against :data:`~fish_s2.serving.protocol.VOICE_ID` before any path is built, and
the resulting path is checked to sit directly in the root.

Several servers may share the folder (a ReadWriteMany volume): nothing is cached in memory, every
:meth:`VoiceRegistry.get` reads the disk, so a voice registered on one server is found by the others
on first use, and one deleted is gone for all once the delete returns. Files are written and synced
in a private ``.tmp-*`` folder before the rename; a read opens the voice's folder once and reads
both files through it, so a delete and re-register of the same id between the two reads can never
mix two voices (the reader then sees the old voice whole, or NOT_FOUND).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..prompt import Reference
from ..request import AlreadyExists, InvalidArgument, NotFound
from .protocol import check_voice_id

CODES_FILE, META_FILE = "codes.npy", "voice.json"


@dataclass(frozen=True)
class Voice:
    voice_id: str
    text: str
    codes: np.ndarray     # int [num_codebooks, T]

    def info(self) -> dict:
        return {"voice_id": self.voice_id, "text": self.text, "frames": int(self.codes.shape[1])}

    def reference(self) -> Reference:
        return Reference(self.text, torch.from_numpy(self.codes.astype(np.int64)))


class VoiceRegistry:
    def __init__(self, root: str | Path, num_codebooks: int):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.num_codebooks = num_codebooks

    def _path(self, voice_id: str) -> Path:
        path = self.root / check_voice_id(voice_id)
        if path.parent != self.root:  # cannot happen with the pattern; kept as the last line of defence
            raise InvalidArgument("voice_id", f"{voice_id!r} leaves the voices folder")
        return path

    def add(self, voice_id: str, text: str, codes: np.ndarray) -> Voice:
        path = self._path(voice_id)
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks or codes.shape[1] == 0:
            raise InvalidArgument("reference_audio", f"encoded to codes of shape {list(codes.shape)}, expected "
                                                     f"[{self.num_codebooks}, T > 0]")
        if path.exists():
            raise AlreadyExists("voice_id", f"{voice_id!r} is already registered; delete it first")
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            buf = io.BytesIO()
            np.save(buf, codes.astype(np.int32), allow_pickle=False)
            _write_synced(tmp / CODES_FILE, buf.getvalue())
            _write_synced(tmp / META_FILE, json.dumps({"text": text, "frames": int(codes.shape[1]),
                                                       "num_codebooks": self.num_codebooks}).encode())
            os.rename(tmp, path)   # fails if another registration of this id won the race
            _sync_dir(self.root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST) or path.exists():   # the id was taken at the rename
                raise AlreadyExists("voice_id", f"{voice_id!r} is already registered; delete it first") from None
            raise
        return Voice(voice_id, text, codes.astype(np.int32))   # not re-read: a concurrent delete may already have won

    def get(self, voice_id: str) -> Voice:
        path = self._path(voice_id)
        try:
            folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:   # both files through one folder handle: one version of the voice, even if renamed meanwhile
                meta = json.loads(_read_at(folder, META_FILE))
                codes = np.load(io.BytesIO(_read_at(folder, CODES_FILE)), allow_pickle=False)
            finally:
                os.close(folder)
        except OSError as e:   # missing, being deleted, not a voice folder, or a stale NFS handle
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
                raise NotFound("voice_id", f"unknown voice {voice_id!r}") from None
            raise
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks or codes.dtype.kind != "i":
            raise ValueError(f"voice {voice_id!r}: stored codes have shape {list(codes.shape)} "
                             f"({codes.dtype}), expected int [{self.num_codebooks}, T]")
        return Voice(voice_id, meta["text"], codes)

    def list(self) -> list[Voice]:
        voices = []
        for entry in sorted(os.listdir(self.root)):
            if entry.startswith("."):   # registrations and deletions in progress
                continue
            try:
                voices.append(self.get(entry))
            except (NotFound, InvalidArgument):   # deleted meanwhile, or not a voice folder
                continue
        return voices

    def delete(self, voice_id: str) -> None:
        path = self._path(voice_id)
        trash = self.root / f".del-{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            raise NotFound("voice_id", f"unknown voice {voice_id!r}") from None
        shutil.rmtree(trash, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems cannot sync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_at(folder: int, name: str) -> bytes:
    with open(name, "rb", opener=lambda p, flags: os.open(p, flags, dir_fd=folder)) as f:
        return f.read()
