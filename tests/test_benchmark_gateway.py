"""The benchmark through the gateway: `serve --api=openai` (W3 and W4 over the OpenAI HTTP API, streamed), `serve
--api=both` (the gateway's overhead against direct gRPC on one server) and `gateway_auth` (requests/s with the real
StoreGate in front of an instant stub replica), on the tiny random model with small counts. The figures are checked
for presence and consistency, never against performance thresholds.
"""

from __future__ import annotations

import json
import os

import pytest
from service_support import running_server

from bench import gateway_load, openai_client, runner, serve_client
from bench import multiturn as mt

# One engine config for every serve run here (the runner keeps engines per process): the tiny model's byte-level
# chat template makes a W3 prompt 61 tokens, so the context is 128.
TINY = dict(
    random_model="tiny",
    dtype="float32",
    num_slots=2,
    max_seq_len=128,
    max_prefill_len=64,
    page_size=64,
    decode_steps=4,
    workload="w3",
    num_prompts=3,
    max_tokens=9,
    num_requests=3,
    warmup_requests=1,
    progress=False,
)


def tiny_options(**overrides) -> runner.Options:
    return runner.Options(**{**TINY, **overrides})


def test_spread_and_request_bodies():
    assert openai_client.spread(9, 3) == [3, 3, 3]
    assert openai_client.spread(10, 4) == [2, 2, 3, 3]  # the remainder goes to the later deltas
    assert openai_client.spread(2, 3) == [1, 1, 1]  # never a zero share
    assert openai_client.base_url("127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert openai_client.base_url("http://h:1/v1/") == "http://h:1"
    prompt = runner.workloads.chat_prompts(1, 7)[0]
    path, body = openai_client.request_body(prompt, "m", 5)
    assert path == "/v1/chat/completions" and body["messages"] == [dict(prompt.messages[0])]
    assert (body["max_tokens"], body["temperature"], body["ignore_eos"], body["seed"]) == (7, 0.0, True, 5)
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    with pytest.raises(ValueError, match="token ids"):
        openai_client.request_body(runner.workloads.random_token_prompts([4], 50)[0], "m", 0)


def test_http_client_keeps_each_failure_in_the_record():
    """The load generator's HTTP client (aiohttp) against a raw server that answers each request as the test says:
    an error status keeps its code and the API's message, a stream cut before [DONE] is an error, a refused
    connection keeps the transport error's name, and a whole stream fills the record."""
    import asyncio

    from bench.stats import RequestRecord

    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "length"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
    whole = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()
    error = json.dumps({"error": {"message": "tokens_per_minute limit reached", "type": "rate_limit_error"}})
    answers = [
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(error), error.encode()),
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n" + whole[:40],
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n" + whole,
    ]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"
        )
        await reader.readexactly(length)
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()

    async def run() -> list[tuple[RequestRecord, openai_client.StreamResult]]:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        out = []
        async with server, openai_client.async_client(f"127.0.0.1:{port}", 10.0) as client:
            for i in range(3):
                record = RequestRecord(f"r{i}")
                out.append((record, await openai_client.stream_request(client, "/v1/chat/completions", {}, record)))
        async with openai_client.async_client(f"127.0.0.1:{port}", 10.0) as client:  # the server is closed now
            record = RequestRecord("refused")
            out.append((record, await openai_client.stream_request(client, "/v1/chat/completions", {}, record)))
        return out

    (limited, _), (cut, _), (ok, result), (refused, _) = asyncio.run(run())
    assert (limited.status, limited.error) == ("HTTP_429", "tokens_per_minute limit reached")
    assert cut.error == "stream ended without [DONE]"
    assert ok.error is None and ok.finish_reason == "length" and result.text == "Hi"
    assert (ok.prompt_tokens, ok.output_tokens) == (5, 1) and 0 < ok.ttft <= ok.e2e
    assert refused.status == "ClientConnectorError" and refused.error
    with pytest.raises(RuntimeError, match=r"GET /v1/models on 127\.0\.0\.1:1: .*refused"):
        openai_client.model_info("127.0.0.1:1")  # the benchmark CLI prints it as one line


