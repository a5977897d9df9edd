"""The gRPC service, tested for real on loopback with the generated client: streaming parity with the offline
scheduler, concurrency beyond the slot count, cancellation and deadlines, admission control, validation, health,
metrics, engine failures, drain and SIGTERM. Every RPC carries a deadline, so nothing can hang the suite.
"""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import jax.numpy as jnp
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.config import tiny_config
from engine.model import init_params, stack_layers
from engine.sampling import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SamplingParams
from engine.text import IncrementalDetokenizer
from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc
from service.server import RETRY_PUSHBACK_KEY, SERVICE_NAME
from tests.service_support import (
    RPC_TIMEOUT,
    collect,
    make_test_engine,
    offline_generate,
    running_server,
    sampling_options,
    slow_generate,
    wait_for,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def tiny():
    """One warmed tiny engine for the module; servers take turns on it (one at a time)."""
    return make_test_engine()


def long_request(max_tokens: int = 100) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="long", sampling=pb.SamplingOptions(max_tokens=max_tokens, ignore_eos=True))


def test_generated_code_matches_proto(tmp_path):
    script = os.path.join(ROOT, "scripts", "gen_protos.sh")
    # the protoc of this interpreter's grpcio-tools, whatever `python` on PATH is
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", script, str(tmp_path)], check=True, timeout=60, env=env)
    generated = os.path.join(tmp_path, "protos", "meshserve", "v1")
    committed = os.path.join(ROOT, "protos", "meshserve", "v1")
    names = ["meshserve_pb2.py", "meshserve_pb2_grpc.py"]
    match, mismatch, errors = filecmp.cmpfiles(generated, committed, names, shallow=False)
    assert match == names, f"regenerate with scripts/gen_protos.sh: {mismatch + errors} differ"


def test_streamed_greedy_text_equals_offline(tiny):
    engine, tok = tiny
    texts = ["héllo wörld", "emoji 🌍🚀 and CJK 世界", "a"]
    cases = [
        (pb.GenerateRequest(text=t, sampling=pb.SamplingOptions(max_tokens=n)), tok.encode(t), n)
        for t, n in zip(texts, [24, 40, 1], strict=True)
    ]
    ids = [5, 200, 33, 34]
    cases.append(
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingOptions(max_tokens=30)), ids, 30)
    )
    chat = [{"role": "user", "content": "hi ✨"}]
    chat_pb = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in chat])
    cases.append((pb.GenerateRequest(chat=chat_pb, sampling=pb.SamplingOptions(max_tokens=20)), None, 20))
    prompts = [p if p is not None else tok.encode_chat(chat) for _, p, _ in cases]
    expected = offline_generate(
        engine, tok, [(p, SamplingParams(max_tokens=n)) for p, (_, _, n) in zip(prompts, cases, strict=True)]
    )
    with running_server(engine, tok) as r:
        for i, ((request, _, _), prompt, want) in enumerate(zip(cases, prompts, expected, strict=True)):
            request.request_id = f"parity-{i}"
            msgs = r.generate(request)
            assert msgs[0].request_id == f"parity-{i}" and msgs[0].prompt_tokens == len(prompt)
            assert all(not m.request_id for m in msgs[1:])
            assert collect(msgs) == want
            last = msgs[-1]
            assert last.usage.prompt_tokens == len(prompt)
            assert last.usage.completion_tokens == len(want.token_ids)
            assert 0 < last.usage.device_seconds <= last.timings.total_seconds
            assert 0 <= last.timings.queue_seconds <= last.timings.ttft_seconds <= last.timings.total_seconds
            assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])


