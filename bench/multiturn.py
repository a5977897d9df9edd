"""W4 multi-turn chat and W5 long prompt: two serving workloads driven against a running MeshServe server over gRPC.

W4 (shared/PERFORMANCE.md): `users` conversations of `turns` turns, started `stagger_s` apart and running at once.
Each user belongs to one of three applications and shares its system prompt with the other users of that
application; every turn appends a user message (its length drawn in `message_tokens`, deterministically from the
seed) and resends the whole history as chat messages, greedy, with at most `max_tokens` new tokens (drawn in
[max_tokens / 2, max_tokens]); the reply text the server streamed becomes the assistant message of the history, as
a chat client does, and the next turn starts when the reply has finished. A failed turn ends its conversation: the
failure is reported, and so are the turns never sent.

Per turn and overall:
- prompt tokens: the server's Usage.prompt_tokens; cached: its Usage.cached_tokens; computed = prompt - cached.
- ideal: the prompt tokens the server had not seen yet. Each prompt is tokenized on the client with the server's
  tokenizer and chat template; a request's ideal is its length beyond the longest common prefix with (prompt +
  completion received so far) of any request sent before it, any user's (a shared system prompt counts as seen).
  Requests refused before admission count as never seen.
- computed / ideal (1.0: the server reused everything it could), hit rate = cached / prompt, TTFT p50 / p99 by
  turn, output tokens/s, failures; and from GetLoad, polled during the run, the most of every numeric field of
  `Load` (KV pages where the server reports them; null where it does not).

W5: 16 streams decode the W2 prompts (exactly `max_tokens` each) when a long chat prompt (`long_prompt_tokens`:
numbered paragraphs of text, grown until the tokenizer counts that many) arrives, once every stream has a third of
its tokens. Reported: the streams' inter-token latency (p50 / p99) in the baseline window (every stream decoding,
before the long prompt is sent) and in the window while it is prefilled (sent to its first token), and the long
prompt's TTFT. A server that refuses the long prompt gives a failed request with its status and message as the
result.

Neither workload sends warm-up requests: they would seed the server's prefix cache with prompts the ideal count
does not know of.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from google.protobuf import descriptor
from tqdm import tqdm

from bench import serve_client, stats, workloads
from bench.stats import RequestRecord
from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from bench.runner import Options
    from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

WORKLOADS = ("w4", "w5")
W5_STREAMS = 16
"""Streams decoding when W5's long prompt arrives (shared/PERFORMANCE.md)."""
LONG_PROMPT_MAX_TOKENS = 16
"""Tokens the long prompt generates: its TTFT is the figure, a short reply keeps the run short."""
LOAD_POLL_S = 0.1
"""Seconds between two GetLoad polls during a W4 run."""

# ----- W4 text ----------------------------------------------------------------------------------------------------

APPS = ("recipes", "isp_support", "python_tutor")
SYSTEM_PROMPTS = (
    "You are Sous, the cooking assistant of the FreshCrate recipe app. Help home cooks plan meals, adapt recipes "
    "to what they have in the pantry, and fix dishes that went wrong. Give quantities in both metric and US units, "
    "name oven temperatures in Celsius and Fahrenheit, and always mention common allergens such as nuts, gluten, "
    "dairy and shellfish. Keep answers short and practical, use numbered steps for methods, and ask one "
    "clarifying question when a request is ambiguous.",
    "You are the support assistant of Northwind Fiber, a home internet provider. Help customers troubleshoot "
    "slow or dropped connections, understand their monthly bill, and change or cancel their plan. Walk through "
    "router checks one step at a time and wait for the customer to report back before moving on. Never ask for a "
    "full password or card number. If a problem needs a technician, offer to book a visit and explain that "
    "visits are free when the fault is on our side.",
    "You are Pip, a patient Python tutor for beginners on the CodePath learning platform. Explain concepts in "
    "plain language before showing code, keep examples under fifteen lines, and use Python 3.12 syntax. When a "
    "student shares broken code, point out the first error, explain why it happens, and let the student try a "
    "fix before giving the full answer. Encourage good habits: clear names, small functions and tests.",
)
"""One system prompt per application (85-94 tokens each with SmolLM2's tokenizer)."""

