"""The gateway end to end, as operators run it: a tiny random-weight meshserve replica on loopback, gateway processes
(scripts/gateway.py, real subprocesses) in front of it on one real PostgreSQL, keys made with the store's API and
scripts/admin.py, and clients speaking the official `openai` client, httpx and gRPC.

- Limits hold across processes: 64 concurrent streams split over two gateways pass a tokens/minute limit by at most
  one request's reservation; a key revoked with scripts/admin.py fails on both within a second.
- Quarantine: the engine sees the persona prompt (recorded at the scheduler's submit), the ledger says so, and a
  sibling key of the same user is served as it asked.
- The ledger: after SIGTERM mid-load, its sums equal the usage the clients received, and device-seconds over all
  requests add up to the engine's busy time (its prefill and decode calls, timed here) within 5%.
- Security: wrong, missing and revoked keys get 401 / UNAUTHENTICATED, oversized bodies 413; no key secret shows up
  in any log line, metric or error body of the module's run (checked last).
- The Feedback RPC, and the gateway's /metrics moving as requests run.

The module's tests share the replica and two gateways and run in file order; the last test inspects what all of
them left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import openai
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from gateway.keys import KeyStore, NewKey
from gateway.limits import LIMIT_NAMES, Limiter
from gateway.metrics import HTTP_ROUTES
from gateway.policy import QUARANTINE_MAX_TOKENS, QUARANTINE_PROMPT, PolicyStore
from gateway.store import Store
from gateway.store.models import Feedback, LedgerRow
from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc
from tests.postgres_support import create_database, postgres_url  # noqa: F401  (the session fixture)
from tests.service_support import make_test_engine, running_server, slow_generate, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "tiny"
MAX_BODY_BYTES = 64 * 1024
# device cost 0.001 per device-second (3.6 per chip-hour); tokens: 1 per prompt token, 2 per completion token
PRICES = {
    "replicas": {"*": {"per_chip_hour": 3.6, "chips": 1}},
    "models": {"*": {"prompt_per_million": 1e6, "completion_per_million": 2e6}},
}
GRPC_METHODS = frozenset(pb.DESCRIPTOR.services_by_name["MeshServe"].methods_by_name)
REASONS = frozenset(
    {"auth", "forbidden", "policy", "limit", "overload", "unavailable", "invalid", "not_found", "too_large"}
    | {"cancelled", "timeout", "error"}
    | set(LIMIT_NAMES)
)
QUESTION = "What is the capital of France?"


# ----- what the module's run leaves behind, for the last test -------------------------------------------------------


@dataclasses.dataclass
class Evidence:
    """Every key secret handed out or sent, and every error body / gRPC status the clients received."""

    secrets: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    stderr_files: list[str] = dataclasses.field(default_factory=list)
    log_lines: list[str] = dataclasses.field(default_factory=list)

    def http_error(self, response: httpx.Response) -> httpx.Response:
        self.errors.append(f"{response.status_code} {dict(response.headers)} {response.text}")
        return response

    def rpc_error(self, error: grpc.RpcError) -> grpc.RpcError:
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else ()
        self.errors.append(f"{error.code()} {error.details()} {trailing}")
        return error

    def api_error(self, error: openai.APIStatusError) -> openai.APIStatusError:
        self.errors.append(f"{error.status_code} {dict(error.response.headers)} {error.response.text} {error}")
        return error


class _Lines(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(self.format(record))  # the traceback too, when there is one


@pytest.fixture(scope="module")
def evidence() -> Iterator[Evidence]:
    """The module's evidence; every in-process log record of the module (INFO and up, the gateway's and the
    service's DEBUG too) is kept in it."""
    found = Evidence()
    handler = _Lines(found.log_lines)
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", "gateway", "service")}
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.INFO))  # NOTSET (0) stays: it lets everything through
    logging.getLogger("gateway").setLevel(logging.DEBUG)
    logging.getLogger("service").setLevel(logging.DEBUG)
    try:
        yield found
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# ----- the replica, the database, the gateways ----------------------------------------------------------------------


@dataclasses.dataclass
class Replica:
    running: object  # tests.service_support.Running
    tokenizer: object
    submitted: list  # every engine.scheduler.Request the scheduler was given, in order

    @property
    def port(self) -> int:
        return self.running.server.port

    @property
    def engine(self):
        return self.running.server.engine

    def seen(self, request_id: str):
        """The scheduler's request for a gateway request id (the service suffixes `#n`)."""
        found = [r for r in self.submitted if r.request_id.split("#", 1)[0] == request_id]
        assert len(found) == 1, f"the engine saw {len(found)} requests {request_id}"
        return found[0]