def test_64_concurrent_streams_with_mixed_settings(tiny):
    engine, tok = tiny
    variants = [
        SamplingParams(max_tokens=3),
        SamplingParams(max_tokens=50, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=7, max_tokens=30),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=11, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.7, min_p=0.05, seed=3, max_tokens=20, stop=("a", "zz")),
        SamplingParams(max_tokens=12, logprobs=2),
        SamplingParams(temperature=1.2, seed=99, max_tokens=60, stop_token_ids=(47,)),
        SamplingParams(max_tokens=1),
    ]
    jobs = [(tok.encode(f"request number {i}"), variants[i % len(variants)]) for i in range(64)]
    expected = offline_generate(engine, tok, jobs)
    results: dict[int, object] = {}

    def call(i: int, stub: pb_grpc.MeshServeStub) -> None:
        prompt, params = jobs[i]
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling_options(params))
        try:
            msgs = list(stub.Generate(request, timeout=RPC_TIMEOUT))
            results[i] = msgs
        except grpc.RpcError as e:
            results[i] = e

    with running_server(engine, tok, prefills_per_step=2) as r:
        threads = [threading.Thread(target=call, args=(i, r.stub)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(RPC_TIMEOUT + 5)
        assert r.load().slots_used == 0
    assert sorted(results) == list(range(64))
    for i, want in enumerate(expected):
        msgs = results[i]
        assert not isinstance(msgs, grpc.RpcError), f"request {i}: {msgs}"
        assert collect(msgs) == want, f"request {i} ({jobs[i][1]})"
        if jobs[i][1].logprobs is not None:
            lps = [lp for m in msgs for lp in m.logprobs]
            assert [lp.token_id for lp in lps] == want.token_ids
            assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in lps)


def test_cancellation_frees_the_slot_for_the_next_request(tiny, monkeypatch):
    engine, tok = tiny
    monkeypatch.setattr(engine, "generate", slow_generate(engine, 0.03))
    with running_server(engine, tok) as r:
        calls = [r.stub.Generate(long_request(120), timeout=RPC_TIMEOUT) for _ in range(4)]
        for c in calls:
            next(c)  # every slot holds a decoding request
        assert r.load().free_slots == 0
        calls[0].cancel()
        # the freed slot admits a new request while the other three are still decoding
        msgs = r.generate(pb.GenerateRequest(text="next", sampling=pb.SamplingOptions(max_tokens=4)))
        assert collect(msgs).finish_reason == "length"
        assert r.load().slots_used == 3
        wait_for(lambda: r.server.metrics.requests.labels(finish_reason="cancelled")._value.get() == 1)
        for c in calls[1:]:
            c.cancel()
        wait_for(lambda: r.load().slots_used == 0, what="cancelled slots to be freed")


def test_deadline_exceeded_frees_the_slot(tiny, monkeypatch):
    engine, tok = tiny
    monkeypatch.setattr(engine, "generate", slow_generate(engine, 0.03))
    with running_server(engine, tok) as r:
        with pytest.raises(grpc.RpcError) as err:
            r.generate(long_request(120), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # within about one dispatch (30 ms here) of the deadline the slot is free again
        wait_for(lambda: r.load().slots_used == 0, timeout=1.0, what="the slot to be freed")
        msgs = r.generate(pb.GenerateRequest(text="after", sampling=pb.SamplingOptions(max_tokens=4)))
        assert collect(msgs).finish_reason == "length"


def test_queue_full_is_resource_exhausted_with_retry_hint(tiny, monkeypatch):
    engine, tok = tiny
    monkeypatch.setattr(engine, "generate", slow_generate(engine, 0.03))
    with running_server(engine, tok, max_waiting=2) as r:
        # one at a time: a burst would overflow the 2-deep queue before the engine thread admits anything
        calls = []
        for i in range(6):
            calls.append(r.stub.Generate(long_request(120), timeout=RPC_TIMEOUT))
            want = (min(i + 1, 4), max(i + 1 - 4, 0))
            wait_for(lambda w=want: (r.load().slots_used, r.load().waiting_requests) == w, what=f"admission {want}")
        with pytest.raises(grpc.RpcError) as err:
            r.generate(long_request(4))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "waiting queue is full (2 requests)" in err.value.details()
        hint = dict(err.value.trailing_metadata())[RETRY_PUSHBACK_KEY]
        assert 100 <= int(hint) <= 30_000
        for c in calls:
            c.cancel()


def _chat(*messages: tuple[str, str]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=role, content=content) for role, content in messages])


INVALID = [
    (pb.GenerateRequest(), "input"),
    (pb.GenerateRequest(text=""), "text is empty"),
    (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids"),
    (pb.GenerateRequest(chat=pb.ChatMessages()), "chat.messages"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 300])), "token id 300"),
    (pb.GenerateRequest(text="x" * 130), "prompt has 130 tokens but the context holds 128"),
    (pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(max_tokens=200)), "max_tokens"),
    (pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(max_tokens=0)), "max_tokens"),
    (pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(temperature=-1)), "temperature"),
    (pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(top_k=1000)), "top_k"),
    (pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(top_p=1.5)), "top_p"),
    (pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(top_p=0)), "top_p"),
    (pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(min_p=2)), "min_p"),
    (pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(seed=2**40)), "seed"),
    (pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(logprobs=50)), "logprobs"),
    (pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(stop_token_ids=[999])), "stop_token_ids"),
    (
        pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(stop=["s"] * (MAX_STOP_STRINGS + 1))),
        f"at most {MAX_STOP_STRINGS} stop strings",
    ),
    (
        pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(stop=["s" * (MAX_STOP_STRING_CHARS + 1)])),
        f"1 to {MAX_STOP_STRING_CHARS} characters",
    ),
    (pb.GenerateRequest(chat=_chat(("wizard", "hi"))), "chat.messages[0] has role 'wizard'"),
    (pb.GenerateRequest(chat=_chat(("user", "x" * 10_000))), "chat.messages[0].content"),
    (pb.GenerateRequest(chat=_chat(*[("user", "x")] * 300)), "chat.messages has 300 messages; the limit is 256"),
    (pb.GenerateRequest(text="y" * 10_000), "text has 10000 characters; the limit is 2048"),
]


