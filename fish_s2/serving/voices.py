"""Registered voices on disk (one folder per voice id: reference codes and transcript).

``<root>/<voice_id>/codes.npy`` (int32 [num_codebooks, T], read back with ``allow_pickle=False``)
and ``voice.json`` (transcript and sizes). A voice appears and disappears with one ``rename``, so
concurrent readers see it whole or not at all, and two registrations of one id cannot both win.
Ids are checked against :data:`~fish_s2.serving.protocol.VOICE_ID` before any path is built, and
the resulting path is checked to sit directly in the root.
"""

from __future__ import annotations

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
            np.save(tmp / CODES_FILE, codes.astype(np.int32), allow_pickle=False)
            (tmp / META_FILE).write_text(json.dumps({"text": text, "frames": int(codes.shape[1]),
                                                     "num_codebooks": self.num_codebooks}))
            os.rename(tmp, path)   # fails if another registration of this id won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if path.exists():
                raise AlreadyExists("voice_id", f"{voice_id!r} is already registered; delete it first") from None
            raise
        return self.get(voice_id)

    def get(self, voice_id: str) -> Voice:
        path = self._path(voice_id)
        try:
            meta = json.loads((path / META_FILE).read_text())
            codes = np.load(path / CODES_FILE, allow_pickle=False)
        except FileNotFoundError:
            raise NotFound("voice_id", f"unknown voice {voice_id!r}") from None
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
