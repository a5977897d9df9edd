"""W4 (multi-turn chat) and W5 (long prompt) serving workloads: the ideal-token count and the latency windows on
hand-made sequences, the deterministic text, and short runs against a real tiny-model server on loopback (6 chat
requests, 2 x 17 W5 requests, 2 refused chat requests)."""

from __future__ import annotations

import functools

import pytest

from bench import multiturn as mt
from bench.stats import RequestRecord
from checkpoints.bundled import bundled_gguf_path
from engine.tokenizer import Tokenizer, make_tiny_tokenizer
from protos.meshserve.v1 import meshserve_pb2 as pb
from tests.service_support import make_test_engine, running_server

PAGE_FIELDS = [f.name for f in pb.Load.DESCRIPTOR.fields if "page" in f.name or "cached" in f.name]


@functools.cache
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf_file(bundled_gguf_path())


def exchange(
    request_id, sent_at, prompt, completion=(), chunks=(), *, turn=1, user=0, status="OK", cached=0
) -> mt.Exchange:
    """A finished exchange: `chunks` are (seconds after sending, tokens) and carry `completion` in order."""
    ttft = chunks[0][0] if chunks else None
    record = RequestRecord(
        request_id,
        output_tokens=len(completion),
        sent_at=sent_at,
        ttft=ttft,
        status=status,
        chunks=list(chunks),
        e2e=chunks[-1][0] if chunks else 0.0,
    )
    if status != "OK":
        record.error = "refused"
    return mt.Exchange(
        record,
        user=user,
        turn=turn,
        prompt_ids=list(prompt),
        completion_ids=list(completion),
        server_prompt_tokens=len(prompt),
        cached_tokens=cached,
    )


# ----- the ideal, by hand -------------------------------------------------------------------------------------------


def test_common_prefix_and_ideal_new_tokens():
    assert mt.common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert mt.common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert mt.common_prefix_len([], [1]) == 0 and mt.common_prefix_len([5], [6]) == 0
    assert mt.ideal_new_tokens([1, 2, 3, 4, 5], []) == 5
    assert mt.ideal_new_tokens([1, 2, 3, 4, 5], [[1, 2, 9], [1, 2, 3, 4, 7, 8], [7]]) == 1  # best match: 4 tokens
    assert mt.ideal_new_tokens([1, 2, 3], [[1, 2, 3, 4]]) == 0  # a prefix of something seen


S = [10, 11, 12]  # a shared system prompt (as rendered by the template)


def hand_run() -> list[mt.Exchange]:
    """Users A, B, D share the system prompt S; C is refused; times in seconds on the run clock."""
    return [
        # A1 streams 30 31 at 0.5 s and 32 at 1.0 s
        exchange("A1", 0.0, [*S, 20, 21], [30, 31, 32], [(0.5, 2), (1.0, 1)], cached=0),
        exchange("C1", 0.1, [*S, 40, 41, 42], status="INVALID_ARGUMENT"),  # refused: never seen
        # B1 and D1 are sent at the same instant: neither saw the other
        exchange("B1", 0.2, [*S, 40], [41], [(0.3, 1)], user=1, cached=3),
        exchange("D1", 0.2, [*S, 40], [77], [(0.4, 1)], user=3, cached=3),
        # at 0.7 s the server held A1's prompt + 30 31 (not 32 yet) and B1's prompt + 41
        exchange("B2", 0.7, [*S, 40, 41, 42, 43], [50], [(0.1, 1)], turn=2, user=1, cached=5),
        exchange("E1", 0.7, [*S, 20, 21, 30, 31, 32, 5], [51], [(0.1, 1)], user=4, cached=3),
        # A's second turn: the template re-tokenized the reply as 30 31 99, then the new message 50
        exchange("A2", 1.5, [*S, 20, 21, 30, 31, 99, 50], [60], [(0.2, 1)], turn=2, cached=7),
    ]