def test_resumed_tokens_continue_a_cut_stream_exactly(tiny):
    """Failover: a stream cut after k tokens, resent as prompt + those k tokens with resumed_tokens=k, continues with
    exactly the tokens (and text) the uninterrupted request gave, greedy and seeded; usage counts the whole
    completion; bad values are INVALID_ARGUMENT naming the field."""
    engine, tok = tiny
    prompt = tok.encode("resume me")
    settings = [dict(max_tokens=21, ignore_eos=True), dict(max_tokens=21, ignore_eos=True, temperature=0.9, seed=7)]
    with running_server(engine, tok) as r:
        for options in settings:
            whole = collect(
                r.generate(
                    pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingOptions(**options))
                )
            )
            assert len(whole.token_ids) == 21
            for k in (1, 6, 13):
                ids = prompt + whole.token_ids[:k]
                msgs = r.generate(
                    pb.GenerateRequest(
                        token_ids=pb.TokenIds(ids=ids), resumed_tokens=k, sampling=pb.SamplingOptions(**options)
                    )
                )
                rest = collect(msgs)
                assert whole.token_ids[:k] + rest.token_ids == whole.token_ids, (options, k)
                # what the cut stream had shown: its text deltas hold back a character's incomplete bytes
                seen = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=True).add(whole.token_ids[:k])
                assert seen + rest.text == whole.text, (options, k)
                assert msgs[0].prompt_tokens == len(prompt)
                assert msgs[-1].usage.prompt_tokens == len(prompt) and msgs[-1].usage.completion_tokens == 21
        bad = [
            (pb.GenerateRequest(text="abc", resumed_tokens=1), "resumed_tokens needs the prompt as token_ids"),
            (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), resumed_tokens=2), "must be in [0, 1]"),
            (
                pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=[5, 6, 7]), resumed_tokens=2, sampling=pb.SamplingOptions(max_tokens=2)
                ),
                "resumed_tokens is 2; it must be below max_tokens (2)",
            ),
        ]
        for request, needle in bad:
            with pytest.raises(grpc.RpcError) as err:
                r.generate(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


def test_invalid_requests_are_invalid_argument_naming_the_field(tiny):
    engine, tok = tiny
    with running_server(engine, tok) as r:
        for request, needle in INVALID:
            with pytest.raises(grpc.RpcError) as err:
                r.generate(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.value)
            assert needle in err.value.details(), (needle, err.value.details())
        assert r.load().waiting_requests == 0
        assert collect(r.generate(pb.GenerateRequest(text="ok", sampling=pb.SamplingOptions(max_tokens=2)))).text


def test_oversized_requests_are_invalid_argument_naming_the_limit(tiny):
    """Past gRPC's default 4 MiB a request used to get gRPC's own RESOURCE_EXHAUSTED, which the API documents as
    "queue full, retry later": a client obeying it retried forever."""
    engine, tok = tiny
    with running_server(engine, tok) as r:
        limit = r.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT).limits.max_request_bytes
        assert limit == 4 << 20
        for request in (
            pb.GenerateRequest(text="z" * (5 << 20)),
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[200] * (3 << 20))),
        ):
            with pytest.raises(grpc.RpcError) as err:
                r.generate(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert f"the limit is {limit} (max_request_bytes)" in err.value.details()
        assert collect(r.generate(pb.GenerateRequest(text="ok", sampling=pb.SamplingOptions(max_tokens=2)))).text


def test_health_through_warmup_serving_and_draining(tiny, monkeypatch):
    engine, tok = tiny
    gate = threading.Event()
    warmup = engine.warmup
    monkeypatch.setattr(engine, "warmup", lambda: (gate.wait(30), warmup()))
    with running_server(engine, tok, wait_ready=False) as r:
        assert r.health_status() == NOT_SERVING
        assert r.health_status(SERVICE_NAME) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            r.generate(long_request(4))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in err.value.details()
        gate.set()
        wait_for(lambda: r.health_status() == SERVING, what="SERVING after warm-up")
        assert r.health_status(SERVICE_NAME) == SERVING

        monkeypatch.setattr(engine, "generate", slow_generate(engine, 0.02))
        inflight = r.stub.Generate(long_request(60), timeout=RPC_TIMEOUT)
        next(inflight)
        drained = []
        drainer = threading.Thread(target=lambda: drained.append(r.server.drain(timeout=20)))
        drainer.start()
        wait_for(lambda: r.health_status() == NOT_SERVING, what="NOT_SERVING while draining")
        with pytest.raises(grpc.RpcError) as err:
            r.generate(long_request(4))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
        assert r.load().draining
        rest = list(inflight)
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH and rest[-1].usage.completion_tokens == 60
        drainer.join(20)
        assert drained == [0]


def test_drain_timeout_ends_requests_with_unavailable(tiny, monkeypatch):
    engine, tok = tiny
    monkeypatch.setattr(engine, "generate", slow_generate(engine, 0.05))
    with running_server(engine, tok) as r:
        inflight = r.stub.Generate(long_request(120), timeout=RPC_TIMEOUT)
        next(inflight)
        assert r.server.drain(timeout=0.2) == 1
        msgs = []
        with pytest.raises(grpc.RpcError) as err:
            for m in inflight:
                msgs.append(m)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "drain timeout" in err.value.details()
        assert msgs[-1].finish_reason == pb.FINISH_REASON_CANCELLED


def test_watchdog_reports_a_stuck_engine_loop(tiny, monkeypatch):
    engine, tok = tiny
    with running_server(engine, tok, stall_timeout=0.3) as r:
        release = threading.Event()
        original = engine.generate

        def stuck(steps=None):
            release.wait(10)
            return original(steps)

        monkeypatch.setattr(engine, "generate", stuck)
        call = r.stub.Generate(long_request(8), timeout=RPC_TIMEOUT)
        wait_for(lambda: r.health_status() == NOT_SERVING, what="the watchdog to flip NOT_SERVING")
        release.set()
        assert collect(list(call)).finish_reason == "length"
        wait_for(lambda: r.health_status() == SERVING, what="SERVING after recovery")


def test_engine_failure_fails_only_its_requests_with_internal(tiny, monkeypatch):
    engine, tok = tiny
    prompt = tok.encode("survivor")
    expected = offline_generate(engine, tok, [(prompt, SamplingParams(max_tokens=20))])[0]
    original = engine.generate
    failures = []

    def fail_once(steps=None):
        if not failures:
            failures.append(1)
            raise RuntimeError("injected device fault")
        return original(steps)

    monkeypatch.setattr(engine, "generate", fail_once)
    with running_server(engine, tok) as r:
        msgs = []
        with pytest.raises(grpc.RpcError) as err:
            for m in r.stub.Generate(long_request(20), timeout=RPC_TIMEOUT):
                msgs.append(m)
        assert err.value.code() == grpc.StatusCode.INTERNAL and "injected device fault" in err.value.details()
        assert msgs[-1].finish_reason == pb.FINISH_REASON_ERROR
        after = r.generate(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingOptions(max_tokens=20))
        )
        assert collect(after) == expected
        assert r.health_status() == SERVING


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=RPC_TIMEOUT).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("meshserve_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_move_as_requests_run(tiny, monkeypatch):
    engine, tok = tiny
    with running_server(engine, tok, metrics_port=0) as r:
        before = _scrape(r.server.metrics_port)
        assert before["meshserve_slots_total"] == 4 and before["meshserve_kv_cache_tokens_capacity"] == 4 * 128
        assert before["meshserve_startup_seconds"] > 0
        assert before.get("meshserve_compiles_total", 0) == 0  # the engine was compiled before this server
        for i in range(3):
            r.generate(pb.GenerateRequest(text=f"m{i}", sampling=pb.SamplingOptions(max_tokens=20, ignore_eos=True)))
        with pytest.raises(grpc.RpcError):
            r.generate(pb.GenerateRequest())
        monkeypatch.setattr(engine, "generate", slow_generate(engine, 0.03))
        call = r.stub.Generate(long_request(60), timeout=RPC_TIMEOUT)
        next(call)
        # gauges are refreshed after each scheduler step, i.e. once the first dispatch of this request has run
        wait_for(lambda: _scrape(r.server.metrics_port)["meshserve_slots_used"] == 1, what="slots_used gauge")
        during = _scrape(r.server.metrics_port)
        call.cancel()
        after = _scrape(r.server.metrics_port)
    assert during["meshserve_slots_used"] == 1 and during["meshserve_kv_cache_tokens_used"] > 0
    assert after['meshserve_requests_total{finish_reason="length"}'] == 3
    assert after['meshserve_requests_rejected_total{code="INVALID_ARGUMENT"}'] == 1
    assert after["meshserve_generated_tokens_total"] >= 60
    assert after["meshserve_prompt_tokens_total"] == 6
    assert after["meshserve_time_to_first_token_seconds_count"] == 3
    assert after["meshserve_inter_token_latency_seconds_count"] >= 57
    assert after["meshserve_request_latency_seconds_count"] == 3
    assert after["meshserve_queue_time_seconds_count"] == 3
    assert 0 < during["meshserve_decode_batch_occupancy"] <= 1
    assert 0 < during["meshserve_engine_busy_seconds_total"] <= after["meshserve_engine_busy_seconds_total"]
    assert during["meshserve_step_arithmetic_intensity"] > 0 and during["meshserve_bandwidth_utilization"] > 0


def test_prefix_cache_counters(tiny):
    """Two requests opening with the same 20 tokens: the second reads them from the prefix cache, and the counters
    say so."""
    engine, tok = tiny
    engine.clear_prefix_cache()
    shared = list(range(40, 60))
    with running_server(engine, tok, metrics_port=0) as r:
        outs = [
            collect(
                r.generate(
                    pb.GenerateRequest(
                        token_ids=pb.TokenIds(ids=shared + tail),
                        sampling=sampling_options(SamplingParams(max_tokens=5, ignore_eos=True)),
                    )
                )
            )
            for tail in ([7, 8], [9])
        ]
        wait_for(
            lambda: _scrape(r.server.metrics_port).get("meshserve_prefix_cache_queried_tokens_total") == 43,
            what="prefix cache counters",
        )
        after = _scrape(r.server.metrics_port)
    assert after['meshserve_prefix_cache_hit_tokens_total{tier="device"}'] == 20
    assert after['meshserve_prefix_cache_hit_tokens_total{tier="host"}'] == 0
    engine.clear_prefix_cache()
    with running_server(engine, tok) as r:  # the same request computed in full gives the same tokens
        cold = collect(
            r.generate(
                pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=[*shared, 9]),
                    sampling=sampling_options(SamplingParams(max_tokens=5, ignore_eos=True)),
                )
            )
        )
    assert cold == outs[1]