_QUESTIONS = (
    (
        "What can I cook tonight with chickpeas, spinach, half an onion and a tin of tomatoes?",
        "My bread came out dense and flat again. What am I doing wrong?",
        "How long should I roast a whole chicken of about one and a half kilos?",
        "Can you turn this lasagna recipe into something vegetarian?",
        "Is it safe to freeze cooked rice, and how do I reheat it?",
        "What is a good substitute for buttermilk in pancakes?",
        "How do I stop my risotto from turning into glue?",
        "Could you plan three weeknight dinners that share most of their ingredients?",
    ),
    (
        "My internet keeps dropping every evening around eight. What should I check first?",
        "Why is my bill higher this month than last month?",
        "The router lights are orange instead of white. What does that mean?",
        "I want to move to the cheaper plan. How does that work?",
        "Video calls freeze but web pages load fine. Can you help?",
        "How do I change the name and password of my Wi-Fi network?",
        "I am moving house next month. Can I take my service with me?",
        "The speed test shows a third of what I pay for. Is something wrong?",
    ),
    (
        "What is the difference between a list and a tuple?",
        "Why does my loop print the last item three times?",
        "Can you explain what a dictionary comprehension does?",
        "I get a KeyError when I read my JSON file. What does it mean?",
        "How do I write a function that returns two values?",
        "What does the self parameter do in a class?",
        "How should I read a large CSV file without running out of memory?",
        "When should I use a while loop instead of a for loop?",
    ),
)
_DETAILS = (
    (
        "I have about forty minutes and only one pan.",
        "Two of us are eating and one does not like anything spicy.",
        "My oven runs a little hot, so keep that in mind.",
        "I would rather avoid dairy if it is easy to do so.",
        "Please keep the shopping list short because the store is far away.",
        "I am a fairly new cook, so explain any technique you mention.",
    ),
    (
        "I already restarted the router twice today.",
        "My account number ends in 4471 if that helps.",
        "Everyone in the house works from home on weekdays.",
        "The router sits in a cupboard in the hallway.",
        "We have about twelve devices connected most of the time.",
        "I am on the three hundred megabit plan since last spring.",
    ),
    (
        "I am using Python 3.12 on a laptop with Windows.",
        "This is for a homework exercise, so please do not just give me the answer.",
        "I read the documentation but the example confused me.",
        "My teacher said it has something to do with references.",
        "A short example with comments would help me a lot.",
        "I only started learning to program two weeks ago.",
    ),
)

_LONG_TOPICS = (
    "The harbor ledger records every ship that docked at Elmsford, with its cargo, its crew and the weather.",
    "Inspectors weighed each crate of wool and wrote the weight beside the name of the farm it came from.",
    "In dry summers the river ran low, and the larger barges waited downstream for the autumn rains.",
    "The customs house kept its own clock, which was wound each morning by the youngest clerk on duty.",
    "Merchants paid their fees in silver, in grain or, when both were short, in promises written on slate.",
    "A lamp burned at the end of the pier all night so that late boats could find the channel.",
    "Fishermen sold the morning catch at the steps below the market before the bell rang at nine.",
)
LONG_PROMPT_INSTRUCTION = "Summarize the ledger above in three sentences, naming the busiest season."


@dataclasses.dataclass(frozen=True)
class ChatSpec:
    """What a W4 run sends: the users, their turns and the limits of each message and reply."""

    users: int = 16
    turns: int = 8
    stagger_s: float = 0.5
    """Seconds between two users' first turns."""
    max_tokens: int = workloads.OUTPUT_TOKENS
    """Most new tokens of a reply; each turn draws its own limit in [max_tokens // 2, max_tokens]."""
    message_tokens: tuple[int, int] = (10, 40)
    """Least and most tokens of a user message."""
    system_prompts: tuple[str, ...] = SYSTEM_PROMPTS
    """One per application; user u belongs to application u % len(system_prompts)."""
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.message_tokens
        if self.users < 1 or self.turns < 1 or self.max_tokens < 1:
            raise ValueError(
                f"W4 needs users, turns, max_tokens >= 1, got {self.users}, {self.turns}, {self.max_tokens}"
            )
        if self.stagger_s < 0 or not 1 <= lo <= hi:
            raise ValueError(f"W4 needs stagger_s >= 0, 1 <= message tokens lo <= hi, got {self.stagger_s}, {lo}, {hi}")
        if not self.system_prompts:
            raise ValueError("W4 needs at least one system prompt")

    def app(self, user: int) -> int:
        return user % len(self.system_prompts)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in keys])


def user_message(tokenizer: Tokenizer, app: int, user: int, turn: int, seed: int, tokens: tuple[int, int]) -> str:
    """The user's message of a turn: a question of its application's pool and details after it, cut at a word so
    that it holds a number of tokens drawn in `tokens` (inclusive); the same for the same arguments."""
    rng = _rng(seed, user, turn)
    lo, hi = tokens
    target = int(rng.integers(lo, hi + 1))
    questions, details = _QUESTIONS[app % len(_QUESTIONS)], _DETAILS[app % len(_DETAILS)]
    pieces = [questions[int(rng.integers(len(questions)))]]
    # details in a drawn order, cycled if a long target needs more words than the pool holds
    order = [details[int(i)] for i in rng.permutation(len(details))]
    while sum(len(p.split()) for p in pieces) < 2 * hi:
        pieces += order
    words = " ".join(pieces).split()

    def count(k: int) -> int:
        return len(tokenizer.encode(" ".join(words[:k]), add_special_tokens=False))

    k = 1
    while k < len(words) and count(k) < target:
        k += 1
    if count(k) > hi and k > 1:
        k -= 1
    return " ".join(words[:k])


