"""The scheduler against the mock engine (engine.mock_engine): no model, no compile, outputs computed by hand.

The mock's rule: a request for the prompt [..., x] produces x+1, x+2, ... (mod the vocabulary of 256); with the
tiny byte-level tokenizer id b is the byte b, so 65, 66, 67 read "ABC". Pages go through the real PagePool by the
real engine's bookkeeping, so admission, preemption and page accounting are the real engine's.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pathlib

import pytest

from engine import scheduler as scheduler_module
from engine.api import EngineConfig, EngineLike
from engine.engine import Engine
from engine.mock_engine import MOCK_CONFIG, MockEngine
from engine.sampling import SamplingParams
from engine.scheduler import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    QueueFullError,
    Request,
    RequestOutput,
    Scheduler,
)
from engine.tokenizer import make_tiny_tokenizer

VOCAB = 256
TOKENIZER = make_tiny_tokenizer(VOCAB)


def expected(prompt: list[int], n: int) -> list[int]:
    """The mock's first n tokens for `prompt`, by hand: the last prompt token + 1, + 2, ... (mod VOCAB)."""
    return [(prompt[-1] + 1 + i) % VOCAB for i in range(n)]


class Run:
    """A scheduler over a mock engine, collecting each request's outputs."""

    def __init__(self, config: EngineConfig = MOCK_CONFIG, **scheduler_kwargs) -> None:
        self.engine = MockEngine(config)
        self.scheduler = Scheduler(self.engine, TOKENIZER, **scheduler_kwargs)
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.requests: dict[str, Request] = {}
        self.started: list[str] = []  # request ids in the order their first output arrived

    def submit(
        self, rid: str, prompt: list[int], params: SamplingParams, priority: int = 0, generated: list[int] | None = None
    ) -> Request:
        def sink(out: RequestOutput) -> None:
            if out.request_id not in self.outputs:
                self.started.append(out.request_id)
            self.outputs.setdefault(out.request_id, []).append(out)

        arrival = float(len(self.requests))  # explicit arrival order: ties in priority keep it
        req = Request(rid, prompt, params, sink, priority=priority, arrival=arrival, generated=list(generated or ()))
        self.scheduler.submit(req)
        self.requests[rid] = req
        return req

    def step(self) -> None:
        self.scheduler.step()
        self.engine.pool.check()

    def finish(self, max_steps: int = 500) -> None:
        """Steps until idle; then every page must be accounted for, none held or reserved."""
        for _ in range(max_steps):
            if not self.scheduler.has_work():
                break
            self.step()
        assert not self.scheduler.has_work()
        assert self.engine.pool.used == 0 and self.engine.pool.reserved == 0
        self.engine.pool.check()

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs.get(rid, []) for t in o.token_ids]

    def text(self, rid: str) -> str:
        return "".join(o.text for o in self.outputs[rid])

    def last(self, rid: str) -> RequestOutput:
        outs = self.outputs[rid]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        return outs[-1]


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kwargs)


# ----- the interface ------------------------------------------------------------------------------------------------


def engine_attributes_the_scheduler_uses() -> set[str]:
    """Every `engine.X` / `self.engine.X` the scheduler module reads or calls."""
    tree = ast.parse(pathlib.Path(inspect.getfile(scheduler_module)).read_text())
    used = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if (isinstance(owner, ast.Name) and owner.id == "engine") or (
            isinstance(owner, ast.Attribute) and owner.attr == "engine" and isinstance(owner.value, ast.Name)
        ):
            used.add(node.attr)
    return used


def protocol_members() -> set[str]:
    names = set(EngineLike.__annotations__)
    names |= {
        n for n, v in vars(EngineLike).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))
    }
    return names


def test_engine_like_lists_exactly_what_the_scheduler_uses():
    assert protocol_members() == engine_attributes_the_scheduler_uses()