def test_ideal_tokens_by_hand():
    run = hand_run()
    ideal = dict(zip([e.record.request_id for e in run], mt.ideal_tokens(run), strict=True))
    assert ideal["A1"] == 5  # nothing seen before it
    assert ideal["C1"] == 6 - 3  # its ideal is counted (but it is never seen by later requests)
    assert ideal["B1"] == 1 and ideal["D1"] == 1  # S from A1's prompt; not each other
    assert ideal["B2"] == 2  # [S, 40, 41] from B1 + its completion; C1's 42 does not count: it was refused
    assert ideal["E1"] == 2  # A1 as far as it had streamed: [S, 20, 21, 30, 31]
    assert ideal["A2"] == 2  # [S, 20, 21, 30, 31] of A1 + its completion, then 99 50 are new
    assert run[0].seen_at(0.6) == [*S, 20, 21, 30, 31] and run[0].seen_at(5.0) == [*S, 20, 21, 30, 31, 32]


def test_chat_report_by_hand():
    run = hand_run()
    for e, ideal in zip(run, mt.ideal_tokens(run), strict=True):
        e.ideal_tokens = ideal
    spec = mt.ChatSpec(users=5, turns=2, system_prompts=("a", "b"))
    report = mt.chat_report(mt.ChatRun(spec, run, [(2, 2)], 2.0, {"kv_pages": None}))
    turn1, turn2 = report["by_turn"]
    # turn 1, completed: A1 (5 prompt, 0 cached, ideal 5), B1 and D1 (4, 3, 1), E1 (9, 3, 2)
    assert (turn1["requests"], turn1["completed"], turn1["failed"], turn1["skipped"]) == (5, 4, 1, 0)
    assert (turn1["prompt_tokens"], turn1["cached_tokens"], turn1["ideal_tokens"]) == (22, 9, 9)
    assert turn1["computed_tokens"] == 13 and turn1["computed_over_ideal"] == pytest.approx(13 / 9)
    assert turn1["hit_rate"] == pytest.approx(9 / 22) and turn1["ideal_hit_rate"] == pytest.approx(13 / 22)
    # turn 2: B2 (7, 5, 2), A2 (9, 7, 2)
    assert (turn2["prompt_tokens"], turn2["cached_tokens"], turn2["ideal_tokens"], turn2["skipped"]) == (16, 12, 4, 1)
    o = report["overall"]
    assert (o["prompt_tokens"], o["cached_tokens"], o["computed_tokens"], o["ideal_tokens"]) == (38, 21, 17, 13)
    assert o["output_tokens"] == 3 + 1 + 1 + 1 + 1 + 1 and o["output_tokens_per_s"] == pytest.approx(8 / 2.0)
    assert report["failures"] == [
        {"request_id": "C1", "user": 0, "turn": 1, "status": "INVALID_ARGUMENT", "error": "refused"}
    ]
    assert report["skipped"] == [{"user": 2, "turn": 2}] and report["tokenizer_mismatches"] == []
    lines = mt.headline({"workload": "W4", **report})
    assert "computed 17 vs ideal 13" in lines[1] and "n/a (GetLoad reports no KV pages)" in lines[-1]


def test_window_itl_by_hand():
    # chunks at 1.0 (first token), 1.2 (1 token), 1.6 (2 tokens: two gaps of 0.2), 3.0 (1 token: a 1.4 s stall)
    r = RequestRecord("s", sent_at=1.0, chunks=[(0.0, 1), (0.2, 1), (0.6, 2), (2.0, 1)])
    assert mt.window_itl([r], 1.0, 1.6, inside=True) == pytest.approx([0.2, 0.2, 0.2])
    assert mt.window_itl([r], 1.0, 1.5, inside=True) == pytest.approx([0.2])
    assert mt.window_itl([r], 2.0, 2.5, inside=False) == pytest.approx([1.4])  # the stall overlaps the window
    assert mt.window_itl([r], 1.7, 4.0, inside=True) == []