def test_serve_openai_streams_through_the_gateway(tmp_path):
    opts = tiny_options(api="openai", concurrency=(2,), api_key="sk-bench-secret-123")
    doc, path, pngs = runner.run_command("serve", opts, str(tmp_path))
    fig = doc["figures"]
    assert fig["api"] == "openai" and fig["target"] == "in-process"
    assert fig["server"]["openai"]["model_name"] == fig["server"]["model_name"] == "tiny-random-llama"
    (run,) = fig["runs"]
    s = run["summary"]
    assert run["api"] == "openai" and run["concurrency"] == 2
    assert (s["requests"], s["completed"], s["failed"]) == (3, 3, 0), s["failures"]
    assert s["output_tokens"] == 3 * 9  # the final chunk's usage: exactly max_tokens each
    assert s["ttft_ms"]["count"] == 3 and s["tpot_ms"]["count"] == 3 and s["itl_ms"]["count"] >= 3
    for r in run["records"]:
        assert r["finish_reason"] == "length" and r["prompt_tokens"] == 61
        assert 0 <= r["cached_tokens"] <= r["prompt_tokens"]  # usage.prompt_tokens_details.cached_tokens
        assert 0 < r["ttft"] <= r["e2e"]
    assert s["prompt_tokens"] == 3 * 61 and s["cached_tokens"] == sum(r["cached_tokens"] for r in run["records"])
    with open(path) as f:
        text = f.read()
    assert "sk-bench-secret-123" not in text and json.loads(text)["options"]["api_key"] == "<redacted>"
    assert len(pngs) == 1 and os.path.getsize(pngs[0]) > 0


def test_serve_both_reports_the_gateway_overhead(tmp_path):
    opts = tiny_options(api="both", request_rates=(50.0,), num_requests=2, gateway_rounds=1)
    doc, _, pngs = runner.run_command("serve", opts, str(tmp_path))
    fig = doc["figures"]
    assert [(r["api"], r["round"]) for r in fig["runs"]] == [("grpc", 0), ("openai", 0)]
    assert all(r["summary"]["completed"] == 2 for r in fig["runs"])
    assert fig["prefix_cache_primed"] == {"prompts": 3, "failed": 0}
    (o,) = fig["gateway_overhead"]
    assert o["rate"] == 50.0 and o["failed"] == {"grpc": 0, "openai": 0}
    assert o["ttft_p50_ratio"] == pytest.approx(o["ttft_p50_ms"]["openai"] / o["ttft_p50_ms"]["grpc"])
    assert o["rounds"][0]["order"] == ["grpc", "openai"]
    assert o["output_tokens_per_s"]["grpc"] > 0 and o["output_tokens_per_s"]["openai"] > 0
    assert o["throughput_ratio"] > 0 and isinstance(o["meets_goal"], bool) and o["goal_ttft_ratio"] == 1.05
    assert len(pngs) == 2  # one latency plot per API
    with pytest.raises(ValueError, match="W3"):
        runner.serve(tiny_options(api="both", workload="w4"))


def test_serve_both_interleaved_sends_one_schedule_each_way_at_once(tmp_path):
    """gateway_mix 'interleaved': one arrival schedule of 2 x num_requests send times, alternately direct and through
    the gateway, both clients at once: each way's requests were sent at the schedule's times (its even or odd ones,
    swapping by round) and each got its prompts 0..n-1, as in the rounds mix."""
    opts = tiny_options(api="both", request_rates=(20.0,), num_requests=3, gateway_rounds=2, gateway_mix="interleaved")
    doc, _, _ = runner.run_command("serve", opts, str(tmp_path), draw=False)
    fig = doc["figures"]
    assert fig["gateway_mix"] == "interleaved"
    assert sorted((r["api"], r["round"]) for r in fig["runs"]) == [(a, i) for a in ("grpc", "openai") for i in (0, 1)]
    assert all(r["summary"]["completed"] == 3 for r in fig["runs"])
    for round_ in (0, 1):
        times = serve_client.arrival_times(6, 20.0, 1.0, round_)  # the round's seed: opts.seed (0) + round
        even, odd = ("grpc", "openai") if round_ == 0 else ("openai", "grpc")
        for api, want in ((even, times[0::2]), (odd, times[1::2])):
            (run,) = [r for r in fig["runs"] if r["api"] == api and r["round"] == round_]
            sent = {r["request_id"]: r["sent_at"] for r in run["records"]}
            for i, due in enumerate(want):  # never before its time on the shared clock (late only by the machine)
                assert due - 1e-3 <= sent[f"req-{i}"] <= due + 1.0
    (o,) = fig["gateway_overhead"]
    assert o["failed"] == {"grpc": 0, "openai": 0} and len(o["rounds"]) == 2
    with pytest.raises(ValueError, match="rate"):
        runner.serve(tiny_options(api="both", concurrency=(2,), request_rates=(), gateway_mix="interleaved"))
    with pytest.raises(ValueError, match="gateway_mix"):
        runner.serve(tiny_options(api="both", gateway_mix="mixed"))
    schedule = serve_client.Schedule(0.0, times[:2])
    with pytest.raises(ValueError, match="2 send times for 3 requests"):
        serve_client.check_schedule(schedule, 3, 1.0, 0)
    with pytest.raises(ValueError, match="without warm-up"):
        serve_client.check_schedule(schedule, 2, 1.0, 1)