def test_both_engines_offer_every_member_of_engine_like():
    mock = MockEngine()
    for name in protocol_members():
        assert hasattr(mock, name), name
    methods = {n for n in protocol_members() if n not in EngineLike.__annotations__}
    for name in methods:  # the real engine's data attributes are set in its constructor, which needs a model
        assert callable(getattr(Engine, name)) or isinstance(getattr(Engine, name), property), name


# ----- queue order --------------------------------------------------------------------------------------------------


def test_fifo_within_a_priority_and_lower_value_first():
    run = Run(dataclasses.replace(MOCK_CONFIG, num_slots=1))
    for rid, priority in [("a", 1), ("b", 0), ("c", 1), ("d", 0), ("e", 2)]:
        run.submit(rid, [40], greedy(3), priority=priority)
    run.finish()
    assert run.started == ["b", "d", "a", "c", "e"]
    for rid in "abcde":
        assert run.tokens(rid) == [41, 42, 43] and run.last(rid).finish_reason == FINISH_LENGTH


def test_a_cancelled_waiting_request_never_runs():
    run = Run(dataclasses.replace(MOCK_CONFIG, num_slots=1))
    run.submit("running", [10, 11], greedy(12))
    run.step()
    run.submit("waiting", [20, 21, 22], greedy(5))
    assert run.scheduler.cancel("waiting")
    run.finish()
    out = run.last("waiting")
    assert len(run.outputs["waiting"]) == 1 and out.token_ids == [] and out.completion_tokens == 0
    assert out.finish_reason == FINISH_CANCELLED and out.queue_time is None and out.ttft is None
    assert run.engine.prefix_stats.prompts == 1  # only "running" was ever read
    assert run.tokens("running") == expected([10, 11], 12)
    assert not run.scheduler.cancel("waiting")  # done: nothing to cancel


def test_the_head_of_the_queue_waits_for_pages_and_nothing_overtakes_it():
    """Admission 'reserve' with 12 usable pages of 16: a running request holds 8, the next one needs 8 and waits;
    a small one behind it (2 pages, would fit) waits too."""
    config = dataclasses.replace(MOCK_CONFIG, kv_pages=13, max_seq_len=128)
    run = Run(config)
    run.submit("big", [5] * 16, greedy(112))  # 128 positions: 8 pages
    run.step()
    run.submit("next", [6] * 16, greedy(100))  # 8 pages
    run.submit("small", [7], greedy(8))  # 1 page: fits, but may not overtake
    for _ in range(5):
        run.step()
        assert "next" not in run.started and "small" not in run.started
    run.finish()
    assert run.started == ["big", "next", "small"]
    assert run.tokens("small") == expected([7], 8)


def test_queue_bound():
    run = Run(dataclasses.replace(MOCK_CONFIG, num_slots=1), max_waiting=2)
    for rid in "abc":  # the free slot does not count against the bound
        run.submit(rid, [30], greedy(8))
    with pytest.raises(QueueFullError, match="waiting queue is full"):
        run.submit("d", [30], greedy(8))
    run.step()  # "a" takes the slot: two wait, the bound
    with pytest.raises(QueueFullError):
        run.submit("d", [30], greedy(8))
    run.finish()
    assert run.started == ["a", "b", "c"] and "d" not in run.outputs
    run.submit("d", [30], greedy(8))  # a unique id may be used again once its request is gone
    run.finish()
    assert run.tokens("d") == expected([30], 8)


# ----- prefill ------------------------------------------------------------------------------------------------------