# ----- deterministic text -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", [make_tiny_tokenizer, smollm2], ids=["bytes", "smollm2"])
def test_chat_script_is_deterministic_and_in_range(tokenizer):
    tok = tokenizer()
    spec = mt.ChatSpec(users=6, turns=4, seed=3)
    script = mt.chat_script(spec, tok)
    assert script == mt.chat_script(spec, tok)
    assert script != mt.chat_script(mt.ChatSpec(users=6, turns=4, seed=4), tok)
    assert [len(u) for u in script] == [4] * 6
    lengths = [len(tok.encode(m, add_special_tokens=False)) for u in script for m in u]
    assert all(10 <= n <= 40 for n in lengths) and len(set(lengths)) > 5
    assert [spec.app(u) for u in range(6)] == [0, 1, 2, 0, 1, 2]
    limits = [mt.turn_max_tokens(u, t, 3, 128) for u in range(6) for t in range(1, 5)]
    assert all(64 <= n <= 128 for n in limits) and limits == [
        mt.turn_max_tokens(u, t, 3, 128) for u in range(6) for t in range(1, 5)
    ]
    messages, ids = mt.long_prompt(tok, 1000)
    assert ids == tok.encode_chat(messages) and mt.long_prompt(tok, 1000) == (messages, ids)
    assert messages[0]["content"].startswith("Paragraph 1. ") and len(ids) >= 1000


def test_texts_for_smollm2():
    tok = smollm2()
    assert len(mt.SYSTEM_PROMPTS) == len(mt.APPS) == 3
    assert all(60 <= len(tok.encode(p, add_special_tokens=False)) <= 120 for p in mt.SYSTEM_PROMPTS)
    _, ids = mt.long_prompt(tok, 6000)
    assert 6000 <= len(ids) <= 6050  # one sentence of slack at most


# ----- against a real server ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    """A tiny random model served on loopback: 20 slots (W5's 16 streams and the long prompt), 256 positions."""
    engine, tokenizer = make_test_engine(num_slots=20, max_seq_len=256, max_prefill_len=128)
    with running_server(engine, tokenizer) as running:
        yield f"127.0.0.1:{running.server.port}", tokenizer


def test_w4_end_to_end(server):
    target, tokenizer = server
    # users 0 and 2 share the first system prompt; 3 users x 2 turns = 6 requests
    spec = mt.ChatSpec(
        users=3, turns=2, stagger_s=0.05, max_tokens=6, message_tokens=(4, 10), system_prompts=("Be brief.", "Be kind.")
    )
    run = mt.run_chat(target, tokenizer, spec, poll_interval=0.02)
    report = mt.chat_report(run)
    assert len(run.exchanges) == 6 and run.skipped == [] and report["failures"] == []
    assert [e.record.sent_at for e in run.exchanges] == sorted(e.record.sent_at for e in run.exchanges)
    assert report["tokenizer_mismatches"] == []  # the client counted the server's prompt ids
    by = {(e.user, e.turn): e for e in run.exchanges}
    for u in range(3):
        first, second = by[u, 1], by[u, 2]
        assert 3 <= first.max_tokens <= 6 and 1 <= first.record.output_tokens <= first.max_tokens
        # the whole history is resent, with the streamed reply as the assistant message
        assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "user"]
        assert second.messages[:2] == first.messages and second.messages[2]["content"] == first.text
        assert second.prompt_ids[: len(first.prompt_ids)] == first.prompt_ids
        assert second.ideal_tokens <= len(second.prompt_ids) - len(first.prompt_ids)  # its own history was seen
        for e in (first, second):
            assert 0 <= e.cached_tokens <= e.server_prompt_tokens and 0 <= e.ideal_tokens <= e.server_prompt_tokens
    # user 2 opened with user 0's system prompt, already seen
    system = len(tokenizer.encode_chat([{"role": "system", "content": "Be brief."}], add_generation_prompt=False))
    assert by[2, 1].ideal_tokens <= len(by[2, 1].prompt_ids) - system
    o = report["overall"]
    assert (o["requests"], o["completed"], o["failed"], o["skipped"]) == (6, 6, 0, 0)
    assert o["prompt_tokens"] == sum(len(e.prompt_ids) for e in run.exchanges)
    assert o["computed_tokens"] == o["prompt_tokens"] - o["cached_tokens"]
    assert o["ideal_tokens"] == sum(e.ideal_tokens for e in run.exchanges)
    assert o["hit_rate"] == pytest.approx(o["cached_tokens"] / o["prompt_tokens"])
    assert o["output_tokens_per_s"] == pytest.approx(o["output_tokens"] / o["duration_s"])
    assert [t["ttft_ms"]["count"] for t in report["by_turn"]] == [3, 3]
    load = report["server_load"]
    assert load["polls"] >= 1 and load["errors"] == 0 and load["max"]["slots_total"] == 20
    if PAGE_FIELDS:  # the page pool's fields, when this server reports them
        assert set(load["kv_pages"]) == set(PAGE_FIELDS) and load["max"]["kv_pages_total"] > 0
    else:
        assert load["kv_pages"] is None