def test_tokenize_model_info_load_and_reflection(tiny):
    engine, tok = tiny
    with running_server(engine, tok) as r:
        out = r.stub.Tokenize(pb.TokenizeRequest(text="héllo"), timeout=RPC_TIMEOUT)
        assert list(out.token_ids) == tok.encode("héllo", add_special_tokens=False) and len(out.tokens) == 6
        chat = r.stub.Tokenize(pb.TokenizeRequest(chat=_chat(("user", "hi"))), timeout=RPC_TIMEOUT)
        assert list(chat.token_ids) == tok.encode_chat([{"role": "user", "content": "hi"}])
        with pytest.raises(grpc.RpcError) as err:
            r.stub.Tokenize(pb.TokenizeRequest(), timeout=RPC_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = r.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT)
        assert (info.model_name, info.vocab_size, info.context_length, info.num_slots) == (
            "tiny-random-llama",
            256,
            128,
            4,
        )
        assert info.dtype == "float32" and list(info.prefill_buckets) == list(engine.config.prefill_buckets)
        assert info.platform == "cpu" and sum(a.size for a in info.mesh) >= 1
        # a prompt may fill the context but for one generated token (longer than a prefill call: read in chunks)
        assert info.limits.max_prompt_tokens == 127 and info.limits.max_stop_strings == MAX_STOP_STRINGS
        load = r.load()
        assert (load.slots_total, load.free_slots, load.kv_tokens_capacity, load.draining) == (4, 4, 512, False)
        # the pool: 4 slots x 128 positions in pages of 64, none held once the requests above are done
        assert (load.kv_pages_total, load.kv_page_size, load.kv_pages_used, load.kv_pages_reserved) == (8, 64, 0, 0)
        assert load.kv_pages_free + load.kv_pages_cached == 8
        refl = reflection_pb2_grpc.ServerReflectionStub(r.channel)
        reply = next(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=RPC_TIMEOUT
            )
        )
        names = {s.name for s in reply.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_sigterm_during_load_drains_and_exits_zero(tmp_path):
    """scripts/serve.py with its gateway: SIGTERM mid-load lets the engine's streams and the gateway's (OpenAI API)
    finish, refuses new work, and exits 0."""
    import httpx

    from checkpoints.orbax_io import save_checkpoint
    from engine.tokenizer import make_tiny_tokenizer

    cfg = tiny_config()
    # checkpoints store the layers stacked (the engine unstacks them on load)
    params = stack_layers(init_params(cfg, jnp.float32), cfg.num_layers)
    save_checkpoint(tmp_path / "ckpt", cfg, params, make_tiny_tokenizer())
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "serve.py"),
        f"--checkpoint={tmp_path / 'ckpt'}",
        "--port=0",
        "--metrics_port=-1",
        "--num_slots=2",
        "--max_seq_len=256",
        "--max_prefill_len=16",
        "--decode_steps=1",
        "--dtype=float32",
        "--memory_bandwidth_gbps=10",
        "--drain_timeout=60",
        "--http_port=0",
        "--gateway_grpc_port=0",
        "--tokenizer=",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        port = http_port = None
        lines = []
        deadline = time.monotonic() + 120
        while http_port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("meshserve listening on"):
                port = int(line.split()[3].rsplit(":", 1)[1])
            if line.startswith("gateway listening on"):
                http_port = int(line.split("http_port=")[1].split()[0])
        assert port and http_port, "".join(lines)
        threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True).start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.MeshServeStub(channel)

        def status():
            return health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT).status

        wait_for(lambda: status() == SERVING, timeout=120, what="SERVING")
        results: dict[int, object] = {}
        finished_at: dict[int, float] = {}

        def call(i: int) -> None:
            try:
                results[i] = collect(list(stub.Generate(long_request(200), timeout=60)))
            except grpc.RpcError as e:
                results[i] = e
            finished_at[i] = time.monotonic()

        model = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", timeout=RPC_TIMEOUT).json()["data"][0]["id"]

        def call_http(i: int) -> None:
            body = {"model": model, "prompt": "long", "max_tokens": 200, "ignore_eos": True, "stream": True}
            text, done = [], False
            try:
                url = f"http://127.0.0.1:{http_port}/v1/completions"
                with httpx.stream("POST", url, json=body, timeout=90) as response:
                    for raw in response.iter_lines():
                        done = done or raw == "data: [DONE]"
                        text.append(raw)
                results[i] = (response.status_code, done, text)
            except httpx.HTTPError as e:
                results[i] = e
            finished_at[i] = time.monotonic()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        threads.append(threading.Thread(target=call_http, args=(6,)))
        for t in threads:
            t.start()

        def load() -> int:
            now = stub.GetLoad(pb.GetLoadRequest(), timeout=RPC_TIMEOUT)
            return now.slots_used + now.waiting_requests

        wait_for(lambda: load() == 7, what="load")  # the gateway's request too
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: status() == NOT_SERVING, what="NOT_SERVING after SIGTERM")
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(long_request(4), timeout=RPC_TIMEOUT))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        for t in threads:
            t.join(90)
        assert proc.wait(timeout=60) == 0, "".join(lines)
        channel.close()
        for i in range(6):
            assert not isinstance(results[i], grpc.RpcError), results[i]
            assert results[i].finish_reason == "length" and len(results[i].token_ids) == 200
        status_code, done, events = results[6]
        assert status_code == 200 and done, events[-3:]
        assert max(finished_at.values()) > sigterm_at, "the load ended before SIGTERM; nothing was drained"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_smollm2_chat_stream_equals_offline():
    from engine.engine import EngineConfig
    from engine.load import load_engine

    engine, tok = load_engine(
        None, EngineConfig(num_slots=2, max_seq_len=256, max_prefill_len=64, decode_steps=8, dtype="float32")
    )
    engine.warmup()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tok.encode_chat(messages)
    expected = offline_generate(engine, tok, [(prompt, SamplingParams(max_tokens=48))])[0]
    with running_server(engine, tok) as r:
        request = pb.GenerateRequest(
            chat=_chat(*[(m["role"], m["content"]) for m in messages]), sampling=pb.SamplingOptions(max_tokens=48)
        )
        msgs = r.generate(request, timeout=120)
    assert collect(msgs) == expected
    assert "Paris" in expected.text