@pytest.fixture(scope="module")
def replica(evidence) -> Iterator[Replica]:
    """A tiny random model served on loopback (metrics on), long enough a context for the quarantine persona."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from engine.load import enable_compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in (*names, "jax_persistent_cache_min_entry_size_bytes")}
    enable_compilation_cache()  # warm-up dominates: reuse compiled shapes across runs, then leave jax as it was
    compilation_cache.reset_cache()
    try:
        engine, tokenizer = make_test_engine(max_seq_len=384, max_prefill_len=64)
        with running_server(engine, tokenizer, metrics_port=0, max_waiting=128) as running:
            scheduler = running.server.scheduler
            submitted: list = []
            submit = scheduler.submit

            def recording_submit(request):
                submitted.append(request)
                return submit(request)

            scheduler.submit = recording_submit
            yield Replica(running, tokenizer, submitted)
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def _initdb_installed() -> bool:
    return bool(shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.fixture(scope="module")
def db_url(request) -> str:
    if not _initdb_installed():
        pytest.skip("PostgreSQL's initdb is not installed (`make setup-test` installs the postgresql package)")
    return create_database(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="module")
def store(db_url) -> Iterator[Store]:
    s = Store(db_url)
    s.migrate()
    yield s
    s.close()


@pytest.fixture(scope="module")
def keys(store) -> KeyStore:
    return KeyStore(store)


class GatewayProcess:
    """scripts/gateway.py in its own process, keys required, on the module's database; its stderr kept in a file."""

    def __init__(self, name: str, replica_port: int, db_url: str, directory: str, evidence: Evidence) -> None:
        prices = os.path.join(directory, "prices.json")
        with open(prices, "w") as f:
            json.dump(PRICES, f)
        self.stderr_path = os.path.join(directory, f"{name}.stderr")
        evidence.stderr_files.append(self.stderr_path)
        command = [
            sys.executable,
            os.path.join(ROOT, "scripts", "gateway.py"),
            f"--replica=127.0.0.1:{replica_port}",
            "--http_port=0",
            "--grpc_port=0",
            "--tokenizer=",
            f"--served_model_name={MODEL}",
            "--keys_required",
            f"--db={db_url}",
            f"--prices={prices}",
            f"--max_body_bytes={MAX_BODY_BYTES}",
            "--drain_timeout=20",
        ]
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)
        self.http_port = self.grpc_port = 0

    def wait_ready(self, timeout: float = 60.0) -> GatewayProcess:
        lines: list[str] = []

        def read() -> None:
            for line in self.proc.stdout:
                lines.append(line)
                if line.startswith("gateway listening on"):
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not lines or not lines[-1].startswith("gateway listening on"):
            self.stop()
            with open(self.stderr_path) as f:
                raise AssertionError(f"the gateway did not start: {''.join(lines)}{f.read()[-3000:]}")
        ports = dict(part.split("=") for part in lines[-1].split()[-2:])
        self.http_port, self.grpc_port = int(ports["http_port"]), int(ports["grpc_port"])
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of the gateway's /metrics: (name, sorted labels) -> value."""
        text = httpx.get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10).text
        return samples(text)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def gateways(replica, db_url, store, tmp_path_factory, evidence) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """Two gateway processes on one database in front of the module's replica."""
    directory = str(tmp_path_factory.mktemp("gateways"))
    started = [GatewayProcess(name, replica.port, db_url, directory, evidence) for name in ("a", "b")]
    try:
        yield tuple(g.wait_ready() for g in started)
    finally:
        for g in started:
            g.stop()


def new_key(keys: KeyStore, evidence: Evidence, user: str) -> NewKey:
    """A key of `user` (created when new); its secret joins the evidence."""
    with contextlib.suppress(ValueError):
        keys.create_user(user)
    new = keys.create_key(user, "e2e")
    evidence.secrets.append(new.secret)
    return new


def client(gateway: GatewayProcess, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url, api_key=secret, max_retries=0, timeout=60)


def auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def ledger_rows(store: Store, *, key_id: str | None = None, request_ids=None) -> list[LedgerRow]:
    query = sa.select(LedgerRow)
    if key_id is not None:
        query = query.where(LedgerRow.key_id == key_id)
    if request_ids is not None:
        query = query.where(LedgerRow.request_id.in_(list(request_ids)))
    with store.read() as s:
        return list(s.scalars(query))


def wait_for_rows(store: Store, count: int, timeout: float = 10.0, **where) -> list[LedgerRow]:
    """The ledger rows matching `where`, once there are `count` of them (the gateways write them in batches)."""
    rows: list[LedgerRow] = []

    def enough() -> bool:
        rows[:] = ledger_rows(store, **where)
        return len(rows) >= count

    wait_for(enough, timeout, f"{count} ledger rows")
    return rows


def chat_request(messages: list[dict[str, str]], max_tokens: int) -> pb.GenerateRequest:
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])
    return pb.GenerateRequest(chat=chat, sampling=pb.SamplingOptions(max_tokens=max_tokens, ignore_eos=True))


# ----- limits across processes --------------------------------------------------------------------------------------


def test_tokens_per_minute_holds_across_two_gateways_under_64_streams(gateways, replica, store, keys, evidence):
    key = new_key(keys, evidence, "limited")
    messages = [{"role": "user", "content": "count"}]
    max_tokens = 8
    prompt = replica.running.stub.Tokenize(
        pb.TokenizeRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="count")])),
        timeout=10,
    )
    reservation = len(prompt.token_ids) + max_tokens  # what admission reserves: prompt + max_tokens
    limit = 10 * reservation + reservation // 2  # room for ten
    Limiter(store).set("key", key.info.id, "e2e", tokens_per_minute=limit)

    async def one(gateway: GatewayProcess, http: httpx.AsyncClient) -> tuple[str, object]:
        c = openai.AsyncOpenAI(base_url=gateway.url, api_key=key.secret, max_retries=0, timeout=60, http_client=http)
        try:
            stream = await c.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
            return "ok", usage[-1]
        except openai.RateLimitError as e:
            evidence.api_error(e)
            return "429", e

    async def burst() -> list[tuple[str, object]]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=128)) as http:
            return await asyncio.gather(*(one(gateways[i % 2], http) for i in range(64)))

    results = asyncio.run(burst())
    ok = [usage for kind, usage in results if kind == "ok"]
    refused = [e for kind, e in results if kind == "429"]
    assert len(ok) + len(refused) == 64
    assert refused, "the limit never bit"
    for e in refused:
        assert e.code == "tokens_per_minute" and "tokens per minute" in e.message
        assert int(e.response.headers["retry-after"]) >= 1
    for usage in ok:
        assert usage.total_tokens == reservation  # ignore_eos: every admitted request used all it reserved
    used = sum(u.total_tokens for u in ok)
    # at most one reservation over the limit (the sliding window's share of a minute boundary), and the limit was
    # reached: each refusal saw less than one reservation of room left
    assert limit - reservation < used <= limit + reservation, (used, limit, reservation)
    rows = wait_for_rows(store, len(ok), key_id=key.info.id)
    assert len(rows) == len(ok)
    assert sum(r.prompt_tokens + r.completion_tokens for r in rows) == used