def turn_max_tokens(user: int, turn: int, seed: int, max_tokens: int) -> int:
    """The reply limit of a turn, drawn in [max_tokens // 2, max_tokens] (at least 1)."""
    return int(_rng(seed, user, turn, 1).integers(max(1, max_tokens // 2), max_tokens + 1))


def chat_script(spec: ChatSpec, tokenizer: Tokenizer) -> list[list[str]]:
    """Every user's messages, turn by turn: script[user][turn - 1]."""
    return [
        [user_message(tokenizer, spec.app(u), u, t, spec.seed, spec.message_tokens) for t in range(1, spec.turns + 1)]
        for u in range(spec.users)
    ]


# ----- one streamed request ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Exchange:
    """One request as the client saw it: its timings and status (`record`, times on the run's clock), the chat it
    sent, and what came back."""

    record: RequestRecord
    messages: tuple[Mapping[str, str], ...] = ()
    user: int = -1
    turn: int = 0
    app: int = -1
    max_tokens: int = 0
    prompt_ids: list[int] | None = None
    """The prompt as the client tokenized it (the server's tokenizer and chat template); set after the run."""
    completion_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    server_prompt_tokens: int | None = None
    """Usage.prompt_tokens (None when the stream ended without usage)."""
    cached_tokens: int | None = None
    """Usage.cached_tokens."""
    ideal_tokens: int | None = None

    @property
    def admitted(self) -> bool:
        """Whether the server took the request in (refused requests were never seen)."""
        return self.record.ok or self.record.ttft is not None

    def seen_at(self, at: float) -> list[int]:
        """The tokens the server had of this request at `at` (run clock): its prompt and the completion so far."""
        received = sum(n for t, n in self.record.chunks if self.record.sent_at + t <= at)
        return [*(self.prompt_ids or ()), *self.completion_ids[:received]]


def stream_exchange(
    stub: pb_grpc.MeshServeStub,
    request: pb.GenerateRequest,
    exchange: Exchange,
    timeout: float,
    on_tokens: Callable[[int], None] | None = None,
) -> Exchange:
    """Streams `request`, filling `exchange` (its record's `sent_at` already set); never raises for an RPC failure.
    `on_tokens` gets the running count of tokens received after each chunk that carried some."""
    text = []

    def seen(msg: Any, record: RequestRecord) -> None:
        if msg.token_ids:
            exchange.completion_ids.extend(msg.token_ids)
            if on_tokens is not None:
                on_tokens(record.output_tokens)
        text.append(msg.text)
        if msg.HasField("usage"):
            exchange.server_prompt_tokens = msg.usage.prompt_tokens
            exchange.cached_tokens = msg.usage.cached_tokens

    serve_client.stream_one(stub, request, timeout, exchange.record.sent_at, record=exchange.record, on_message=seen)
    exchange.text = "".join(text)
    return exchange


def chat_request(
    request_id: str, messages: Sequence[Mapping[str, str]], max_tokens: int, seed: int
) -> pb.GenerateRequest:
    """A greedy chat request; EOS ends the reply, as in a real chat."""
    return pb.GenerateRequest(
        request_id=request_id,
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]),
        sampling=pb.SamplingOptions(temperature=0.0, max_tokens=max_tokens, seed=seed),
    )


# ----- the ideal --------------------------------------------------------------------------------------------------


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))
    return int(differ[0]) if differ.size else n


def ideal_new_tokens(prompt: Sequence[int], seen: Sequence[Sequence[int]]) -> int:
    """Tokens of `prompt` beyond its longest common prefix with any of the `seen` sequences."""
    return len(prompt) - max((common_prefix_len(prompt, s) for s in seen), default=0)


def ideal_tokens(exchanges: Sequence[Exchange]) -> list[int | None]:
    """Each exchange's ideal: its prompt tokens beyond the longest common prefix with what the server held of any
    admitted exchange sent strictly before it (prompt + completion received by then). None without prompt ids."""
    out: list[int | None] = []
    for ex in exchanges:
        if ex.prompt_ids is None:
            out.append(None)
            continue
        at = ex.record.sent_at
        seen = [e.seen_at(at) for e in exchanges if e.admitted and e.prompt_ids is not None and e.record.sent_at < at]
        out.append(ideal_new_tokens(ex.prompt_ids, seen))
    return out


# ----- GetLoad during a run ---------------------------------------------------------------------------------------

