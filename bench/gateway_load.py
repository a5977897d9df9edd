"""The gateway under load: an in-process gateway for `benchmark.py serve --api=openai|both`, and the auth + limits
throughput run (`benchmark.py gateway_auth`).

`GatewayThread` serves a `gateway.server.Gateway` on its own event loop in a background thread (the gateway binds
grpc.aio to the loop it is built in), in front of a replica: the in-process engine server over gRPC for `serve`.

`gateway_auth` measures what the gateway itself costs per request when keys and limits are checked: a gateway process
with the real `StoreGate` (SQLite in a temporary folder, keys required, one user whose limits are set far above what
the run can reach, so every check runs and none trips) in front of `InstantReplica`, a replica that answers every
request at once with a fixed short completion. A client in this process keeps `connections` HTTP/1.1 keep-alive
connections busy with non-streaming chat completions for `duration_s` seconds (after one second of warm-up) and
reports requests/s, latency percentiles, every failure by status, and the CPU seconds the gateway process and the
client spent per request. The gateway runs in a child process, as `scripts/gateway.py` does, so the client does not
share its interpreter lock; on a 2-core machine the two share the cores, which the CPU figures make visible. With a
profiler the child is sampled during the timed window (py-spy, attached by pid) or profiled in every thread
(cProfile), and the report names where its time went.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from bench import stats
from protos.meshserve.v1 import meshserve_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB_MODEL = "stub-model"
STUB_TEXT = "Hello! How can I help you today?"
"""The stub replica's whole reply (9 tokens: one per word or mark)."""
HIGH_LIMITS = {
    "requests_per_minute": 10**9,
    "tokens_per_minute": 10**12,
    "concurrent_streams": 10**6,
    "tokens_per_day": 10**14,
    "tokens_per_month": 10**15,
}
"""Every limit the store knows, set where no run can reach it: each is checked and counted on every request."""
WARMUP_S = 1.0


# ----- an in-process gateway --------------------------------------------------------------------------------------


def set_tcp_nodelay(gateway: Any) -> int:
    """Sets TCP_NODELAY on the gateway's listening HTTP sockets (Linux passes it on to every accepted connection);
    returns the sockets set. Once an experiment, now what `Gateway.start` does itself (a socket bound with proto 0
    kept Nagle's algorithm on, so a response written in parts waited ~40 ms for the client's delayed ACK): the
    `--gateway_tcp_nodelay` flag no longer changes anything."""
    count = 0
    for server in getattr(gateway._http, "servers", ()):
        for sock in server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            count += 1
    return count


class GatewayThread:
    """A `Gateway` over the replica `make_replica()` builds (called in the gateway's loop) and `gate`, serving on its
    own event loop in a daemon thread. `start()` returns once both ports are bound; `stop()` drains and stops it."""

    def __init__(self, make_replica: Callable[[], Any], gate: Any, config: Any = None, *, nodelay: bool = False):
        from gateway.server import GatewayConfig

        self._make_replica, self._gate, self._nodelay = make_replica, gate, nodelay
        self.config = config or GatewayConfig(http_port=0, grpc_port=0, drain_timeout=1.0)
        self.gateway: Any = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-gateway", daemon=True)

    def _run(self) -> None:
        from gateway.server import Gateway

        asyncio.set_event_loop(self._loop)
        try:
            self.gateway = Gateway(self._make_replica(), self._gate, self.config)
            self._loop.run_until_complete(self.gateway.start())
            if self._nodelay:
                set_tcp_nodelay(self.gateway)
        except BaseException as e:  # raised again by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_until_complete(self.gateway.stopped.wait())

    def start(self) -> GatewayThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.gateway.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.config.host}:{self.gateway.grpc_port}"

    def stop(self) -> None:
        if self.gateway is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.gateway.stop(), self._loop).result()
            self._thread.join()

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bundled_vocab() -> Any:
    """The bundled model's tokenizer as the gateway loads it by default (scripts/gateway.py --tokenizer=bundled), or
    None when the bundled model is not installed."""
    from checkpoints.bundled import bundled_gguf_path
    from engine.tokenizer import Tokenizer
    from gateway.backend import TokenVocab

    try:
        return TokenVocab(Tokenizer.from_gguf_file(bundled_gguf_path()))
    except Exception:
        return None