def test_a_revoked_key_fails_on_both_gateways_within_a_second(gateways, keys, evidence, db_url):
    key = new_key(keys, evidence, "revoked")
    with httpx.Client(timeout=10) as http:
        for gateway in gateways:  # both gateways know the key (their caches are warm)
            assert http.get(f"{gateway.url}/models", headers=auth(key.secret)).status_code == 200
        admin = subprocess.Popen(
            [
                sys.executable,
                os.path.join(ROOT, "scripts", "admin.py"),
                "key",
                "revoke",
                f"--key={key.info.id}",
                f"--db={db_url}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        failed_at: dict[int, float] = {}
        deadline = time.monotonic() + 30
        while len(failed_at) < 2 and time.monotonic() < deadline:
            for i, gateway in enumerate(gateways):
                if i not in failed_at:
                    r = http.get(f"{gateway.url}/models", headers=auth(key.secret))
                    if r.status_code != 200:
                        failed_at[i] = time.time()
                        assert r.status_code == 401 and evidence.http_error(r).json()["error"]["code"] == (
                            "invalid_api_key"
                        )
            time.sleep(0.01)
        out, err = admin.communicate(timeout=30)
    assert admin.returncode == 0, err
    evidence.log_lines.extend((out + err).splitlines())
    revoked_at = keys.get_key(key.info.id).revoked_at
    assert revoked_at is not None and len(failed_at) == 2
    for i, at in failed_at.items():
        assert at - revoked_at <= 1.0, f"gateway {i} still took the key {at - revoked_at:.2f} s after its revocation"
    for gateway in gateways:
        with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.MeshServeStub(channel).GetModelInfo(
                pb.GetModelInfoRequest(), metadata=tuple(auth(key.secret).items()), timeout=10
            )
        assert evidence.rpc_error(err.value).code() == grpc.StatusCode.UNAUTHENTICATED


# ----- quarantine ---------------------------------------------------------------------------------------------------


def test_quarantine_serves_the_persona_to_the_engine_and_the_ledger_says_so(gateways, replica, store, keys, evidence):
    a, b = gateways
    stolen, sibling = new_key(keys, evidence, "victim"), new_key(keys, evidence, "victim")
    PolicyStore(store).set("key", stolen.info.id, "e2e-admin", {"quarantine": True})
    messages = [
        {"role": "system", "content": "You are a pirate. Answer like one."},
        {"role": "user", "content": QUESTION},
    ]
    asked = QUARANTINE_MAX_TOKENS + 8

    def ask(secret: str):
        return client(a, secret).chat.completions.create(
            model=MODEL, messages=messages, max_tokens=asked, temperature=0, extra_body={"ignore_eos": True}
        )

    quarantined, normal = ask(stolen.secret), ask(sibling.secret)
    # nothing in the answer tells the caller: the same shape, only shorter (the persona's cap)
    for response in (quarantined, normal):
        assert response.model == MODEL and response.object == "chat.completion"
        assert response.choices[0].finish_reason == "length" and response.id.startswith("chatcmpl-")
    assert quarantined.usage.completion_tokens == QUARANTINE_MAX_TOKENS and normal.usage.completion_tokens == asked

    # the gRPC front applies the same policy (the other gateway process)
    with grpc.insecure_channel(f"127.0.0.1:{b.grpc_port}") as channel:
        call = pb_grpc.MeshServeStub(channel).Generate(
            chat_request(messages, asked), metadata=tuple(auth(stolen.secret).items()), timeout=60
        )
        streamed = list(call)
        grpc_id = dict(call.initial_metadata())["x-request-id"]
    assert sum(len(m.token_ids) for m in streamed) == QUARANTINE_MAX_TOKENS

    decode = replica.tokenizer.decode
    persona = f"<system>{QUARANTINE_PROMPT}\n<user>{QUESTION}\n<assistant>"
    for request_id in (quarantined.id.removeprefix("chatcmpl-"), grpc_id):
        seen = replica.seen(request_id)
        assert decode(seen.prompt_tokens) == persona and "pirate" not in decode(seen.prompt_tokens)
        assert seen.params.max_tokens == QUARANTINE_MAX_TOKENS
    untouched = replica.seen(normal.id.removeprefix("chatcmpl-"))
    assert decode(untouched.prompt_tokens) == f"<system>{messages[0]['content']}\n<user>{QUESTION}\n<assistant>"
    assert untouched.params.max_tokens == asked
    assert replica.seen(grpc_id).priority > untouched.priority  # lowest priority: runs after everyone else

    ids = {quarantined.id.removeprefix("chatcmpl-"), grpc_id, normal.id.removeprefix("chatcmpl-")}
    rows = {r.request_id: r for r in wait_for_rows(store, 3, request_ids=ids)}
    assert rows[grpc_id].quarantined and rows[quarantined.id.removeprefix("chatcmpl-")].quarantined
    assert {rows[grpc_id].key_id, rows[quarantined.id.removeprefix("chatcmpl-")].key_id} == {stolen.info.id}
    normal_row = rows[normal.id.removeprefix("chatcmpl-")]
    assert not normal_row.quarantined and normal_row.key_id == sibling.info.id
    assert normal_row.completion_tokens == asked


# ----- security: keys and bodies ------------------------------------------------------------------------------------


def chunked(data: bytes) -> Iterator[bytes]:
    """A body sent without Content-Length."""
    yield data


def every_rpc(stub: pb_grpc.MeshServeStub) -> list:
    """One call of each gateway RPC that needs a key, taking the metadata."""
    chat = chat_request([{"role": "user", "content": "hi"}], 2)
    return [
        lambda m: list(stub.Generate(chat, metadata=m, timeout=10)),
        lambda m: stub.Tokenize(pb.TokenizeRequest(text="hi"), metadata=m, timeout=10),
        lambda m: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=m, timeout=10),
        lambda m: stub.GetLoad(pb.GetLoadRequest(), metadata=m, timeout=10),
        lambda m: stub.Feedback(pb.FeedbackRequest(request_id="x", stars=3), metadata=m, timeout=10),
    ]


def test_wrong_missing_and_revoked_keys_get_401_and_oversized_bodies_413(gateways, keys, evidence):
    good = new_key(keys, evidence, "security")
    revoked = new_key(keys, evidence, "security")
    keys.revoke_key(revoked.info.id)
    public_id = good.secret.split("-")[1]
    wrong = f"msk-{public_id}-{'A' * 43}"  # a real key's id with a wrong secret
    evidence.secrets.extend([wrong, "sk-not-a-meshserve-key"])
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = {"wrong": auth(wrong), "malformed": auth("sk-not-a-meshserve-key"), "missing": {}}
    cases["revoked"] = auth(revoked.secret)
    with httpx.Client(timeout=30) as http:
        for gateway in gateways:
            for name, headers in cases.items():
                for method, path, payload in (("POST", "/chat/completions", body), ("GET", "/models", None)):
                    r = evidence.http_error(http.request(method, f"{gateway.url}{path}", json=payload, headers=headers))
                    assert r.status_code == 401, (name, path, r.text)
                    assert r.json()["error"]["type"] == "authentication_error"
            assert http.post(f"{gateway.url}/chat/completions", json=body, headers=auth(good.secret)).status_code == 200

            huge = {**body, "messages": [{"role": "user", "content": "x" * (2 * MAX_BODY_BYTES)}]}
            for headers in (auth(good.secret), {}):  # judged before the key: a stranger cannot make it parse
                r = evidence.http_error(http.post(f"{gateway.url}/chat/completions", json=huge, headers=headers))
                assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

            r = http.post(  # no Content-Length: refused while reading
                f"{gateway.url}/chat/completions",
                content=chunked(json.dumps(huge).encode()),
                headers={**auth(good.secret), "content-type": "application/json"},
            )
            assert evidence.http_error(r).status_code == 413
            # a client waiting for "100 Continue" is refused at once, without being asked for the body
            with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as raw:
                raw.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % (2 * MAX_BODY_BYTES)
                )
                answer = b"".join(iter(lambda: raw.recv(65536), b"")).decode()  # until the server closes
            evidence.errors.append(answer)
            assert answer.startswith("HTTP/1.1 413") and "request_too_large" in answer

            with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
                stub = pb_grpc.MeshServeStub(channel)
                for name, headers in cases.items():
                    for call in every_rpc(stub):
                        with pytest.raises(grpc.RpcError) as err:
                            call(tuple(headers.items()))
                        assert evidence.rpc_error(err.value).code() == grpc.StatusCode.UNAUTHENTICATED, name
                oversized = pb.GenerateRequest(text="x" * (2 * MAX_BODY_BYTES))
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Generate(oversized, metadata=tuple(auth(good.secret).items()), timeout=10))
                assert evidence.rpc_error(err.value).code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "max_request_bytes" in err.value.details()


