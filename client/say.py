"""say: stream speech from the Triton ``tts`` model into a WAV file, and manage voices.

    python client/say.py "Hello there." -o out.wav [--voice ID | --reference-audio A.wav --reference-text T]
    python client/say.py voices add ID --reference-audio A.wav --reference-text "Transcript."
    python client/say.py voices list
    python client/say.py voices delete ID
    python client/say.py "Hello there." -o out.wav --url host1:8001,host2:8001     # a fleet of replicas

Prints the time to first audio and the real-time factor. Exit status: 0 done, 1 the server refused
or failed (its message names the field), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fish_s2.client import DEFAULT_URL, TTSClient, read_audio
from fish_s2.request import RequestError
from fish_s2.serving.protocol import SAMPLE_FORMATS

URL_HELP = ("Triton gRPC address; several comma-separated for a fleet (the same voice goes to the same replica, "
            "and a request refused before any audio is retried on another)")


def _say_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="say", description="text to speech through Triton (see also: say voices)")
    ap.add_argument("text")
    ap.add_argument("-o", "--output", required=True, help="WAV file to write")
    voice = ap.add_mutually_exclusive_group()
    voice.add_argument("--voice", help="a registered voice id")
    voice.add_argument("--reference-audio", help="reference recording for a one-off voice")
    ap.add_argument("--reference-text", help="transcript of --reference-audio")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--max-frames", type=int)
    ap.add_argument("--format", choices=SAMPLE_FORMATS, default="float32", help="sample format on the wire")
    ap.add_argument("--url", default=DEFAULT_URL, help=URL_HELP)
    return ap


def _voices_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="say voices", description="register, list and delete voices")
    ap.add_argument("--url", default=DEFAULT_URL, help=URL_HELP)
    ap.add_argument("--admin-key-file", help="the server's admin key (register, delete); default: $FISH_S2_ADMIN_KEY")
    sub = ap.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add")
    add.add_argument("voice_id")
    add.add_argument("--reference-audio", required=True)
    add.add_argument("--reference-text", required=True)
    sub.add_parser("list")
    sub.add_parser("delete").add_argument("voice_id")
    return ap


def _say(args: argparse.Namespace, client: TTSClient) -> None:
    if (args.reference_audio is None) != (args.reference_text is None):
        raise ValueError("--reference-audio and --reference-text: give both or neither")
    fields = dict(voice_id=args.voice, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, max_frames=args.max_frames, sample_format=args.format)
    if args.reference_audio is not None:
        audio, rate = read_audio(args.reference_audio)
        fields.update(reference_audio=audio, reference_sample_rate=rate, reference_text=args.reference_text)
    result = client.synthesize(args.text, **fields)
    result.write_wav(args.output)
    print(f"time to first audio: {result.time_to_first_audio * 1000:.0f} ms")
    print(f"RTF: {result.rtf:.3f} ({result.duration:.2f} s of audio in {result.elapsed:.2f} s)")
    print(f"wrote {args.output} ({result.n_chunks} chunks, {result.sample_rate} Hz, request {result.request_id})")


def _voices(args: argparse.Namespace, client: TTSClient) -> None:
    if args.action == "add":
        audio, rate = read_audio(args.reference_audio)
        print(json.dumps(client.register_voice(args.voice_id, audio, rate, args.reference_text)))
    elif args.action == "list":
        for voice in client.list_voices():
            print(json.dumps(voice))
    else:
        print(json.dumps(client.delete_voice(args.voice_id)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    voices = bool(argv) and argv[0] == "voices"
    args = (_voices_parser() if voices else _say_parser()).parse_args(argv[1:] if voices else argv)
    try:
        key = Path(args.admin_key_file).read_text().strip() if getattr(args, "admin_key_file", None) else None
        with TTSClient(args.url, admin_key=key) as client:
            (_voices if voices else _say)(args, client)
    except RequestError as e:   # refused (the message names the field) or failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # the stream was stopped on the server on the way out
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