def gateway_for(replica_address: str, *, nodelay: bool = False) -> GatewayThread:
    """The open gateway (no keys, loopback) in front of the MeshServe server at `replica_address`, as
    scripts/gateway.py runs it: with the bundled tokenizer, so it counts prompts itself when the replica serves the
    bundled model (checked against the replica's Tokenize; another model is counted by the replica). `nodelay`: see
    `set_tcp_nodelay`."""
    from gateway.backend import GrpcReplica
    from gateway.open_gate import OpenGate

    vocab = bundled_vocab()
    return GatewayThread(lambda: GrpcReplica(replica_address, vocab=vocab), OpenGate(), nodelay=nodelay)


# ----- a replica that answers at once -----------------------------------------------------------------------------


class _Instant:
    def __init__(self, messages: list[pb.GenerateResponse]) -> None:
        self._messages = messages

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[pb.GenerateResponse]:
        for m in self._messages:
            yield m

    def cancel(self) -> None:
        pass


class InstantReplica:
    """A `gateway.backend.Replica` that costs nothing: tokenizes at ~4 bytes per token and answers every request
    with STUB_TEXT (cut to max_tokens words) in one message, finished, with usage."""

    name = "instant"

    def __init__(self) -> None:
        self.info = pb.ModelInfo(
            model_name=STUB_MODEL,
            vocab_size=32000,
            context_length=8192,
            limits=pb.Limits(
                max_stop_strings=16,
                max_stop_string_chars=256,
                max_logprobs=20,
                max_messages=256,
                max_input_chars=1 << 20,
                max_prompt_tokens=8191,
                max_stop_token_ids=16,
            ),
        )
        self._words = STUB_TEXT.split(" ")

    async def model_info(self) -> pb.ModelInfo:
        return self.info

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        if request.WhichOneof("input") == "chat":
            size = sum(len(m.content) + 8 for m in request.chat.messages)
        else:
            size = len(request.text)
        return pb.TokenizeResponse(token_ids=list(range(max(1, size // 4))))

    def generate(self, request: pb.GenerateRequest) -> _Instant:
        words = self._words[: max(1, request.sampling.max_tokens)]
        prompt = 8
        m = pb.GenerateResponse(
            request_id=request.request_id,
            prompt_tokens=prompt,
            text=" ".join(words),
            token_ids=list(range(len(words))),
            finish_reason=pb.FINISH_REASON_STOP if len(words) == len(self._words) else pb.FINISH_REASON_LENGTH,
        )
        m.usage.CopyFrom(pb.Usage(prompt_tokens=prompt, completion_tokens=len(words), cached_tokens=0))
        return _Instant([m])

    async def load(self) -> pb.Load:
        return pb.Load(slots_total=1024)

    def token_bytes(self, ids: Sequence[int]) -> list[bytes] | None:
        return None

    async def close(self) -> None:
        pass


# ----- the gateway process ----------------------------------------------------------------------------------------


def provision(db_url: str, limits: dict[str, int]) -> str:
    """Creates the store at `db_url` with one user (its `limits` set) and one key; returns the key's secret."""
    from gateway.store import Store
    from gateway.store_gate import StoreGate

    store = Store(db_url)
    gate = StoreGate(store)
    try:
        user = gate.keys.create_user("bench")
        secret = gate.keys.create_key("bench", "load").secret
        if limits:
            gate.limiter.set("user", user.id, "benchmark", **limits)
    finally:
        gate.close()
        store.close()
    return secret


def ledger_rows(db_url: str) -> int:
    """Rows in the ledger (every admitted request writes one)."""
    import sqlalchemy as sa

    from gateway.store import Store
    from gateway.store.models import LedgerRow

    store = Store(db_url)
    try:
        with store.read() as s:
            return int(s.scalar(sa.select(sa.func.count()).select_from(LedgerRow)) or 0)
    finally:
        store.close()


def _install_thread_profilers(profiles: list[Any]) -> Any:
    """cProfile in this thread and in every thread started from now on; returns this thread's profiler."""
    import cProfile

    def start(frame: Any, event: str, arg: Any) -> None:
        sys.setprofile(None)
        p = cProfile.Profile()
        profiles.append(p)
        p.enable()

    threading.setprofile(start)
    main = cProfile.Profile()
    profiles.append(main)
    main.enable()
    return main


def child_main(config: dict[str, Any]) -> None:
    """The gateway process: `StoreGate` on `config["db_url"]` (keys required) in front of `InstantReplica`, HTTP on a
    free loopback port, printed as "ready <port>"; SIGTERM drains, stops, writes the ledger and (with "cprofile")
    the profile to `config["profile_out"]`."""
    from gateway.server import Gateway, GatewayConfig
    from gateway.store import Store
    from gateway.store_gate import StoreGate

    profiles: list[Any] = []
    if config.get("profiler") == "cprofile":
        _install_thread_profilers(profiles)
    store = Store(config["db_url"])
    if config.get("gate") == "open":
        from gateway.open_gate import OpenGate

        gate: Any = OpenGate()
    else:
        gate = StoreGate(store, keys_required=True, migrate=False)

    async def serve() -> None:
        gw = Gateway(InstantReplica(), gate, GatewayConfig(http_port=0, grpc_port=0, keys_required=True))
        await gw.start()
        if config.get("nodelay"):
            set_tcp_nodelay(gw)
        print(f"ready {gw.http_port}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await gw.stop()

    if config.get("loop") == "uvloop":
        import uvloop

        uvloop.run(serve())
    else:
        asyncio.run(serve())
    store.close()
    if profiles:
        import pstats

        for p in profiles:
            p.disable()
        merged = pstats.Stats(profiles[0])
        for p in profiles[1:]:
            with contextlib.suppress(TypeError):  # a thread that never ran a profiled call
                merged.add(p)
        merged.dump_stats(config["profile_out"])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class GatewayProcess:
    """The gateway child process (see `child_main`); a context manager that starts it and stops it with SIGTERM."""

    def __init__(self, config: dict[str, Any], extra_path: Sequence[str] = ()) -> None:
        self.config = config
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*extra_path, ROOT, *filter(None, [env.get("PYTHONPATH")])])
        code = "import json, sys; from bench.gateway_load import child_main; child_main(json.loads(sys.argv[1]))"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            self.proc.kill()
            raise RuntimeError(f"the gateway process did not start: {line}{self.proc.stderr.read()[-3000:]}")
        self.port = int(line.split()[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.proc.pid)

    def stop(self, timeout: float = 60.0) -> str:
        """Stops it (SIGTERM: drain, settle, write the ledger); returns the tail of its stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return (err or "")[-3000:]


# ----- the client -------------------------------------------------------------------------------------------------


def http_request(path: str, body: dict[str, Any], host: str, port: int, api_key: str) -> bytes:
    """One HTTP/1.1 keep-alive POST of a JSON body, as bytes on the wire."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\nauthorization: Bearer {api_key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length) if length else b""


@dataclasses.dataclass
class ClientResult:
    """What the client saw in the timed window."""

    latencies: list[float]
    """Seconds of each request that completed with 200, in completion order."""
    statuses: collections.Counter
    """Responses by HTTP status (and "error:<exception>" for a broken connection), 200 included."""
    errors: list[str]
    """The first few non-200 bodies / exceptions, for the report."""
    window_s: float
    client_cpu_s: float


async def drive(
    host: str, port: int, request: bytes, *, connections: int, warmup_s: float, duration_s: float, on_window: Any
) -> ClientResult:
    """Keeps `connections` connections busy sending `request` for `warmup_s` + `duration_s` seconds; only requests
    sent and finished inside the timed window count. `on_window(started: bool)` is called as the window opens and
    closes (the caller samples the gateway's CPU there)."""
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    errors: list[str] = []
    t0 = time.perf_counter()
    window = (t0 + warmup_s, t0 + warmup_s + duration_s)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                start = time.perf_counter()
                if start >= window[1]:
                    return
                try:
                    writer.write(request)
                    status, body = await _read_response(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                    statuses[f"error:{type(e).__name__}"] += 1
                    if len(errors) < 5:
                        errors.append(repr(e))
                    writer.close()
                    if sum(n for k, n in statuses.items() if str(k).startswith("error:")) > 100:
                        return  # the gateway is gone: stop rather than spin
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                end = time.perf_counter()
                if start < window[0] or end > window[1]:
                    continue
                statuses[status] += 1
                if status == 200:
                    latencies.append(end - start)
                elif len(errors) < 5:
                    errors.append(f"HTTP {status}: {body[:300].decode(errors='replace')}")
        finally:
            writer.close()

    async def marks() -> None:
        await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
        on_window(True)
        await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
        on_window(False)

    cpu0 = time.process_time()
    await asyncio.gather(marks(), *(connection() for _ in range(connections)))
    return ClientResult(latencies, statuses, errors, duration_s, time.process_time() - cpu0)


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ----- profiles ---------------------------------------------------------------------------------------------------

SQLITE_CALLS = ("DefaultDialect.do_execute", "DefaultDialect.do_executemany", "DefaultDialect.do_commit")
"""SQLAlchemy's last Python frames before the sqlite3 C module: time there is SQLite itself."""
COMPONENTS = (
    ("StoreGate.authenticate (key cache, HMAC)", "StoreGate.authenticate"),
    ("StoreGate.prepare (policy)", "StoreGate.prepare"),
    ("StoreGate.admit (limits: reserve transaction)", "StoreGate.admit"),
    ("StoreGate.finish (limits: settle transaction; ledger queue)", "StoreGate.finish"),
    ("ledger writer thread (batched inserts)", "Ledger._run"),
    ("worker thread -> event loop wake-up (call_soon_threadsafe)", "BaseEventLoop.call_soon_threadsafe"),
    ("event loop -> worker thread hand-off (executor submit)", "ThreadPoolExecutor.submit"),
    ("HTTP/1.1 parsing and writing (uvicorn h11 / httptools)", "uvicorn/protocols/"),
    ("FastAPI request validation (pydantic)", "BaseModel.model_validate"),
    ("gateway flow.admit (prepare, tokenize, admit)", "admit (gateway/flow.py)"),
    ("JSON response rendering", "JSONResponse.render"),
)
"""Named parts of a request's cost: the share of busy samples whose stack holds the function (inclusive)."""


def summarize_pyspy(path: str, top: int = 25) -> dict[str, Any]:
    """Where the gateway's busy time went, from py-spy's raw (collapsed) output - one line per distinct stack,
    "frame;...;leaf count", frames "function (file:line)": by library (exclusive: the library of the innermost
    frame, SQLite's C time apart), by named component (inclusive), and the top functions by self and inclusive
    time. Threads blocked waiting for work count as idle."""
    self_time: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    libraries: collections.Counter = collections.Counter()
    components: collections.Counter = collections.Counter()
    total = idle = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [_strip_line(fr) for fr in stack.split(";")]
            total += n
            if _idle(frames[-1]):
                idle += n
                continue
            self_time[frames[-1]] += n
            libraries[_library(frames[-1])] += n
            for fr in set(frames):
                inclusive[fr] += n
            for name, needle in COMPONENTS:
                if any(needle in fr for fr in frames):
                    components[name] += n
    busy = total - idle
    share = (lambda n: n / busy) if busy else (lambda n: math.nan)
    return {
        "samples": total,
        "idle_samples": idle,
        "busy_samples": busy,
        "libraries": {name: share(n) for name, n in libraries.most_common()},
        "components": {name: share(components[name]) for name, _ in COMPONENTS},
        "self": [{"function": fn, "share": share(n)} for fn, n in self_time.most_common(top)],
        "inclusive": [{"function": fn, "share": share(n)} for fn, n in inclusive.most_common(top)],
    }


def _strip_line(frame: str) -> str:
    # "name (path/file.py:123)" -> "name (path/file.py)": one entry per function, not per line
    head, sep, tail = frame.rpartition(":")
    return f"{head})" if sep and tail.rstrip(")").isdigit() else frame


def _library(frame: str) -> str:
    """A frame's library: "sqlite3 (C)" for SQLAlchemy's calls into the driver, else its file's top folder."""
    if frame.split(" (", 1)[0] in SQLITE_CALLS:
        return "sqlite3 (C)"
    file = frame.rpartition(" (")[2].rstrip(")")
    return file.split("/", 1)[0].removesuffix(".py") if "/" in file else file.removesuffix(".py")


def _idle(leaf: str) -> bool:
    name = leaf.split(" (", 1)[0]
    return name in ("_worker", "Condition.wait", "Event.wait") or any(w in leaf for w in ("select (", "poll ("))


def summarize_cprofile(path: str, top: int = 25) -> dict[str, Any]:
    """Self and cumulative time by function from a merged cProfile dump."""
    import pstats

    st = pstats.Stats(path)
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((f"{name} ({file}:{line})", calls, tottime, cumtime))
    busy = sum(r[2] for r in rows) or math.nan
    by_self = sorted(rows, key=lambda r: -r[2])[:top]
    by_cum = sorted(rows, key=lambda r: -r[3])[:top]
    return {
        "total_self_s": busy,
        "self": [{"function": f, "calls": c, "self_s": t, "share": t / busy} for f, c, t, _ in by_self],
        "cumulative": [{"function": f, "calls": c, "cumulative_s": cu} for f, c, _, cu in by_cum],
    }


# ----- the run ----------------------------------------------------------------------------------------------------


def gateway_auth(
    *,
    duration_s: float = 10.0,
    connections: int = 8,
    limits: dict[str, int] | None = None,
    profiler: str | None = None,
    py_spy: str | None = None,
    loop: str = "asyncio",
    extra_path: Sequence[str] = (),
    warmup_s: float = WARMUP_S,
    keep_dir: str | None = None,
    gate: str = "store",
    nodelay: bool = False,
) -> dict[str, Any]:
    """The auth + limits throughput run (see the module docstring). `limits`: the user's limits (default
    HIGH_LIMITS; {} sets none). `profiler`: None, "py-spy" (the binary `py_spy`, default the one on PATH) or
    "cprofile". `loop`: the gateway process's event loop, "asyncio" (as scripts/gateway.py runs) or "uvloop".
    `extra_path`: folders put first on the gateway process's import path (to try a package such as httptools
    without installing it into the environment)."""
    if duration_s <= 0 or connections < 1:
        raise ValueError(f"gateway_auth needs duration_s > 0 and connections >= 1, got {duration_s}, {connections}")
    if profiler not in (None, "py-spy", "cprofile"):
        raise ValueError(f"profiler must be py-spy or cprofile, got {profiler!r}")
    if loop not in ("asyncio", "uvloop"):
        raise ValueError(f"loop must be asyncio or uvloop, got {loop!r}")
    spy = None
    if profiler == "py-spy":
        spy = py_spy or shutil.which("py-spy")
        if spy is None or not os.path.exists(spy):
            raise ValueError("--gateway_profile=py-spy needs py-spy: pip install py-spy (anywhere), pass --py_spy=PATH")
    limits = HIGH_LIMITS if limits is None else limits
    folder = keep_dir or tempfile.mkdtemp(prefix="meshserve-gateway-auth-")
    db_url = f"sqlite:///{folder}/gateway.db"
    secret = provision(db_url, limits)
    profile_out = os.path.join(folder, "gateway.prof")
    config = {"db_url": db_url, "profiler": profiler, "profile_out": profile_out, "loop": loop, "gate": gate}
    config["nodelay"] = nodelay
    proc = GatewayProcess(config, extra_path)
    body = {"model": STUB_MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
    request = http_request("/v1/chat/completions", body, "127.0.0.1", proc.port, secret)
    cpu: dict[str, float] = {}
    spy_proc: subprocess.Popen | None = None
    spy_out = os.path.join(folder, "py-spy.txt")

    def on_window(opened: bool) -> None:
        nonlocal spy_proc
        cpu["open" if opened else "close"] = proc.cpu_seconds()
        if opened and spy is not None:
            cmd = [spy, "record", "--pid", str(proc.pid), "--duration", str(max(1, int(duration_s)))]
            cmd += ["--format", "raw", "--output", spy_out, "--rate", "250", "--nonblocking", "--gil"]
            spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    try:
        result = _run_async(
            drive(
                "127.0.0.1",
                proc.port,
                request,
                connections=connections,
                warmup_s=warmup_s,
                duration_s=duration_s,
                on_window=on_window,
            )
        )
    finally:
        stderr = proc.stop()
    profile: dict[str, Any] | None = None
    if spy_proc is not None:
        _, spy_err = spy_proc.communicate(timeout=60)
        if os.path.exists(spy_out):
            profile = {"profiler": "py-spy", "raw": spy_out, **summarize_pyspy(spy_out)}
        else:
            profile = {"profiler": "py-spy", "error": spy_err[-2000:]}
    elif profiler == "cprofile":
        profile = {"profiler": "cprofile", "raw": profile_out, **summarize_cprofile(profile_out)}
    ok = len(result.latencies)
    gateway_cpu = cpu.get("close", math.nan) - cpu.get("open", math.nan)
    rows = ledger_rows(db_url)
    sent = sum(result.statuses.values())
    return {
        "gate": "StoreGate (SQLite, keys required)" if gate == "store" else "OpenGate (no keys, no limits)",
        "replica": "instant stub",
        "limits": limits,
        "connections": connections,
        "duration_s": result.window_s,
        "warmup_s": warmup_s,
        "event_loop": loop,
        "tcp_nodelay_experiment": nodelay,
        "http_parser": _http_parser(extra_path),
        "requests": sent,
        "completed": ok,
        "failed": sent - ok,
        "statuses": {str(k): v for k, v in sorted(result.statuses.items(), key=lambda kv: str(kv[0]))},
        "errors": result.errors,
        "requests_per_s": ok / result.window_s,
        "latency_ms": stats.summarize(result.latencies, 1e3),
        "gateway_cpu_s": gateway_cpu,
        "gateway_cpu_ms_per_request": gateway_cpu / ok * 1e3 if ok else math.nan,
        "client_cpu_ms_per_request": result.client_cpu_s / ok * 1e3 if ok else math.nan,
        "gateway_cpu_bound_requests_per_s": ok / gateway_cpu if gateway_cpu > 0 else math.nan,
        "ledger_rows": rows,
        "ledger_complete": rows >= sent,
        "db": db_url,
        "profile": profile,
        "gateway_stderr_tail": stderr if result.statuses.get(200, 0) != sent else "",
        "goal_requests_per_s": 1000,
    }


def _http_parser(extra_path: Sequence[str]) -> str:
    """The parser uvicorn's "auto" picks in the gateway process: httptools when it imports there, else h11."""
    code = "import httptools"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*extra_path, ROOT]))
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0
    return "httptools" if found else "h11"


def headline(figures: dict[str, Any]) -> list[str]:
    """The lines a person reads first of a gateway_auth result (JSON-safe: nan is None)."""

    def f(v: Any, spec: str = ".1f") -> str:
        return "n/a" if v is None else format(v, spec)

    lat = figures["latency_ms"]
    lines = [
        f"gateway_auth: {f(figures['requests_per_s'], '.0f')} requests/s (goal >= {figures['goal_requests_per_s']}) "
        f"over {figures['connections']} connections, {figures['completed']}/{figures['requests']} ok, "
        f"latency p50 {f(lat['p50'], '.2f')} ms, p99 {f(lat['p99'], '.2f')} ms",
        f"  gateway CPU {f(figures['gateway_cpu_ms_per_request'], '.2f')} ms/request (at most "
        f"{f(figures['gateway_cpu_bound_requests_per_s'], '.0f')} requests/s on one core), client "
        f"{f(figures['client_cpu_ms_per_request'], '.2f')} ms/request; {figures['event_loop']} loop, "
        f"{figures['http_parser']} parser; ledger rows {figures['ledger_rows']}",
    ]
    if figures["failed"]:
        lines.append(f"  failures by status: {figures['statuses']}; first: {figures['errors'][:1]}")
    profile = figures.get("profile")
    if profile and "libraries" in profile:
        top = ", ".join(f"{name} {share:.0%}" for name, share in list(profile["libraries"].items())[:8])
        lines.append(f"  gateway busy time by library (py-spy, innermost frame): {top}")
        parts = sorted(profile["components"].items(), key=lambda kv: -(kv[1] or 0))
        lines.append("  by component (inclusive): " + ", ".join(f"{n} {v:.0%}" for n, v in parts if v))
    elif profile and "self" in profile:
        top = ", ".join(f"{r['function']} {r['share']:.0%}" for r in profile["self"][:5])
        lines.append(f"  cProfile, most self time: {top}")
    return lines