_NUMERIC = {
    descriptor.FieldDescriptor.TYPE_INT32,
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT32,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_FLOAT,
    descriptor.FieldDescriptor.TYPE_DOUBLE,
}


class LoadPoller:
    """Polls GetLoad every `interval` seconds in a thread while open, keeping the most and the least of every numeric
    field the server's `Load` has (whatever this proto version defines) and the most KV pages resident (used +
    cached)."""

    def __init__(self, target: str, interval: float = LOAD_POLL_S):
        self.target, self.interval = target, interval
        self.fields = [f.name for f in pb.Load.DESCRIPTOR.fields if f.type in _NUMERIC and not f.is_repeated]
        self.most: dict[str, float] = {}
        self.least: dict[str, float] = {}
        self.most_resident_pages: int | None = None
        self.polls = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-poller", daemon=True)

    def __enter__(self) -> LoadPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.MeshServeStub(channel)
            while True:
                try:
                    self.observe(stub.GetLoad(pb.GetLoadRequest(), timeout=max(self.interval * 10, 5.0)))
                except grpc.RpcError:
                    self.errors += 1
                if self._stop.wait(self.interval):
                    return

    def observe(self, load: pb.Load) -> None:
        self.polls += 1
        for name in self.fields:
            value = getattr(load, name)
            self.most[name] = max(self.most.get(name, value), value)
            self.least[name] = min(self.least.get(name, value), value)
        if {"kv_pages_used", "kv_pages_cached"} <= set(self.fields):
            resident = load.kv_pages_used + load.kv_pages_cached
            self.most_resident_pages = max(self.most_resident_pages or 0, resident)

    def summary(self) -> dict[str, Any]:
        """The most of each field; `kv_pages` null when this server's Load reports no KV pages."""
        page_fields = [n for n in self.fields if "page" in n or "cached" in n]
        return {
            "polls": self.polls,
            "poll_interval_s": self.interval,
            "errors": self.errors,
            "max": dict(self.most),
            "min": dict(self.least),
            "kv_pages": {n: self.most.get(n) for n in page_fields} if page_fields and self.polls else None,
            "most_kv_pages_resident": self.most_resident_pages,
        }


# ----- W4 ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChatRun:
    """Every request a W4 run sent (in send order), the turns it never sent, and the server's load."""

    spec: ChatSpec
    exchanges: list[Exchange]
    skipped: list[tuple[int, int]]
    """(user, turn) of the turns not sent because an earlier turn of that user failed."""
    duration_s: float
    """First send to last completion."""
    load: dict[str, Any]


