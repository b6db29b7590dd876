"""say: stream speech from the Triton ``tts`` model into a WAV file, and manage voices.

    python client/say.py "Hello there." -o out.wav [--voice ID | --reference-audio A.wav --reference-text T]
    python client/say.py "<|speaker:0|>Hi! <|speaker:1|>Hello." -o out.wav --voice alice --voice bob
    some-llm --stream | python client/say.py --stream-text -o reply.wav --voice alice
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
    ap.add_argument("text", nargs="?", help="the text (omit with --stream-text)")
    ap.add_argument("--stream-text", action="store_true",
                    help="read the text from stdin as it arrives and speak it sentence by sentence as one stream")
    ap.add_argument("--idle-flush", type=float, default=0.8,
                    help="--stream-text: speak what has arrived after this many seconds without more text")
    ap.add_argument("-o", "--output", required=True, help="WAV file to write")
    voice = ap.add_mutually_exclusive_group()
    voice.add_argument("--voice", action="append", help="a registered voice id; repeat for a dialogue: the i-th "
                                                        "speaks the text's <|speaker:i|> turns")
    voice.add_argument("--reference-audio", help="reference recording for a one-off voice")
    ap.add_argument("--reference-text", help="transcript of --reference-audio")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--max-frames", type=int, help="frame limit per speaker-turn batch")
    ap.add_argument("--chunk-length", type=int, help="UTF-8 bytes of speaker turns per batch (server default 200)")
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
                  seed=args.seed, max_frames=args.max_frames, sample_format=args.format, chunk_length=args.chunk_length)
    if args.reference_audio is not None:
        audio, rate = read_audio(args.reference_audio)
        fields.update(reference_audio=audio, reference_sample_rate=rate, reference_text=args.reference_text)
    if args.stream_text == (args.text is not None):
        raise ValueError("give the text, or --stream-text to read it from stdin (not both)")
    result = _stream_text(args, fields) if args.stream_text else client.synthesize(args.text, **fields)
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


def _stream_text(args: argparse.Namespace, fields: dict):
    """stdin, as it arrives, through a TextSession: one stream, sentence by sentence."""
    import asyncio
    import codecs

    from fish_s2.client import AsyncTTSClient, _Collector
    from fish_s2.text_session import TextSession

    async def run():
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        collector = _Collector()
        async with AsyncTTSClient(args.url) as aclient:
            session = TextSession(aclient, **{k: v for k, v in fields.items() if v is not None})

            async def feed():
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")   # a character split by a read
                while True:
                    try:
                        data = await asyncio.wait_for(reader.read(256), args.idle_flush)
                    except asyncio.TimeoutError:
                        await session.flush()
                        continue
                    if not data:
                        break
                    await session.send_text(decoder.decode(data))
                await session.end()

            feeder = asyncio.create_task(feed())
            async for chunk in session.chunks():
                collector.add(chunk)
            await feeder
        return collector.result(fields.get("sample_format"))

    return asyncio.run(run())


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
