"""`fish-s2 synthesize`: a WAV of frames x frame_length samples; one-line errors for bad input."""

import subprocess
import sys

import numpy as np
import soundfile as sf


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fish_s2", *args], capture_output=True, text=True, timeout=300)


def test_synthesize_with_a_reference_voice(tiny_checkpoint, tmp_path):
    ref = tmp_path / "ref.wav"
    t = np.arange(16000 * 2) / 16000
    sf.write(ref, 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32), 16000)  # 16 kHz: gets resampled
    out = tmp_path / "out.wav"
    proc = _run("synthesize", "--checkpoint", str(tiny_checkpoint), "--text", "Hello [laugh] world.",
                "--reference-audio", str(ref), "--reference-text", "A reference.", "-o", str(out),
                "--max-frames", "12", "--quiet")
    assert proc.returncode == 0, proc.stderr
    audio, rate = sf.read(out)
    assert rate == 44100
    frames = int(proc.stdout.split("wrote")[1].split(":")[1].split("frames")[0])
    assert 1 <= frames <= 11 and len(audio) == frames * 2048


def test_synthesize_a_dialogue_with_two_reference_voices(tiny_checkpoint, tmp_path):
    refs = []
    for i, hz in enumerate((180, 300)):
        refs.append(tmp_path / f"ref{i}.wav")
        sf.write(refs[-1], 0.3 * np.sin(2 * np.pi * hz * np.arange(22050) / 22050).astype(np.float32), 22050)
    out = tmp_path / "dialogue.wav"
    text = "<|speaker:0|>" + "Good morning to you. " * 4 + "<|speaker:1|>" + "And to you as well. " * 4
    proc = _run("synthesize", "--checkpoint", str(tiny_checkpoint), "--text", text, "--chunk-length", "100",
                "--reference-audio", str(refs[0]), "--reference-text", "First voice.",
                "--reference-audio", str(refs[1]), "--reference-text", "Second voice.",
                "-o", str(out), "--max-frames", "6", "--quiet")
    assert proc.returncode == 0, proc.stderr
    frames = int(proc.stdout.split("wrote")[1].split(":")[1].split("frames")[0])
    assert 2 <= frames <= 10 and sf.read(out)[0].size == frames * 2048    # two batches of at most 5 codes each
    mismatch = _run("synthesize", "--checkpoint", str(tiny_checkpoint), "--text", text,
                    "--reference-audio", str(refs[0]), "--reference-text", "a", "--reference-audio", str(refs[1]),
                    "-o", str(out))
    assert "one transcript per recording" in _error(mismatch)


def _error(proc):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_empty_text_is_a_one_line_error(tiny_checkpoint, tmp_path):
    assert "--text" in _error(_run("synthesize", "--checkpoint", str(tiny_checkpoint), "--text", "  ",
                                   "-o", str(tmp_path / "x.wav")))


def test_unreadable_audio_is_a_one_line_error(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    assert "reference audio" in _error(_run("synthesize", "--checkpoint", str(tiny_checkpoint), "--text", "Hi.",
                                            "--reference-audio", str(bad), "--reference-text", "t",
                                            "-o", str(tmp_path / "x.wav")))


def test_wrong_checkpoint_directory_is_a_one_line_error(tmp_path):
    assert "checkpoint" in _error(_run("synthesize", "--checkpoint", str(tmp_path), "--text", "Hi.",
                                       "-o", str(tmp_path / "x.wav")))
    assert "--checkpoint" in _error(_run("synthesize", "--checkpoint", str(tmp_path / "missing"), "--text", "Hi.",
                                         "-o", str(tmp_path / "x.wav")))