def test_token_budget_splits_a_long_prompt_while_others_decode():
    """With a budget of 16 prompt tokens per step while a slot decodes, a 40-token prompt is read over three steps
    (16, 16, 8), and the running request gets a dispatch (decode_steps = 4 tokens) in each of them."""
    run = Run(prefill_token_budget=16)
    run.submit("short", [50, 51, 52, 53], greedy(30))
    run.step()  # nothing decodes yet: read whole, then the first dispatch
    assert run.engine.prefill_log == [4] and len(run.tokens("short")) == 1 + 4
    long_prompt = list(range(60, 100))
    run.submit("long", long_prompt, greedy(6))
    reading = []
    for _ in range(3):
        run.step()
        reading.append((run.engine.prefill_log[-1], len(run.tokens("short")), len(run.tokens("long"))))
    assert reading == [(16, 9, 0), (16, 13, 0), (8, 17, 1 + 4)]
    run.finish()
    assert run.tokens("long") == expected(long_prompt, 6) and run.last("long").prompt_tokens == 40
    assert run.tokens("short") == expected([50, 51, 52, 53], 30)


def test_a_dispatch_runs_only_the_steps_left_and_its_prefill_shrinks_with_it():
    """The running request has 2 tokens left: the dispatch is 2 steps (not decode_steps = 4) and carries 2/4 of the
    budget (8 of 16 tokens), so the tokens it streams wait as long per token as in a full dispatch; once nothing
    decodes, the rest of the prompt is read at once."""
    run = Run(prefill_token_budget=16)
    run.submit("short", [50, 51, 52, 53], greedy(7))
    run.step()
    assert len(run.tokens("short")) == 1 + 4
    long_prompt = list(range(60, 100))
    run.submit("long", long_prompt, greedy(6))
    plan = run.scheduler.step()
    assert (plan.decode_steps, plan.prefill_budget, run.engine.prefill_log[-1]) == (2, 8, 8)
    assert run.last("short").finish_reason == FINISH_LENGTH and len(run.tokens("short")) == 7
    plan = run.scheduler.step()
    assert (plan.decode_steps, plan.prefill_budget, run.engine.prefill_log[-1]) == (None, None, 32)
    run.finish()
    assert run.tokens("long") == expected(long_prompt, 6)


def test_dispatches_stay_full_while_a_prompt_is_read_in_chunks():
    """Short dispatches while a slot is free (`free_slot_decode_steps`) speed an arrival's prefill; while a long
    prompt is read they would pay each chunk once per step, so the dispatch keeps its full length."""
    run = Run(prefill_token_budget=16, free_slot_decode_steps=1)
    run.submit("short", [50, 51, 52, 53], greedy(40))
    assert run.scheduler.step().decode_steps == 1  # slots free, nothing read in chunks
    run.submit("long", list(range(60, 100)), greedy(6))
    plans = [run.scheduler.step() for _ in range(3)]
    assert [(p.decode_steps, p.prefill_budget) for p in plans] == [(1, 16), (None, 16), (None, 16)]
    assert run.engine.prefill_log[-3:] == [16, 16, 8]
    run.finish()
    assert run.tokens("short") == expected([50, 51, 52, 53], 40)


def test_without_a_budget_every_admitted_prompt_is_read_at_once():
    run = Run(prefills_per_step=4)
    for i in range(3):
        run.submit(f"r{i}", list(range(10 * i, 10 * i + 30)), greedy(5))
    run.step()
    assert run.engine.prefill_log == [90] and run.started == ["r0", "r1", "r2"]
    run.finish()
    for i in range(3):
        assert run.tokens(f"r{i}") == expected(list(range(10 * i, 10 * i + 30)), 5)


# ----- where a request ends ----------------------------------------------------------------------------------------


def test_stop_token_ids_cut_exactly():
    run = Run()
    run.submit("stop", [60], greedy(20, stop_token_ids=(66,)))  # 61 .. 66
    run.submit("first", [60], greedy(20, stop_token_ids=(61,)))  # ends at its first token, in the prefill
    run.finish()
    out = run.last("stop")
    assert run.tokens("stop") == [61, 62, 63, 64, 65, 66] and out.completion_tokens == 6
    assert out.finish_reason == FINISH_STOP and run.text("stop") == "=>?@AB"
    assert run.tokens("first") == [61] and run.last("first").completion_tokens == 1
    assert run.last("first").finish_reason == FINISH_STOP