class GrpcChat:
    """W4's turns as MeshServe Generate calls."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.MeshServeStub(self._channel)

    def send(self, messages: Sequence[Mapping[str, str]], max_tokens: int, seed: int, ex: Exchange, timeout: float):
        stream_exchange(self._stub, chat_request(ex.record.request_id, messages, max_tokens, seed), ex, timeout)

    def close(self) -> None:
        self._channel.close()


class HttpChat:
    """W4's turns as streamed OpenAI chat completions (bench/openai_client.py). The API returns text, not token ids:
    the reply's ids (what the ideal counts as seen) are the reply text tokenized with `tokenizer`, and its tokens are
    spread evenly over its deltas."""

    def __init__(self, target: str, tokenizer: Tokenizer, *, model: str | None = None, api_key: str | None = None):
        from bench import openai_client

        self._oc, self._tokenizer = openai_client, tokenizer
        self._model = model or openai_client.model_info(target, api_key)["model_name"]
        self._loop = openai_client.LoopThread("w4-http")

        async def session() -> Any:  # an aiohttp session belongs to the loop it is made in
            return openai_client.async_client(target, 600.0, api_key)

        self._client = self._loop.call(session())

    def send(self, messages: Sequence[Mapping[str, str]], max_tokens: int, seed: int, ex: Exchange, timeout: float):
        body = self._oc.chat_body(list(messages), self._model, max_tokens, seed)
        result = self._loop.call(self._oc.stream_request(self._client, self._oc.CHAT_PATH, body, ex.record))
        ex.text = result.text
        ex.server_prompt_tokens = None if result.usage is None else ex.record.prompt_tokens
        ex.cached_tokens = ex.record.cached_tokens
        ex.completion_ids = self._tokenizer.encode(result.text, add_special_tokens=False) if result.text else []

    def close(self) -> None:
        self._loop.call(self._client.close())
        self._loop.close()


class _NoPoller:
    """Stands in for LoadPoller where no gRPC API answers GetLoad (an OpenAI target alone)."""

    def __enter__(self) -> _NoPoller:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {
            "polls": 0,
            "poll_interval_s": None,
            "errors": 0,
            "max": {},
            "min": {},
            "kv_pages": None,
            "most_kv_pages_resident": None,
        }


def run_chat(
    target: str,
    tokenizer: Tokenizer,
    spec: ChatSpec,
    *,
    timeout: float = 600.0,
    poll_interval: float = LOAD_POLL_S,
    on_done: Callable[[Exchange], None] | None = None,
    api: str = "grpc",
    load_target: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
) -> ChatRun:
    """Runs W4 against the server at `target`; `tokenizer` must be the server's (for the ideal). `api`: "grpc"
    (`target` is "host:port" of a MeshServe server) or "openai" (`target` is the base URL of an OpenAI-compatible
    API, such as the gateway's; `model` the name to send, default its first). GetLoad is polled on `load_target`
    (default: `target` over gRPC; none over OpenAI unless given)."""
    if api not in ("grpc", "openai"):
        raise ValueError(f"api must be 'grpc' or 'openai', got {api!r}")
    script = chat_script(spec, tokenizer)
    exchanges: list[Exchange] = []
    skipped: list[tuple[int, int]] = []
    lock = threading.Lock()
    if api == "grpc":
        transport: GrpcChat | HttpChat = GrpcChat(target)
        load_target = load_target or target
    else:
        transport = HttpChat(target, tokenizer, model=model, api_key=api_key)
    start = time.perf_counter()

    def converse(user: int) -> None:
        delay = start + user * spec.stagger_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        app = spec.app(user)
        history: list[Mapping[str, str]] = [{"role": "system", "content": spec.system_prompts[app]}]
        for turn, message in enumerate(script[user], 1):
            history.append({"role": "user", "content": message})
            limit = turn_max_tokens(user, turn, spec.seed, spec.max_tokens)
            record = RequestRecord(f"u{user}-t{turn}", sent_at=time.perf_counter() - start)
            ex = Exchange(record, tuple(history), user=user, turn=turn, app=app, max_tokens=limit)
            transport.send(list(history), limit, spec.seed + 1000 * user + turn, ex, timeout)
            with lock:
                exchanges.append(ex)
            if on_done is not None:
                on_done(ex)
            if not record.ok:
                with lock:
                    skipped.extend((user, t) for t in range(turn + 1, spec.turns + 1))
                return
            history.append({"role": "assistant", "content": ex.text})

    poller = LoadPoller(load_target, poll_interval) if load_target else _NoPoller()
    try:
        with poller:
            threads = [threading.Thread(target=converse, args=(u,), daemon=True) for u in range(spec.users)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        transport.close()
    exchanges.sort(key=lambda e: e.record.sent_at)
    for ex in exchanges:
        try:
            ex.prompt_ids = tokenizer.encode_chat(list(ex.messages))
        except ValueError as exc:  # the server's template would have refused it too
            log.warning("cannot tokenize %s: %s", ex.record.request_id, exc)
    for ex, ideal in zip(exchanges, ideal_tokens(exchanges), strict=True):
        ex.ideal_tokens = ideal
    end = max((e.record.sent_at + (e.record.e2e or 0.0) for e in exchanges), default=0.0)
    return ChatRun(spec, exchanges, sorted(skipped), end, poller.summary())


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def _token_figures(exchanges: Sequence[Exchange]) -> dict[str, Any]:
    """Token accounting of the completed exchanges among `exchanges`."""
    ok = [e for e in exchanges if e.record.ok]
    prompt = sum(e.server_prompt_tokens or 0 for e in ok)
    cached = sum(e.cached_tokens or 0 for e in ok)
    ideal = sum(e.ideal_tokens or 0 for e in ok)
    return {
        "requests": len(exchanges),
        "completed": len(ok),
        "failed": len(exchanges) - len(ok),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "computed_tokens": prompt - cached,
        "ideal_tokens": ideal,
        "computed_over_ideal": _ratio(prompt - cached, ideal),
        "hit_rate": _ratio(cached, prompt),
        "ideal_hit_rate": _ratio(prompt - ideal, prompt),
        "output_tokens": sum(e.record.output_tokens for e in ok),
        "ttft_ms": stats.summarize((e.record.ttft for e in ok), 1e3),
    }


def _failure(e: Exchange) -> dict[str, Any]:
    r = e.record
    return {"request_id": r.request_id, "user": e.user, "turn": e.turn, "status": r.status, "error": r.error}


def chat_report(run: ChatRun) -> dict[str, Any]:
    """The W4 figures of a run: overall, by turn, the server's load, every failure and every request."""
    ex = run.exchanges
    summary = stats.serving_summary([e.record for e in ex], run.duration_s, stats.SLO())
    overall = {
        **_token_figures(ex),
        "skipped": len(run.skipped),
        "duration_s": run.duration_s,
        "output_tokens_per_s": summary["output_tokens_per_s"],
        "tpot_ms": summary["tpot_ms"],
        "itl_ms": summary["itl_ms"],
        "e2e_ms": summary["e2e_ms"],
    }
    by_turn = []
    for turn in range(1, run.spec.turns + 1):
        row = _token_figures([e for e in ex if e.turn == turn])
        by_turn.append({"turn": turn, **row, "skipped": sum(t == turn for _, t in run.skipped)})
    # a client prompt length that differs from the server's means the ideal was counted on other ids
    mismatched = [
        e.record.request_id
        for e in ex
        if e.record.ok and e.prompt_ids is not None and len(e.prompt_ids) != e.server_prompt_tokens
    ]
    if mismatched:
        log.warning("client and server prompt lengths differ for %d requests: the ideal is not exact", len(mismatched))
    spec = dataclasses.asdict(run.spec)
    spec["applications"] = list(APPS[: len(run.spec.system_prompts)])
    return {
        "spec": spec,
        "overall": overall,
        "by_turn": by_turn,
        "server_load": run.load,
        "tokenizer_mismatches": mismatched,
        "failures": [_failure(e) for e in ex if not e.record.ok],
        "skipped": [{"user": u, "turn": t} for u, t in run.skipped],
        "requests": [
            {
                "request_id": e.record.request_id,
                "user": e.user,
                "app": e.app,
                "turn": e.turn,
                "sent_at": e.record.sent_at,
                "max_tokens": e.max_tokens,
                "prompt_tokens": e.server_prompt_tokens,
                "client_prompt_tokens": None if e.prompt_ids is None else len(e.prompt_ids),
                "cached_tokens": e.cached_tokens,
                "ideal_tokens": e.ideal_tokens,
                "output_tokens": e.record.output_tokens,
                "ttft": e.record.ttft,
                "e2e": e.record.e2e,
                "finish_reason": e.record.finish_reason,
                "status": e.record.status,
                "error": e.record.error,
            }
            for e in ex
        ],
    }


# ----- W5 ---------------------------------------------------------------------------------------------------------


def long_prompt(tokenizer: Tokenizer, tokens: int) -> tuple[list[dict[str, str]], list[int]]:
    """A one-message chat of numbered paragraphs and an instruction, the fewest sentences whose prompt (chat
    template applied) holds at least `tokens` tokens; returns the messages and their exact ids."""

    def messages(sentences: int) -> list[dict[str, str]]:
        paragraphs = []
        for p in range(0, sentences, 5):
            body = " ".join(_LONG_TOPICS[(p + j) % len(_LONG_TOPICS)] for j in range(min(5, sentences - p)))
            paragraphs.append(f"Paragraph {p // 5 + 1}. {body}")
        return [{"role": "user", "content": "\n\n".join([*paragraphs, LONG_PROMPT_INSTRUCTION])}]

    def length(sentences: int) -> int:
        return len(tokenizer.encode_chat(messages(sentences)))

    lo, hi = 0, 1
    while length(hi) < tokens:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # length(lo) < tokens <= length(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if length(mid) < tokens else (lo, mid)
    chat = messages(hi)
    return chat, tokenizer.encode_chat(chat)


def _gaps(record: RequestRecord) -> list[tuple[float, float, float]]:
    """(start, end, seconds per token) of each gap between chunks, on the run's clock."""
    out = []
    for (t0, _), (t1, k) in itertools.pairwise(record.chunks):
        out.extend([(record.sent_at + t0, record.sent_at + t1, (t1 - t0) / k)] * k)
    return out


def window_itl(records: Sequence[RequestRecord], start: float, end: float, *, inside: bool) -> list[float]:
    """Inter-token gaps (seconds) of `records`: those lying wholly in [start, end] (`inside`), or else those that
    overlap it at all (a stall that starts or ends in the window counts)."""
    out = []
    for r in records:
        for a, b, gap in _gaps(r):
            if (start <= a and b <= end) if inside else (a < end and b > start):
                out.append(gap)
    return out


def run_long_prompt(
    target: str,
    tokenizer: Tokenizer,
    *,
    streams: int = W5_STREAMS,
    max_tokens: int = 256,
    long_prompt_tokens: int = 6000,
    seed: int = 0,
    timeout: float = 600.0,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> dict[str, Any]:
    """Runs W5 against the server at `target`: the figures of shared/PERFORMANCE.md, failures included."""
    if streams < 1 or max_tokens < 2 or long_prompt_tokens < 1:
        raise ValueError(
            f"W5 needs streams >= 1, max_tokens >= 2, long_prompt_tokens >= 1, got {streams}, {max_tokens}, "
            f"{long_prompt_tokens}"
        )
    messages, ids = long_prompt(tokenizer, long_prompt_tokens)
    trigger = max(1, max_tokens // 3)
    counts = [0] * streams
    finished = [False] * streams
    ready = threading.Event()
    lock = threading.Lock()

    def progress(i: int, n: int | None) -> None:
        with lock:
            if n is None:
                finished[i] = True
            else:
                counts[i] = n
            if all(f or c >= trigger for f, c in zip(finished, counts, strict=True)):
                ready.set()

    channel = grpc.insecure_channel(target)
    stub = pb_grpc.MeshServeStub(channel)
    records = [RequestRecord(f"stream-{i}") for i in range(streams)]
    start = time.perf_counter()

    def decode(i: int, prompt: workloads.Prompt) -> None:
        records[i].sent_at = time.perf_counter() - start
        ex = Exchange(records[i])
        request = serve_client.generate_request(prompt, records[i].request_id, seed + i)
        stream_exchange(stub, request, ex, timeout, on_tokens=lambda n: progress(i, n))
        progress(i, None)
        if on_done is not None:
            on_done(records[i])

    try:
        threads = [
            threading.Thread(target=decode, args=(i, p), daemon=True)
            for i, p in enumerate(workloads.chat_prompts(streams, max_tokens))
        ]
        for t in threads:
            t.start()
        ready.wait(timeout)
        request = chat_request("long-prompt", messages, LONG_PROMPT_MAX_TOKENS, seed)
        request.sampling.ignore_eos = True
        long = Exchange(RequestRecord("long-prompt", sent_at=time.perf_counter() - start), tuple(messages))
        stream_exchange(stub, request, long, timeout)
        if on_done is not None:
            on_done(long.record)
        for t in threads:
            t.join()
    finally:
        channel.close()
    return long_prompt_report(records, long, len(ids), streams=streams, max_tokens=max_tokens)


def long_prompt_report(
    records: Sequence[RequestRecord], long: Exchange, prompt_tokens: int, *, streams: int, max_tokens: int
) -> dict[str, Any]:
    """W5's figures from the streams' records and the long prompt's exchange (all on one run clock)."""
    ok = [r for r in records if r.ok]
    sent = long.record.sent_at
    firsts = [r.sent_at + r.ttft for r in records if r.ttft is not None]
    baseline = [max(firsts), sent] if firsts and max(firsts) < sent else None
    first_token = None if long.record.ttft is None else sent + long.record.ttft
    prefill = None if first_token is None else [sent, first_token]
    itl_base = window_itl(records, *baseline, inside=True) if baseline else []
    itl_prefill = window_itl(records, *prefill, inside=False) if prefill else []
    base_ms, prefill_ms = stats.summarize(itl_base, 1e3), stats.summarize(itl_prefill, 1e3)
    last_tokens = [r.sent_at + r.chunks[-1][0] for r in records if r.chunks]
    lr = long.record
    duration = max([r.sent_at + (r.e2e or 0.0) for r in [*records, lr]])
    return {
        "spec": {"streams": streams, "max_tokens": max_tokens, "long_prompt_max_tokens": LONG_PROMPT_MAX_TOKENS},
        "long_prompt": {
            "prompt_tokens": prompt_tokens,
            "server_prompt_tokens": long.server_prompt_tokens,
            "cached_tokens": long.cached_tokens,
            "sent_at_s": sent,
            "ttft_ms": None if lr.ttft is None else lr.ttft * 1e3,
            "e2e_ms": None if lr.e2e is None or not lr.ok else lr.e2e * 1e3,
            "output_tokens": lr.output_tokens,
            "status": lr.status,
            "error": lr.error,
        },
        "baseline_window_s": baseline,
        "prefill_window_s": prefill,
        "streams_decoding_at_first_token": (None if first_token is None else sum(t > first_token for t in last_tokens)),
        "itl_ms_baseline": base_ms,
        "itl_ms_during_prefill": prefill_ms,
        "itl_p50_ratio": _ratio(prefill_ms["p50"], base_ms["p50"]),
        "itl_p99_ratio": _ratio(prefill_ms["p99"], base_ms["p99"]),
        "streams": stats.serving_summary(records, duration, stats.SLO()),
        "failed": len(records) - len(ok) + (not lr.ok),
        "failures": [
            {"request_id": r.request_id, "status": r.status, "error": r.error} for r in [*records, lr] if not r.ok
        ],
    }


# ----- from the benchmark options ---------------------------------------------------------------------------------


def client_tokenizer(opts: Options) -> Tokenizer:
    """The tokenizer of the model the options name (what a server of that model tokenizes with)."""
    if opts.random_model:
        from bench.runner import model_config
        from engine.tokenizer import make_tiny_tokenizer

        return make_tiny_tokenizer(max(model_config(opts).vocab_size, 256))
    from checkpoints.bundled import resolve_checkpoint
    from checkpoints.orbax_io import load_tokenizer

    return load_tokenizer(resolve_checkpoint(opts.checkpoint))


def run_workload(
    opts: Options,
    target: str,
    tokenizer: Tokenizer | None = None,
    *,
    api: str = "grpc",
    load_target: str | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """W4 or W5 (`opts.workload`) against `target`, with the server's tokenizer (loaded from the options if None).
    `api` "openai" (W4 only): `target` is the base URL of an OpenAI-compatible API, GetLoad polled on `load_target`."""
    tokenizer = tokenizer or client_tokenizer(opts)
    if opts.workload == "w4":
        spec = ChatSpec(
            users=opts.users, turns=opts.turns, stagger_s=opts.w4_stagger_s, max_tokens=opts.max_tokens, seed=opts.seed
        )
        bar = tqdm(total=spec.users * spec.turns, desc="W4", file=sys.stderr, disable=not opts.progress, leave=False)
        run = run_chat(
            target,
            tokenizer,
            spec,
            on_done=lambda _: bar.update(1),
            api=api,
            load_target=load_target,
            api_key=api_key,
        )
        bar.close()
        return {"workload": "W4", "api": api, **chat_report(run)}
    if api != "grpc":
        raise ValueError(f"{opts.workload.upper()} runs over the gRPC API only (--api=grpc)")
    if opts.workload == "w5":
        bar = tqdm(total=W5_STREAMS + 1, desc="W5", file=sys.stderr, disable=not opts.progress, leave=False)
        figures = run_long_prompt(
            target,
            tokenizer,
            max_tokens=opts.max_tokens,
            long_prompt_tokens=opts.long_prompt_tokens,
            seed=opts.seed,
            on_done=lambda _: bar.update(1),
        )
        bar.close()
        return {"workload": "W5", **figures}
    raise ValueError(f"unknown serving workload {opts.workload!r}; choose one of {', '.join(WORKLOADS)}")


def _f(value: Any, spec: str = ".1f", unit: str = "") -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "n/a" if missing else format(value, spec) + unit


def headline(figures: Mapping[str, Any]) -> list[str]:
    """The lines a person reads first of a W4 or W5 result (JSON-safe figures: nan is None there)."""
    if figures.get("workload") == "W4":
        s, o = figures["spec"], figures["overall"]
        lines = [
            f"W4: {s['users']} users x {s['turns']} turns: {o['completed']}/{o['requests']} ok, {o['failed']} failed, "
            f"{o['skipped']} not sent; {_f(o['output_tokens_per_s'])} tok/s; TTFT p50 {_f(o['ttft_ms']['p50'])} ms, "
            f"p99 {_f(o['ttft_ms']['p99'])} ms",
            f"  prompt {o['prompt_tokens']} tokens, cached {o['cached_tokens']} (hit rate {_f(o['hit_rate'], '.1%')}), "
            f"computed {o['computed_tokens']} vs ideal {o['ideal_tokens']} "
            f"({_f(o['computed_over_ideal'], '.2f', 'x')})",
        ]
        for t in figures["by_turn"]:
            lines.append(
                f"  turn {t['turn']}: {t['completed']}/{t['requests']} ok, computed {t['computed_tokens']} / ideal "
                f"{t['ideal_tokens']} ({_f(t['computed_over_ideal'], '.2f', 'x')}), hit {_f(t['hit_rate'], '.1%')}, "
                f"TTFT p50 {_f(t['ttft_ms']['p50'])} ms, p99 {_f(t['ttft_ms']['p99'])} ms"
            )
        load = figures["server_load"]
        pages = load["kv_pages"]
        if pages is None:
            lines.append("  server KV pages: n/a (GetLoad reports no KV pages)")
        else:
            most = ", ".join(f"{name.removeprefix('kv_')} {value}" for name, value in pages.items())
            resident = load["most_kv_pages_resident"]
            lines.append(f"  server KV, most at once: {most}; pages resident (used + cached) {resident}")
        return lines
    if figures.get("workload") == "W5":
        lp, s = figures["long_prompt"], figures["spec"]
        got = (
            f"TTFT {_f(lp['ttft_ms'])} ms"
            if lp["status"] == "OK" and lp["error"] is None
            else f"failed {lp['status']}: {lp['error']}"
        )
        base, during = figures["itl_ms_baseline"], figures["itl_ms_during_prefill"]
        return [
            f"W5: {s['streams']} streams x {s['max_tokens']} tokens, a {lp['prompt_tokens']}-token prompt: {got}",
            f"  stream ITL p50 / p99: baseline {_f(base['p50'])} / {_f(base['p99'])} ms, during its prefill "
            f"{_f(during['p50'])} / {_f(during['p99'])} ms; {figures['failed']} failed",
        ]
    return []