# ----- feedback over gRPC -------------------------------------------------------------------------------------------


def test_feedback_rpc_only_for_the_requesting_key(gateways, replica, store, keys, evidence):
    a, b = gateways
    mine, other = new_key(keys, evidence, "rater"), new_key(keys, evidence, "stranger")
    with (
        grpc.insecure_channel(f"127.0.0.1:{a.grpc_port}") as channel_a,
        grpc.insecure_channel(f"127.0.0.1:{b.grpc_port}") as channel_b,
    ):
        stub_a, stub_b = pb_grpc.MeshServeStub(channel_a), pb_grpc.MeshServeStub(channel_b)
        as_mine, as_other = tuple(auth(mine.secret).items()), tuple(auth(other.secret).items())
        call = stub_a.Generate(chat_request([{"role": "user", "content": QUESTION}], 4), metadata=as_mine, timeout=60)
        assert list(call)[-1].finish_reason == pb.FINISH_REASON_LENGTH
        request_id = dict(call.initial_metadata())["x-request-id"]

        rating = pb.FeedbackRequest(request_id=request_id, stars=4, comment="fine", tags=["e2e"])
        assert stub_a.Feedback(rating, metadata=as_mine, timeout=10).status == "recorded"

        def refused(stub, request: pb.FeedbackRequest, metadata) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as err:
                stub.Feedback(request, metadata=metadata, timeout=10)
            return evidence.rpc_error(err.value)

        err = refused(stub_a, rating, as_other)  # another key: as if the id did not exist
        assert err.code() == grpc.StatusCode.NOT_FOUND and request_id[:16] in err.details()
        assert refused(stub_a, pb.FeedbackRequest(request_id="0" * 32, stars=4), as_mine).code() == (
            grpc.StatusCode.NOT_FOUND
        )
        err = refused(stub_a, pb.FeedbackRequest(request_id=request_id, stars=9), as_mine)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("stars")
        err = refused(stub_a, pb.FeedbackRequest(request_id=request_id), as_mine)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("rating")
        err = refused(stub_a, pb.FeedbackRequest(stars=3), as_mine)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("request_id")
        long_comment = pb.FeedbackRequest(request_id=request_id, stars=3, comment="x" * 5000)
        err = refused(stub_a, long_comment, as_mine)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "comment" in err.details()

        # the other gateway process knows the request from the ledger only (written in batches: wait for it)
        wait_for_rows(store, 1, request_ids=[request_id])
        assert refused(stub_b, rating, as_other).code() == grpc.StatusCode.NOT_FOUND
        thumbs = pb.FeedbackRequest(request_id=request_id, thumbs_up=True)
        assert stub_b.Feedback(thumbs, metadata=as_mine, timeout=10).status == "recorded"

    with store.read() as s:
        rows = list(s.scalars(sa.select(Feedback).where(Feedback.request_id == request_id).order_by(Feedback.id)))
    assert [(r.rating, r.key_id, r.comment, list(r.tags)) for r in rows] == [
        (4, mine.info.id, "fine", ["e2e"]),
        (5, mine.info.id, None, []),
    ]
    with pytest.raises(grpc.RpcError) as err:  # the engine replica keeps no ledger
        replica.running.stub.Feedback(pb.FeedbackRequest(request_id=request_id, stars=4), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ----- the gateway's metrics ----------------------------------------------------------------------------------------


def test_gateway_metrics_move_as_requests_run(gateways, replica, store, keys, evidence, monkeypatch):
    a, _ = gateways
    key = new_key(keys, evidence, "metered")
    tiny_limit = new_key(keys, evidence, "metered")
    Limiter(store).set("key", tiny_limit.info.id, "e2e", tokens_per_minute=1)
    before = a.metrics()
    http_chat = {"front": "http", "route": "/v1/chat/completions"}

    sync = client(a, key.secret)
    answers = [
        sync.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=3 + i, temperature=0
        )
        for i in range(3)
    ]
    with pytest.raises(openai.AuthenticationError) as err:
        client(a, "sk-wrong-key").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    evidence.api_error(err.value)
    with pytest.raises(openai.RateLimitError) as err:
        client(a, tiny_limit.secret).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    evidence.api_error(err.value)
    with grpc.insecure_channel(f"127.0.0.1:{a.grpc_port}") as channel:
        grpc_call = pb_grpc.MeshServeStub(channel).Generate(
            chat_request([{"role": "user", "content": "hi"}], 5), metadata=tuple(auth(key.secret).items()), timeout=60
        )
        grpc_messages = list(grpc_call)

    # a stream held open (the engine slowed down): in flight while it runs, settled after
    monkeypatch.setattr(replica.engine, "generate", slow_generate(replica.engine, 0.05))
    stream = sync.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "a long story"}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    first = next(iter(stream))
    assert first.choices
    assert value(a.metrics(), "meshserve_gateway_streams_in_flight") >= 1
    streamed_usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    monkeypatch.undo()

    usages = [r.usage for r in answers] + [streamed_usage]
    grpc_usage = grpc_messages[-1].usage
    rows = wait_for_rows(store, 5, key_id=key.info.id)

    def settled() -> bool:
        now = a.metrics()
        return (
            value(now, "meshserve_gateway_streams_in_flight") == 0
            and value(now, "meshserve_gateway_ledger_rows_total", fate="written")
            - value(before, "meshserve_gateway_ledger_rows_total", fate="written")
            >= 5
        )

    wait_for(settled, 10, "the gateway's requests settled and written")
    after = a.metrics()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("meshserve_gateway_requests_total", **http_chat, status="200") == 4
    assert delta("meshserve_gateway_requests_total", **http_chat, status="401") == 1
    assert delta("meshserve_gateway_requests_total", **http_chat, status="429") == 1
    assert delta("meshserve_gateway_requests_total", front="grpc", route="Generate", status="OK") == 1
    assert delta("meshserve_gateway_request_seconds_count", **http_chat) == 6
    assert delta("meshserve_gateway_admitted_total", front="http") == 4
    assert delta("meshserve_gateway_admitted_total", front="grpc") == 1
    assert delta("meshserve_gateway_refused_total", front="http", reason="auth") == 1
    assert delta("meshserve_gateway_refused_total", front="http", reason="tokens_per_minute") == 1
    assert delta("meshserve_gateway_time_to_first_token_seconds_count", front="http") == 4
    assert delta("meshserve_gateway_time_to_first_token_seconds_count", front="grpc") == 1
    assert delta("meshserve_gateway_finished_total", finish_reason="length") == 5
    prompt = sum(u.prompt_tokens for u in usages) + grpc_usage.prompt_tokens
    completion = sum(u.completion_tokens for u in usages) + grpc_usage.completion_tokens
    assert delta("meshserve_gateway_tokens_total", kind="prompt") == prompt
    assert delta("meshserve_gateway_tokens_total", kind="completion") == completion
    device = sum(r.device_seconds for r in rows)
    assert device > 0 and delta("meshserve_gateway_device_seconds_total") == pytest.approx(device, rel=1e-6)
    cached = sum(r.cached_tokens for r in rows)
    # the prices: 1 per prompt token (cached ones too), 2 per completion token, 0.001 per device-second
    assert delta("meshserve_gateway_cost_total", kind="tokens") == pytest.approx(prompt + 2 * completion)
    assert delta("meshserve_gateway_cost_total", kind="device") == pytest.approx(device * 0.001, rel=1e-6)
    assert delta("meshserve_gateway_tokens_total", kind="cached") == cached
    assert sum(r.cost_tokens for r in rows) == pytest.approx(prompt + 2 * completion)
    assert delta("meshserve_gateway_ledger_batches_total") >= 1
    assert value(after, "meshserve_gateway_ledger_queue_rows") == 0