def test_w4_refused_turns_end_their_conversations(server):
    from bench import runner

    target, _ = server
    # the real system prompts run to ~500 tokens of the byte-level tokenizer: past the 256-token context
    opts = runner.Options(
        random_model="tiny", workload="w4", users=2, turns=2, w4_stagger_s=0.0, max_tokens=4, progress=False
    )
    figures = runner._json_safe(mt.run_workload(opts, target))
    assert figures["workload"] == "W4" and figures["overall"]["failed"] == 2
    assert {f["status"] for f in figures["failures"]} == {"INVALID_ARGUMENT"}
    assert figures["skipped"] == [{"user": 0, "turn": 2}, {"user": 1, "turn": 2}]
    assert figures["by_turn"][1]["requests"] == 0 and figures["by_turn"][1]["skipped"] == 2
    assert figures["overall"]["computed_over_ideal"] is None  # nothing completed: no ratio
    assert "0/2 ok, 2 failed, 2 not sent" in mt.headline(figures)[0]


def test_w5_end_to_end(server):
    target, tokenizer = server
    w5 = mt.run_long_prompt(target, tokenizer, max_tokens=24, long_prompt_tokens=150)
    streams, lp = w5["streams"], w5["long_prompt"]
    assert streams["completed"] == 16 and streams["output_tokens"] == 16 * 24
    assert lp["prompt_tokens"] >= 150 and w5["itl_ms_baseline"]["count"] > 0
    base_start, sent = w5["baseline_window_s"]
    assert base_start < sent == lp["sent_at_s"]
    if lp["status"] == "OK":  # read in chunks when longer than a prefill call
        assert lp["server_prompt_tokens"] == lp["prompt_tokens"] and lp["ttft_ms"] > 0
        assert w5["prefill_window_s"] == [sent, pytest.approx(sent + lp["ttft_ms"] / 1e3)]
        assert w5["itl_ms_during_prefill"]["count"] > 0 and w5["failed"] == 0
    else:  # a server that reads a prompt in one call refuses one longer than that call
        assert lp["status"] == "INVALID_ARGUMENT" and w5["failed"] == 1
    # longer than the context: refused, recorded as the result
    w5 = mt.run_long_prompt(target, tokenizer, max_tokens=24, long_prompt_tokens=400)
    lp = w5["long_prompt"]
    assert lp["status"] == "INVALID_ARGUMENT" and lp["error"] and lp["ttft_ms"] is None
    assert w5["failures"] == [{"request_id": "long-prompt", "status": "INVALID_ARGUMENT", "error": lp["error"]}]
    assert w5["prefill_window_s"] is None and w5["itl_ms_during_prefill"]["count"] == 0
    assert w5["streams"]["completed"] == 16
    assert "failed INVALID_ARGUMENT" in mt.headline({"workload": "W5", **w5})[0]
