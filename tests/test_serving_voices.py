"""The voice registry: persisted without pickle, atomic, and no id reaches outside its folder."""

import json
import os

import numpy as np
import pytest
import torch

from fish_s2.request import AlreadyExists, InvalidArgument, NotFound
from fish_s2.prompt import PromptBuilder, Reference
from fish_s2.serving.voices import CODES_FILE, META_FILE, VoiceRegistry

NC = 10


def _codes(frames=7, seed=0):
    return np.random.default_rng(seed).integers(0, 1024, (NC, frames))


def test_register_list_get_delete_and_persistence(tmp_path):
    reg = VoiceRegistry(tmp_path / "voices", NC)
    voice = reg.add("alice", "A reference sentence.", _codes())
    assert voice.info() == {"voice_id": "alice", "text": "A reference sentence.", "frames": 7}
    reg.add("bob-2", "Other.", _codes(3, 1))
    again = VoiceRegistry(tmp_path / "voices", NC)      # e.g. after a restart
    assert [v.voice_id for v in again.list()] == ["alice", "bob-2"]
    assert np.array_equal(again.get("alice").codes, _codes())
    assert torch.equal(again.get("alice").reference().codes, torch.from_numpy(_codes()).long())
    np.load(tmp_path / "voices" / "alice" / CODES_FILE, allow_pickle=False)   # plain arrays, no pickle
    json.loads((tmp_path / "voices" / "alice" / META_FILE).read_text())
    again.delete("alice")
    assert [v.voice_id for v in reg.list()] == ["bob-2"]
    with pytest.raises(NotFound, match="^voice_id: unknown voice 'alice'"):
        reg.get("alice")
    with pytest.raises(NotFound, match="^voice_id:"):
        reg.delete("alice")


def test_taken_id_is_refused(tmp_path):
    reg = VoiceRegistry(tmp_path, NC)
    reg.add("alice", "One.", _codes())
    with pytest.raises(AlreadyExists, match="^voice_id: 'alice' is already registered"):
        reg.add("alice", "Two.", _codes(5))
    assert reg.get("alice").text == "One."
    assert sorted(os.listdir(tmp_path)) == ["alice"]     # the losing registration left nothing behind


@pytest.mark.parametrize("bad", ["", "../alice", "a/b", "a\\b", "/etc", ".hidden", "-x", "x" * 65, "a b", "é"])
def test_invalid_ids_never_touch_the_filesystem(tmp_path, bad):
    root = tmp_path / "voices"
    reg = VoiceRegistry(root, NC)
    for call in (lambda: reg.add(bad, "t", _codes()), lambda: reg.get(bad), lambda: reg.delete(bad)):
        with pytest.raises(InvalidArgument, match="^voice_id: must match"):
            call()
    assert os.listdir(root) == [] and sorted(os.listdir(tmp_path)) == ["voices"]


def test_bad_codes_and_unfinished_entries(tmp_path):
    reg = VoiceRegistry(tmp_path, NC)
    with pytest.raises(InvalidArgument, match="^reference_audio:"):
        reg.add("alice", "t", np.zeros((NC - 1, 4), np.int64))
    (tmp_path / ".tmp-123").mkdir()                       # a registration in progress
    (tmp_path / "stray").mkdir()                          # not a voice folder
    assert reg.list() == []


def test_prompt_prefix_is_the_voice_system_block(tiny):
    builder = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    ref = Reference("A reference.", torch.from_numpy(_codes()).long())
    prompt, prefix_len = builder.request("Hello there.", [ref])
    system = builder.system([ref])
    assert prefix_len == system.shape[1] < prompt.shape[1]
    assert torch.equal(prompt[:, :prefix_len], system)
    other, _ = builder.request("Different text.", [ref])
    assert torch.equal(other[:, :prefix_len], system)     # same voice, same cacheable prefix


# --- several servers sharing one voices folder ----------------------------------------------------

def test_two_registries_on_one_folder_see_each_other_at_once(tmp_path):
    a, b = VoiceRegistry(tmp_path, NC), VoiceRegistry(tmp_path, NC)    # e.g. two replicas on one volume
    with pytest.raises(NotFound):
        b.get("alice")                                  # a miss first: nothing negative is remembered
    a.add("alice", "From A.", _codes())
    assert b.get("alice").text == "From A." and [v.voice_id for v in b.list()] == ["alice"]
    b.delete("alice")
    with pytest.raises(NotFound):
        a.get("alice")                                  # gone for every replica once the delete returned
    with pytest.raises(NotFound):
        a.delete("alice")


def _hammer(root: str, worker: int, rounds: int) -> int:
    """Register, read and delete one id over and over; every read must be one writer's voice, whole."""
    reg, reads = VoiceRegistry(root, NC), 0
    for j in range(rounds):
        tag = worker * 10_000 + j
        try:
            reg.add("same", f"voice {tag}", np.full((NC, 1 + tag % 13), tag))
        except AlreadyExists:
            pass
        try:
            voice = reg.get("same")
            got = int(voice.text.split()[1])
            assert voice.codes.shape == (NC, 1 + got % 13) and (voice.codes == got).all(), (voice.text, voice.codes)
            reads += 1
        except NotFound:
            pass
        if j % 2:
            try:
                reg.delete("same")
            except NotFound:
                pass
    return reads


def test_concurrent_registers_and_deletes_never_leave_a_half_written_voice(tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    root = str(tmp_path / "voices")
    VoiceRegistry(root, NC)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as procs, \
            ThreadPoolExecutor(4) as threads:
        futures = [procs.submit(_hammer, root, w, 150) for w in (1, 2)] + \
                  [threads.submit(_hammer, root, w, 150) for w in (3, 4, 5, 6)]
        reads = [f.result() for f in futures]
    assert sum(reads) > 0
    assert set(os.listdir(root)) <= {"same"}            # no .tmp-* or .del-* left behind
    reg = VoiceRegistry(root, NC)
    if os.listdir(root):
        voice = reg.get("same")
        assert (voice.codes == int(voice.text.split()[1])).all()
