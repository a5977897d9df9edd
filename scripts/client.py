"""Streams one completion (or chat reply) from a MeshServe server to the terminal as the tokens arrive.

python scripts/client.py "The capital of France is"
python scripts/client.py --chat "Write a haiku about the sea." --temperature 0.7 --seed 1
python scripts/client.py --chat --system "Answer in French." "What is 2 + 2?" --max_tokens 32

Prints usage and timings at the end; an RPC error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import os
import sys
import time

# Run as a plain script, Python puts scripts/ on the path, not the repository root that holds the packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc
from absl import app, flags

from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc

_TARGET = flags.DEFINE_string("target", "127.0.0.1:50051", "Server address host:port.")
_CHAT = flags.DEFINE_bool("chat", False, "Send the prompt as a user message, rendered with the chat template.")
_SYSTEM = flags.DEFINE_string("system", None, "With --chat: a system message before the user message.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Most tokens to generate (default: the server's).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 is greedy (default).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens (0 disables).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass in (0, 1].")
_MIN_P = flags.DEFINE_float("min_p", None, "Drop tokens below min_p x the most likely one's probability.")
_SEED = flags.DEFINE_integer("seed", None, "Random seed for reproducible sampling.")
_STOP = flags.DEFINE_multi_string("stop", [], "A stop string (repeatable).")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "Keep generating through EOS.")
_PRIORITY = flags.DEFINE_integer("priority", 0, "Lower runs first when requests wait for a slot.")
_TIMEOUT = flags.DEFINE_float("timeout", 300.0, "Deadline of the whole request in seconds.")


def build_request(prompt: str) -> pb.GenerateRequest:
    """The GenerateRequest the flags describe."""
    sampling = pb.SamplingOptions(stop=_STOP.value, ignore_eos=_IGNORE_EOS.value)
    for field, flag in (
        ("max_tokens", _MAX_TOKENS),
        ("temperature", _TEMPERATURE),
        ("top_k", _TOP_K),
        ("top_p", _TOP_P),
        ("min_p", _MIN_P),
        ("seed", _SEED),
    ):
        if flag.value is not None:
            setattr(sampling, field, flag.value)
    request = pb.GenerateRequest(sampling=sampling, priority=_PRIORITY.value)
    if _CHAT.value:
        if _SYSTEM.value:
            request.chat.messages.add(role="system", content=_SYSTEM.value)
        request.chat.messages.add(role="user", content=prompt)
    else:
        request.text = prompt
    return request


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("pass exactly one prompt (quote it)")
    request = build_request(argv[1])
    start = time.monotonic()
    first_at = None
    last = None
    try:
        with grpc.insecure_channel(_TARGET.value) as channel:
            for msg in pb_grpc.MeshServeStub(channel).Generate(request, timeout=_TIMEOUT.value):
                if first_at is None and msg.token_ids:
                    first_at = time.monotonic()
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                last = msg
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)
    elapsed = time.monotonic() - start
    print()
    if last is None:
        return
    u, t = last.usage, last.timings
    reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    decode = elapsed - (first_at - start) if first_at is not None else 0.0
    rate = (u.completion_tokens - 1) / decode if decode > 0 and u.completion_tokens > 1 else 0.0
    print(
        f"[{reason}] prompt {u.prompt_tokens} tokens, completion {u.completion_tokens} tokens; "
        f"client TTFT {(first_at or start) - start:.3f} s, total {elapsed:.3f} s, {rate:.1f} tok/s; "
        f"server queue {t.queue_seconds:.3f} s, TTFT {t.ttft_seconds:.3f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    app.run(main)