def test_eos_ends_a_request_unless_ignored():
    run = Run()
    run.submit("eos", [252], SamplingParams(max_tokens=10))  # 253, 254, 255, 0, 1 (the tiny EOS)
    run.submit("ignored", [252], greedy(10))
    run.finish()
    assert run.tokens("eos") == [253, 254, 255, 0, 1] and run.last("eos").finish_reason == FINISH_STOP
    assert run.tokens("ignored") == expected([252], 10) and run.last("ignored").finish_reason == FINISH_LENGTH


@pytest.mark.parametrize("others", [0, 3])
def test_stop_strings_cut_ids_text_and_usage_exactly(others):
    """ "CD" is completed by token 68, in the middle of a 4-token dispatch: the request ends there (ids, logprobs and
    completion count), alone or with every slot busy."""
    run = Run()
    run.submit("stop", [60], greedy(40, stop=("CD",), logprobs=2))  # 61 '=' ... 66 'B', 67 'C', 68 'D'
    for i in range(others):
        run.submit(f"busy{i}", [100 + i], greedy(30))
    run.finish()
    out = run.last("stop")
    assert run.tokens("stop") == list(range(61, 69)) and out.completion_tokens == 8
    assert run.text("stop") == "=>?@AB" and out.finish_reason == FINISH_STOP
    lps = [lp for o in run.outputs["stop"] for lp in o.logprobs or []]
    assert [lp.top[0][0] for lp in lps] == list(range(61, 69)) and all(lp.logprob == 0.0 for lp in lps)
    for i in range(others):
        assert run.tokens(f"busy{i}") == expected([100 + i], 30)


def test_a_resumed_stream_matches_stop_strings_across_the_cut():
    """Failover: a stream cut after k tokens resumes with them as `generated`. The cut stream had held back text that
    might begin a stop string ("C", "CD" of "CDX"); the resuming scheduler emits it when it turns out not to be one,
    so the two streams' texts join into the uninterrupted text for every k; and "CD" begun before the cut and
    completed after it still stops the request."""
    whole_ids = list(range(61, 73))  # the mock's 12 tokens after 60: "=>?@ABCDEFGH"
    whole_text = "".join(chr(t) for t in whole_ids)
    for k in range(1, 12):
        run = Run()
        run.submit("r", [60], greedy(12, stop=("CDX",)), generated=whole_ids[:k])
        run.finish()
        shown = whole_text[:k]  # what the cut stream showed: all but a tail that may begin "CDX"
        shown = shown[: -len(held)] if (held := next((h for h in ("CD", "C") if shown.endswith(h)), "")) else shown
        assert run.tokens("r") == whole_ids[k:], k
        assert shown + run.text("r") == whole_text, (k, shown, run.text("r"))
        out = run.last("r")
        assert out.finish_reason == FINISH_LENGTH and out.completion_tokens == 12
    # "CD": cut after "C" (held back, never shown), "D" completes it on the resuming replica
    run = Run()
    run.submit("r", [60], greedy(40, stop=("CD",)), generated=list(range(61, 68)))
    run.finish()
    out = run.last("r")
    assert run.tokens("r") == [68] and run.text("r") == "" and out.finish_reason == FINISH_STOP
    assert out.completion_tokens == 8  # as the uninterrupted stream (test_stop_strings_cut_ids_text_and_usage_exactly)
    # a stop string already whole in the resumed tokens: that stream ended there; nothing is emitted again
    run = Run()
    run.submit("r", [60], greedy(40, stop=("CD",)), generated=list(range(61, 69)))
    run.finish()
    out = run.last("r")
    assert run.tokens("r") == [] and run.text("r") == "" and out.finish_reason == FINISH_STOP
    assert out.completion_tokens == 8