# ----- the ledger after SIGTERM, and device time ----------------------------------------------------------------------


def test_ledger_equals_usage_after_sigterm_and_device_seconds_add_up_to_busy_time(
    replica, db_url, store, keys, evidence, tmp_path, monkeypatch
):
    engine = replica.engine
    monkeypatch.setattr(engine, "generate", slow_generate(engine, 0.01))  # streams outlive the SIGTERM
    busy = [0.0]
    for name in ("prefill_batch", "generate"):
        call = getattr(engine, name)

        def timed(*args, _call=call, **kwargs):
            start = time.perf_counter()
            try:
                return _call(*args, **kwargs)
            finally:
                busy[0] += time.perf_counter() - start

        monkeypatch.setattr(engine, name, timed)

    gateway = GatewayProcess("sigterm", replica.port, db_url, str(tmp_path), evidence).wait_ready()
    key = new_key(keys, evidence, "billed")
    received: list[openai.types.CompletionUsage] = []
    failures: list[BaseException] = []

    async def worker(index: int, http: httpx.AsyncClient, stop: asyncio.Event) -> None:
        c = openai.AsyncOpenAI(base_url=gateway.url, api_key=key.secret, max_retries=0, timeout=60, http_client=http)
        n = 0
        while True:
            try:
                stream = await c.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"story {index}.{n}"}],
                    max_tokens=6 + (index + n) % 12,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                if isinstance(e, openai.APIStatusError):
                    evidence.api_error(e)
                if stop.is_set():
                    return  # the gateway is gone: the load ends
                failures.append(e)
                return
            received.append(usage[-1])
            n += 1

    async def load() -> None:
        stop = asyncio.Event()  # set when the SIGTERM is sent
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as http:
            tasks = [asyncio.create_task(worker(i, http, stop)) for i in range(8)]
            while len(received) < 12:
                await asyncio.sleep(0.01)
            stop.set()
            gateway.proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*tasks)

    asyncio.run(load())
    assert gateway.proc.wait(30) == 0
    monkeypatch.undo()
    assert not failures, failures
    rows = ledger_rows(store, key_id=key.info.id)
    assert len(rows) == len(received) > 12  # requests in flight at the SIGTERM finished and were billed
    assert sum(r.prompt_tokens for r in rows) == sum(u.prompt_tokens for u in received)
    assert sum(r.completion_tokens for r in rows) == sum(u.completion_tokens for u in received)
    assert {r.finish_reason for r in rows} == {"length"}
    device = sum(r.device_seconds for r in rows)
    assert device == pytest.approx(busy[0], rel=0.05), (device, busy[0])