def test_w4_over_the_openai_api():
    engine, tokenizer = runner.load_model(tiny_options())
    spec = mt.ChatSpec(users=2, turns=2, stagger_s=0.0, max_tokens=6, message_tokens=(4, 8), system_prompts=("Hi.",))
    with running_server(engine, tokenizer) as running:
        address = f"127.0.0.1:{running.server.port}"
        with gateway_load.gateway_for(address) as gateway:
            run = mt.run_chat(gateway.base_url, tokenizer, spec, api="openai", load_target=address, poll_interval=0.02)
    report = mt.chat_report(run)
    assert report["failures"] == [] and len(run.exchanges) == 4
    by = {(e.user, e.turn): e for e in run.exchanges}
    for u in range(2):
        first, second = by[u, 1], by[u, 2]
        assert second.messages[2] == {"role": "assistant", "content": first.text}
        assert len(second.prompt_ids) == second.server_prompt_tokens  # usage.prompt_tokens is the server's count
        assert 0 <= second.cached_tokens <= second.server_prompt_tokens
    o = report["overall"]
    assert o["completed"] == 4 and o["computed_tokens"] == o["prompt_tokens"] - o["cached_tokens"]
    assert report["server_load"]["polls"] >= 1  # GetLoad polled on the replica behind the gateway


def test_gateway_auth_throughput(tmp_path):
    opts = runner.Options(auth_duration_s=1.0, auth_connections=4, progress=False)
    doc, _, _ = runner.run_command("gateway_auth", opts, str(tmp_path), draw=False)
    fig = doc["figures"]
    assert fig["gate"].startswith("StoreGate") and fig["limits"] == gateway_load.HIGH_LIMITS
    assert fig["completed"] > 0 and fig["failed"] == 0 and fig["statuses"] == {"200": fig["completed"]}
    assert fig["requests_per_s"] == pytest.approx(fig["completed"] / fig["duration_s"])
    assert 0 < fig["latency_ms"]["p50"] <= fig["latency_ms"]["p99"]
    assert fig["gateway_cpu_ms_per_request"] > 0 and fig["http_parser"] in ("h11", "httptools")
    assert fig["ledger_complete"] and fig["ledger_rows"] >= fig["completed"]  # every admitted request settled
    lines = gateway_load.headline(fig)
    assert "requests/s" in lines[0] and "gateway CPU" in lines[1]


def test_pyspy_summary_from_collapsed_stacks(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "_bootstrap (threading.py:1);_worker (concurrent/futures/thread.py:83) 10\n"  # idle worker
        "run (asyncio/runners.py:1);admit (gateway/store_gate.py:140);"
        "DefaultDialect.do_execute (sqlalchemy/engine/default.py:945) 6\n"
        "run (asyncio/runners.py:1);admit (gateway/store_gate.py:141);expect (sqlalchemy/sql/coercions.py:3) 3\n"
        "run (asyncio/runners.py:1);handle (h11/_connection.py:9) 1\n"
    )
    p = gateway_load.summarize_pyspy(str(raw))
    assert (p["samples"], p["idle_samples"], p["busy_samples"]) == (20, 10, 10)
    assert p["libraries"] == {"sqlite3 (C)": 0.6, "sqlalchemy": 0.3, "h11": 0.1}
    assert p["inclusive"][0] == {"function": "run (asyncio/runners.py)", "share": 1.0}
    assert {"function": "admit (gateway/store_gate.py)", "share": 0.9} in p["inclusive"]