def test_a_resumed_stream_with_stop_strings_joins_where_text_was_held_back():
    """Cut where a router cuts - after a message with text - and resumed there, a stream with a stop string gives the
    uninterrupted tokens and text, also where the cut stream held back bytes: from 126 on the mock's tokens are "~",
    DEL, then lone continuation bytes (U+FFFD, held back until a character completes) until they wrap to 0, and "~"
    may begin the stop string "~X"."""
    whole = Run()
    whole.submit("r", [120], greedy(140, stop=("~X",)))
    whole.finish()
    outputs = whole.outputs["r"]
    assert whole.tokens("r") == expected([120], 140) and whole.last("r").finish_reason == FINISH_LENGTH
    cuts = [i + 1 for i, o in enumerate(outputs[:-1]) if o.text]
    assert any(outputs[i - 1].token_ids[-1] in range(128, 192) for i in cuts)  # a cut with bytes held back
    for n in cuts:
        shown, ids = "".join(o.text for o in outputs[:n]), [t for o in outputs[:n] for t in o.token_ids]
        run = Run()
        run.submit("r", [120], greedy(140, stop=("~X",)), generated=ids)
        run.finish()
        assert ids + run.tokens("r") == whole.tokens("r"), n
        assert shown + run.text("r") == whole.text("r"), (n, shown, run.text("r"))


@pytest.mark.parametrize("max_tokens", [1, 2, 4, 5, 9])
def test_max_tokens(max_tokens):
    run = Run()
    run.submit("r", [70, 71], greedy(max_tokens))
    run.finish()
    out = run.last("r")
    assert run.tokens("r") == expected([70, 71], max_tokens) and out.completion_tokens == max_tokens
    assert out.finish_reason == FINISH_LENGTH and out.prompt_tokens == 2


# ----- preemption ---------------------------------------------------------------------------------------------------

GROW = EngineConfig(
    num_slots=3,
    max_seq_len=32,
    max_prefill_len=32,
    min_prefill_len=8,
    page_size=4,
    decode_steps=4,
    kv_pages=11,  # 10 usable pages of 4 positions; three requests growing to 28 positions need 21
    admission="grow",
    dtype="float32",
)


def test_preemption_takes_the_lowest_priority_youngest_and_resumes_it_exactly():
    run = Run(GROW)
    prompts = {"a": [10, 20, 30, 5], "b": [11, 21, 31, 105], "c": [12, 22, 32, 205]}
    for rid, priority in [("a", 0), ("b", 0), ("c", 1)]:
        run.submit(rid, prompts[rid], greedy(24), priority=priority)
    order = []  # request ids in the order they were preempted
    while run.scheduler.has_work():
        running = [r for r in run.requests.values() if r.slot is not None and not r.finished]
        before = {rid: r.preemptions for rid, r in run.requests.items()}
        run.step()
        hit = [rid for rid, r in run.requests.items() if r.preemptions > before[rid]]
        # what yields first: the highest (priority, arrival) of the requests running before the step
        yielding = sorted(running, key=lambda r: (r.priority, r.arrival), reverse=True)[: len(hit)]
        assert sorted(hit) == sorted(r.request_id for r in yielding)
        order += hit
        assert len(order) < 20
    assert order == ["c", "b"]  # priority 1 first, then the younger of the two of priority 0
    assert run.scheduler.stats().preemptions == 2
    for rid, prompt in prompts.items():
        out = run.last(rid)
        assert run.tokens(rid) == expected(prompt, 24), rid  # one uninterrupted stream, as if never preempted
        assert out.completion_tokens == 24 and out.prompt_tokens == 4 and out.finish_reason == FINISH_LENGTH
    assert run.requests["a"].preemptions == 0
    run.finish()


def test_reserve_admission_never_preempts():
    run = Run(dataclasses.replace(GROW, admission="reserve"))
    prompts = {rid: [40 + i, 50 + i, 60 + i, 7 * i] for i, rid in enumerate("abc")}
    for rid, prompt in prompts.items():
        run.submit(rid, prompt, greedy(24))
    run.finish()
    assert run.scheduler.stats().preemptions == 0
    for rid, prompt in prompts.items():
        assert run.tokens(rid) == expected(prompt, 24)