# ----- last: nothing leaked ---------------------------------------------------------------------------------------


def test_no_key_secret_in_any_log_metric_or_error_body(gateways, replica, keys, evidence, caplog):
    caplog.set_level(logging.DEBUG)
    a, b = gateways
    key = new_key(keys, evidence, "last")
    # one more round under caplog: a good request, a bad key, a 404, a refused feedback
    with httpx.Client(timeout=30) as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert http.post(f"{a.url}/chat/completions", json=body, headers=auth(key.secret)).status_code == 200
        wrong = key.secret[:-1] + ("B" if key.secret[-1] != "B" else "C")
        evidence.secrets.append(wrong)
        r = http.post(f"{b.url}/chat/completions", json=body, headers=auth(wrong))
        assert evidence.http_error(r).status_code == 401
        r = http.post(f"{a.url}/chat/completions", json={**body, "model": "gpt-4o"}, headers=auth(key.secret))
        assert evidence.http_error(r).status_code == 404
        r = http.post(f"{a.url}/feedback", json={"request_id": "nope", "rating": "up"}, headers=auth(key.secret))
        assert evidence.http_error(r).status_code == 404
        metrics = {
            "gateway a": http.get(f"http://127.0.0.1:{a.http_port}/metrics").text,
            "gateway b": http.get(f"http://127.0.0.1:{b.http_port}/metrics").text,
            "engine": http.get(f"http://127.0.0.1:{replica.running.server.metrics_port}/metrics").text,
        }
    time.sleep(0.3)  # the gateways' last log lines
    texts = {"caplog": caplog.text, "log records": "\n".join(evidence.log_lines), **metrics}
    texts["error bodies"] = "\n".join(evidence.errors)
    for path in evidence.stderr_files:
        with open(path) as f:
            texts[os.path.basename(path)] = f.read()

    # the evidence is real: the run logged, answered errors and counted
    assert len(evidence.errors) >= 3 and len(evidence.secrets) >= 2  # (many more when the whole module ran)
    assert '"POST /v1/chat/completions HTTP/1.1" 401' in texts["b.stderr"]  # the wrong key's request, logged
    assert (
        "meshserve_gateway_requests_total" in metrics["gateway a"] and "meshserve_requests_total" in metrics["engine"]
    )
    for secret in evidence.secrets:
        tail = secret.rsplit("-", 1)[-1]
        for where, text in texts.items():
            leaked = secret in text or (len(tail) >= 20 and tail in text)
            assert not leaked, f"a key secret in {where}"  # (the message must not show it either)

    # every label of the gateway's metrics comes from a bounded set; no key or user id is one
    ids = {k.id for k in keys.list_keys()} | {u.id for u in keys.list_users()}
    for name in ("gateway a", "gateway b"):
        for family in text_string_to_metric_families(metrics[name]):
            assert family.name.startswith("meshserve_gateway_") or not family.name.startswith("meshserve"), family.name
            for sample in family.samples:
                labels = dict(sample.labels)
                labels.pop("le", None)
                assert not set(labels.values()) & ids
                if "front" in labels:
                    assert labels["front"] in ("http", "grpc")
                if "route" in labels:
                    routes = HTTP_ROUTES | {"/v1/models/{model}", "other"} | GRPC_METHODS
                    assert labels["route"] in routes, labels
                if "status" in labels:
                    status = labels["status"]
                    assert status.isdigit() or status in grpc.StatusCode.__members__, labels
                if "reason" in labels:
                    assert labels["reason"] in REASONS, labels
        for i in ids:
            assert i not in metrics[name]
