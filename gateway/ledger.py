"""The usage and cost ledger: one row per request, written off the streaming path, plus the queries behind
`scripts/admin.py usage` and `feedback export`.

`Ledger.record` appends the row to a bounded in-memory queue and, as one JSON line, to this ledger's write-ahead
journal; a background thread writes the queue in batches (every `flush_interval` seconds, or as soon as `batch_rows`
rows wait). `close()` writes everything still queued. A process that never calls close() is covered too: an atexit
hook closes every open ledger, and when SIGTERM still has its default action, the first Ledger installs a handler that
turns SIGTERM into SystemExit so that the atexit hook runs (a process that handles SIGTERM itself must call close() in
its shutdown path).

The journal covers the deaths nothing runs after (SIGKILL, the OOM killer, a segfault). Each Ledger appends to its
own journal files under `journal_dir` (default: one directory per database under the cache directory), each file held
with `fcntl.flock` for as long as it is open. The writer starts a new file when it takes a batch and deletes a file
once the database holds every row in it, so at rest a ledger has one or two empty files. A new Ledger first replays
the files of processes that are gone (their lock free and their process id not running) into the database, skipping
rows already there (`on_conflict_do_nothing` on request_id), and deletes them; `admin.py ledger replay` does the same
by hand. Rows the database refuses through the whole of close() stay in the journal for the next start.

Costs: device cost = device_seconds x chips x price per chip-hour / 3600 for the replica that served the request,
or, for a request that several replicas served (a fleet's failover path "a>b", or choices routed apart), that sum over
its replicas, each share at its own replica's price (`Entry.device_seconds_by_replica`, kept in the row with each
share's cost). Token cost = (uncached prompt x prompt price + cached x cached price + completion x completion
price) / 1e6.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import operator
import os
import re
import secrets
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from engine import paths
from gateway.store import Store
from gateway.store.models import Feedback, LedgerRow

log = logging.getLogger(__name__)

DEFAULT = "*"
"""The entry of Prices.replicas / Prices.models used for names not listed."""


@dataclasses.dataclass(frozen=True)
class ReplicaPrice:
    per_chip_hour: float = 0.0
    """Price of one chip for one hour."""
    chips: int = 1
    """Chips the replica runs on: one device-second of a request occupies all of them."""


@dataclasses.dataclass(frozen=True)
class TokenPrice:
    prompt_per_million: float = 0.0
    completion_per_million: float = 0.0
    cached_per_million: float | None = None
    """Price of prompt tokens read from the prefix cache; None: the prompt price."""


@dataclasses.dataclass(frozen=True)
class Prices:
    """Prices by replica name and by model name ("*": everything not listed)."""

    replicas: dict[str, ReplicaPrice] = dataclasses.field(default_factory=dict)
    models: dict[str, TokenPrice] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prices:
        """From {"replicas": {name: {"per_chip_hour": 3.0, "chips": 8}}, "models": {name: {"prompt_per_million":
        0.1, "completion_per_million": 0.4, "cached_per_million": 0.05}}}."""
        unknown = set(data) - {"replicas", "models"}
        if unknown:
            raise ValueError(f"unknown price sections {sorted(unknown)}")
        return cls(
            {name: ReplicaPrice(**p) for name, p in data.get("replicas", {}).items()},
            {name: TokenPrice(**p) for name, p in data.get("models", {}).items()},
        )

    @classmethod
    def from_json(cls, path: str) -> Prices:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def device_cost(self, replica: str, device_seconds: float, by_replica: Mapping[str, float] | None = None) -> float:
        """`by_replica`: each replica's device-seconds, for a request several replicas served (a router's
        `device_seconds_by_replica`): the sum of `device_costs`. Without it, `replica` may still name a failover path
        ("a>b", see fleet.router): priced at its last replica, which served the rest of the request."""
        if by_replica:
            return sum(self.device_costs(by_replica).values())
        return self._replica_cost(replica.rsplit(">", 1)[-1], device_seconds)

    def device_costs(self, by_replica: Mapping[str, float]) -> dict[str, float]:
        """Each replica's device-seconds priced at that replica's chips and price per chip-hour."""
        return {name: self._replica_cost(name, seconds) for name, seconds in by_replica.items()}

    def _replica_cost(self, replica: str, device_seconds: float) -> float:
        price = self.replicas.get(replica) or self.replicas.get(DEFAULT) or ReplicaPrice()
        return device_seconds * price.chips * price.per_chip_hour / 3600.0

    def token_cost(self, model: str, prompt: int, cached: int, completion: int) -> float:
        price = self.models.get(model) or self.models.get(DEFAULT) or TokenPrice()
        cached_price = price.prompt_per_million if price.cached_per_million is None else price.cached_per_million
        uncached = max(prompt - cached, 0)
        return (
            uncached * price.prompt_per_million + cached * cached_price + completion * price.completion_per_million
        ) / 1e6


@dataclasses.dataclass
class Entry:
    """One ledger row (the LedgerRow table's columns); `day` and the costs are filled in by Ledger.record."""

    request_id: str
    created: float
    key_id: str
    user_id: str
    model: str
    replica: str
    client_address: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float = 0.0
    ttft_seconds: float = 0.0
    total_seconds: float = 0.0
    finish_reason: str = ""
    error: str | None = None
    device_seconds: float = 0.0
    cost_device: float | None = None
    cost_tokens: float | None = None
    quarantined: bool = False
    device_seconds_by_replica: dict[str, float] | None = None
    """Each replica's share of `device_seconds` when several replicas served the request; None: all of it on
    `replica` (the common case, kept as NULL rather than repeating the row's own columns)."""
    cost_device_by_replica: dict[str, float] | None = None
    """Each share's cost at its replica's price (filled in with `cost_device`, their sum), so a row keeps what it
    was charged when prices change."""
    prompt_text: str | None = dataclasses.field(default=None, repr=False)
    completion_text: str | None = dataclasses.field(default=None, repr=False)
    day: str = ""


_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(Entry))
# A journal row is a JSON array of the values in the order its file's first line names (a third cheaper to encode
# than an object), compact and without the circular-reference check (a row is flat).
_row_values = operator.attrgetter(*_ENTRY_FIELDS)
_encode_row = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_JOURNAL_HEADER = (json.dumps({"ledger_journal": 1, "fields": _ENTRY_FIELDS}) + "\n").encode()


def utc_day(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d")


def default_journal_dir(url: str) -> str:
    """The journal directory of the ledgers that write to the database at `url`: one per database (named by a hash
    of the URL without its password), so that a row is replayed into the database it was recorded for."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        parsed = parsed.set(database=os.path.abspath(parsed.database))
    digest = hashlib.sha256(parsed.render_as_string(hide_password=True).encode()).hexdigest()[:16]
    return os.path.join(paths.cache_root(), "ledger-journal", digest)


# journal-<pid>-<process start>-<ledger token>-<file number>.jsonl, ".tmp" until it is locked
_JOURNAL = re.compile(r"journal-(\d+)-(\d+)-[0-9a-f]+-\d+\.jsonl(\.tmp)?")
# what close() wrote before there was a journal (and still writes where no journal could be opened)
_SPILL = re.compile(r"ledger-unwritten-(\d+)-\d+\.jsonl")
_MAX_JOURNAL_FILES = 16
"""Open journal files per ledger at most (a backlog of rows waiting for the database spans several)."""


def _insert_statement(store: Store) -> Any:
    if store.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    # a row already written (a batch retried after a commit whose answer was lost, a journal replayed) is skipped
    return insert(LedgerRow).on_conflict_do_nothing(index_elements=["request_id"])


def _process_start(pid: int) -> str:
    """When the process started, in clock ticks since boot (Linux), which tells a reused process id from the process
    that wrote a journal; "0" where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()  # field 22; the name in (...) may hold spaces
    except (OSError, IndexError):
        return "0"


def _running(pid: int, start: str) -> bool:
    if pid <= 0:
        return False
    if start != "0" and os.path.exists("/proc/self/stat"):
        return _process_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclasses.dataclass(eq=False)
class _Segment:
    """One open, locked journal file: the rows appended to it and how many of those the writer has settled (written
    to the database, or given up on at close: then `keep`, and the file stays for the next start)."""

    path: str
    fd: int
    rows: int = 0
    settled: int = 0
    keep: bool = False


def _discard(segment: _Segment) -> None:
    # Unlinked before it is closed: the lock is held until the name is gone, so no replay reads a finished file.
    try:
        os.unlink(segment.path)
    except OSError:
        log.warning("ledger: could not delete the journal %s", segment.path, exc_info=True)
    os.close(segment.fd)


class Ledger:
    """Batched, non-blocking ledger writer with a write-ahead journal (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        prices: Prices | None = None,
        *,
        batch_rows: int = 64,
        flush_interval: float = 0.1,
        max_queue: int = 100_000,
        on_write: Callable[[list[Entry]], None] | None = None,
        handle_sigterm: bool = True,
        journal_dir: str | None = None,
        journal_fsync: bool = False,
        replay: bool = True,
    ):
        """`journal_dir`: where this ledger's journal lives, shared with the other ledgers of the same database on
        this machine (default: `default_journal_dir(store.url)`, and then the older spill files in the cache
        directory are replayed too). `journal_fsync`: flush every row to the disk before record() returns, which
        survives the machine going down too, at the price of a disk flush per request. `replay`: first replay the
        journals of ended processes (`replay_journals`; what it did is in `self.replayed`)."""
        self.store, self.prices = store, prices or Prices()
        self.batch_rows, self.flush_interval, self.max_queue = batch_rows, flush_interval, max_queue
        self.on_write = on_write
        self.written = self.batches = self.dropped = self.spilled = 0
        self.journal_dir, self.journal_fsync = journal_dir or default_journal_dir(store.url), journal_fsync
        self.journal_errors = 0  # rows record() could not append to the journal
        self._queue: collections.deque[Entry] = collections.deque()
        self._cond = threading.Condition()
        self._recorded = 0  # entries accepted by record()
        self._done = 0  # entries written, spilled or dropped
        self._flush_wanted = self._closing = False
        self._closed = False
        self._insert = _insert_statement(store)
        self.replayed = (
            replay_journals(store, self.journal_dir, legacy_dir=None if journal_dir else paths.cache_root())
            if replay
            else None
        )
        # Oldest first; record() appends to the last. A queued row is in one of these files, in queue order.
        self._segments: collections.deque[_Segment] = collections.deque()
        self._spare: _Segment | None = None  # the next file, opened by the writer outside the lock
        self._journal_name = f"journal-{os.getpid()}-{_process_start(os.getpid())}-{secrets.token_hex(4)}"
        self._journal_files = 0
        self._rotate_failing = False
        try:
            self._segments.append(self._open_segment())
        except OSError:
            log.exception(
                "ledger: no journal in %s: rows still queued when this process is killed will be lost",
                self.journal_dir,
            )
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        _LIVE.add(self)
        _install_exit_hooks(handle_sigterm)

    def record(self, entry: Entry) -> None:
        """Queues one row (costs and day filled in here) and appends it to the journal; never blocks on the
        database. When record() returns, the row is in the operating system's page cache: it survives this process
        being killed (SIGKILL, OOM, a segfault), not the machine going down unless `journal_fsync`. A full queue
        (the database has been unreachable for a long while) drops the row with an error in the log."""
        if entry.cost_device is None:
            if entry.device_seconds_by_replica:
                entry.cost_device_by_replica = self.prices.device_costs(entry.device_seconds_by_replica)
                entry.cost_device = sum(entry.cost_device_by_replica.values())
            else:
                entry.cost_device = self.prices.device_cost(entry.replica, entry.device_seconds)
        if entry.cost_tokens is None:
            entry.cost_tokens = self.prices.token_cost(
                entry.model, entry.prompt_tokens, entry.cached_tokens, entry.completion_tokens
            )
        entry.day = entry.day or utc_day(entry.created)
        try:
            line: bytes | None = (_encode_row(_row_values(entry)) + "\n").encode()  # before taking the lock
        except (TypeError, ValueError):
            log.exception("ledger: the row of request %s is not JSON: not journaled", entry.request_id)
            line = None
        with self._cond:
            if self._closed:
                raise RuntimeError("the ledger is closed")
            self._recorded += 1
            if len(self._queue) >= self.max_queue:
                self.dropped += 1
                self._done += 1
                log.error(
                    "ledger queue full (%d rows): dropped the row of request %s", self.max_queue, entry.request_id
                )
                return
            self._queue.append(entry)
            if self._segments:
                self._journal(self._segments[-1], line, entry.request_id)
            if len(self._queue) in (1, self.batch_rows):
                self._cond.notify_all()

    def _journal(self, segment: _Segment, line: bytes | None, request_id: str) -> None:
        # Under the lock, so that a file holds rows in queue order and the writer never closes it mid-write. Counted
        # whether or not the write succeeds: the writer settles rows by count, in queue order.
        segment.rows += 1
        if line is None:
            self.journal_errors += 1
            return
        try:
            written = os.write(segment.fd, line)
            if written < len(line):
                os.write(segment.fd, line[written:])
            if self.journal_fsync:
                os.fsync(segment.fd)
        except OSError:
            self.journal_errors += 1
            if self.journal_errors & (self.journal_errors - 1) == 0:  # the 1st, 2nd, 4th, ... failure
                log.exception(
                    "ledger: could not journal the row of request %s (%d rows so far)", request_id, self.journal_errors
                )

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Waits until every row recorded before the call is written; False on timeout."""
        with self._cond:
            target = self._recorded
            self._flush_wanted = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Writes everything queued (retrying the database until `timeout`, then leaving the rows in the journal for
        the next start) and stops."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join()
        self._close_journal()
        _LIVE.discard(self)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def _run(self) -> None:
        failures = 0
        while True:
            if self._segments and self._spare is None:
                self._spare = self._next_segment()
            with self._cond:
                while not self._queue and not (self._closing or self._flush_wanted):
                    self._cond.wait()  # idle: the first row of the next batch wakes us
                deadline = time.monotonic() + self.flush_interval
                while len(self._queue) < self.batch_rows and not (self._closing or self._flush_wanted):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if (
                    self._queue
                    and self._spare is not None
                    and self._segments[-1].rows
                    and len(self._segments) < _MAX_JOURNAL_FILES
                ):
                    # New rows go to a new file; the old ones go once every row in them is settled. (While the
                    # database is down, retries would start a file each; past the cap the last one takes the rows.)
                    self._segments.append(self._spare)
                    self._spare = None
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 1024))]
                closing = self._closing
                if not self._queue:
                    self._flush_wanted = False
            if batch:
                if self._write(batch):
                    failures = 0
                elif closing and time.monotonic() >= self._close_deadline:
                    self._spill(batch)
                else:
                    failures += 1
                    with self._cond:
                        self._queue.extendleft(reversed(batch))
                    time.sleep(min(0.1 * 2**failures, 5.0 if not closing else 0.5))
                    continue
            if closing:
                with self._cond:
                    if not self._queue:
                        return

    def _write(self, batch: list[Entry]) -> bool:
        try:
            with self.store.write() as s:
                # a shallow copy per row: dataclasses.asdict deep-copies every field, a third of the writer's time
                s.execute(self._insert, [{name: getattr(e, name) for name in _ENTRY_FIELDS} for e in batch])
        except sa.exc.SQLAlchemyError:
            log.warning("ledger: could not write %d rows (will retry)", len(batch), exc_info=True)
            return False
        self._settle(len(batch), keep=False)
        with self._cond:
            self.written += len(batch)
            self.batches += 1
            self._done += len(batch)
            self._cond.notify_all()
        if self.on_write is not None:
            try:
                self.on_write(batch)
            except Exception:
                log.exception("ledger on_write hook failed")
        return True

    def _spill(self, batch: list[Entry]) -> None:
        if self._segments:
            self._settle(len(batch), keep=True)
            log.error(
                "ledger: database unreachable at close; %d rows stay in the journal in %s for the next start "
                "(or `admin.py ledger replay`)",
                len(batch),
                self.journal_dir,
            )
            self.spilled += len(batch)
        else:
            path = os.path.join(self.journal_dir, f"ledger-unwritten-{os.getpid()}-{int(time.time())}.jsonl")
            try:
                os.makedirs(self.journal_dir, mode=0o700, exist_ok=True)
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as f:
                    for entry in batch:
                        f.write(json.dumps(dataclasses.asdict(entry)) + "\n")
                log.error("ledger: database unreachable at close; wrote %d rows to %s", len(batch), path)
                self.spilled += len(batch)
            except OSError:
                log.exception("ledger: lost %d rows (database unreachable, %s not writable)", len(batch), path)
                self.dropped += len(batch)
        with self._cond:
            self._done += len(batch)
            self._cond.notify_all()

    # --- the journal's files ---

    def _open_segment(self) -> _Segment:
        """A new journal file, created under a ".tmp" name, locked, then renamed: a file under a journal name is
        always locked already (a replay skips the ".tmp" file of a running process)."""
        self._journal_files += 1
        path = os.path.join(self.journal_dir, f"{self._journal_name}-{self._journal_files}.jsonl")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(path + ".tmp", flags, 0o600)
        except FileNotFoundError:  # the first file, or another ledger's close removed the empty directory
            os.makedirs(self.journal_dir, mode=0o700, exist_ok=True)
            fd = os.open(path + ".tmp", flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, _JOURNAL_HEADER)
            os.rename(path + ".tmp", path)
            if self.journal_fsync:  # the new name must survive a power loss too
                dir_fd = os.open(self.journal_dir, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path + ".tmp")
            raise
        return _Segment(path, fd)

    def _next_segment(self) -> _Segment | None:
        try:
            segment = self._open_segment()
        except OSError:
            if not self._rotate_failing:  # the current file takes the rows meanwhile; retried every batch
                log.exception("ledger: could not start a new journal file in %s", self.journal_dir)
            self._rotate_failing = True
            return None
        self._rotate_failing = False
        return segment

    def _settle(self, count: int, keep: bool) -> None:
        """Marks the oldest `count` journaled rows settled (the journal holds the queued rows in queue order) and
        deletes the files, but the one record() appends to, whose rows are all in the database. `keep`: these rows
        are not in the database; their files stay."""
        with self._cond:
            for segment in self._segments:
                take = min(count, segment.rows - segment.settled)
                segment.settled += take
                segment.keep = segment.keep or (keep and take > 0)
                count -= take
                if not count:
                    break
            finished = [s for s in list(self._segments)[:-1] if s.settled == s.rows and not s.keep]
            for segment in finished:
                self._segments.remove(segment)
        for segment in finished:
            _discard(segment)

    def _close_journal(self) -> None:
        with self._cond:
            segments = [*self._segments, *([self._spare] if self._spare is not None else [])]
            self._segments.clear()
            self._spare = None
        kept = False
        for segment in segments:
            if segment.settled == segment.rows and not segment.keep:
                _discard(segment)
            else:
                kept = True
                os.close(segment.fd)  # the lock goes with it: the next Ledger's replay takes the file
        if segments and not kept:
            with contextlib.suppress(OSError):  # not empty: another ledger's files
                os.rmdir(self.journal_dir)


@dataclasses.dataclass
class Replayed:
    """What `replay_journals` did."""

    files: int = 0
    """Journal and spill files read and deleted."""
    rows: int = 0
    """Rows read from them."""
    inserted: int = 0
    """Of those, the rows the database did not hold yet."""
    live: int = 0
    """Files left alone: their process still runs (or still holds the file's lock)."""
    bad_lines: int = 0
    """Lines that are not a row (the last line of a process killed while writing it)."""
    failed: int = 0
    """Files kept because the database refused their rows (replayed at the next try)."""


def replay_journals(store: Store, directory: str, *, legacy_dir: str | None = None) -> Replayed:
    """Writes into `store` the rows of every journal in `directory` whose process has ended (its lock free and its
    process id not running; a running process's journal is never touched), and of every spill file
    (`ledger-unwritten-*.jsonl`) in `directory` and `legacy_dir`, then deletes those files. Rows the database holds
    already are skipped, so replaying a file twice is harmless; a file whose rows the database refuses is kept."""
    result = Replayed()
    insert = _insert_statement(store)
    me = (os.getpid(), _process_start(os.getpid()))
    for folder, patterns in ((directory, (_JOURNAL, _SPILL)), (legacy_dir, (_SPILL,))):
        if not folder:
            continue
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            continue
        for name in names:
            match = next((m for m in (p.fullmatch(name) for p in patterns) if m), None)
            if match is not None and not _replay_file(store, insert, os.path.join(folder, name), match, me, result):
                break  # the database is down: the rest waits for the next try too
    if result.files or result.bad_lines or result.failed:
        log.warning(
            "ledger: replayed %d rows (%d not yet in the database) from %d journal or spill files of ended "
            "processes in %s; %d unreadable lines; %d files kept for the next try",
            result.rows,
            result.inserted,
            result.files,
            directory,
            result.bad_lines,
            result.failed,
        )
    if result.live:
        log.info("ledger: left %d journal files of running processes in %s", result.live, directory)
    return result


def _replay_file(
    store: Store, insert: Any, path: str, match: re.Match[str], me: tuple[int, str], result: Replayed
) -> bool:
    """Replays one file (see replay_journals); False when the database refused its rows."""
    try:
        with open(path, "rb") as f:
            return _replay_open_file(store, insert, f, path, match, me, result)
    except FileNotFoundError:  # another process replayed it meanwhile
        return True


def _replay_open_file(
    store: Store, insert: Any, f: Any, path: str, match: re.Match[str], me: tuple[int, str], result: Replayed
) -> bool:
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        result.live += 1
        return True
    info = os.fstat(f.fileno())
    if info.st_nlink == 0:  # replayed and deleted by another process between our open and our lock
        return True
    pid = int(match[1])
    if match.re is _JOURNAL:
        # Unlocked, yet its process runs: a ledger there closed and kept rows the database refused (replayed once
        # that process is gone, or now when it is this one), or a ".tmp" file not locked yet.
        if _running(pid, match[2]) and ((pid, match[2]) != me or match[3]):
            result.live += 1
            return True
    elif _running(pid, "0") and time.time() - info.st_mtime < 60:
        result.live += 1  # being written by an older version's close
        return True
    rows, inserted = 0, 0
    try:
        for chunk in _chunks(_read_rows(f, result), 500):
            inserted += _insert_new(store, insert, chunk)
            rows += len(chunk)
    except sa.exc.SQLAlchemyError:
        log.warning("ledger: could not replay %s (kept for the next try)", path, exc_info=True)
        result.failed += 1
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    result.files += 1
    result.rows += rows
    result.inserted += inserted
    return True


def _read_rows(f: Any, result: Replayed) -> Iterator[dict[str, Any]]:
    """The rows of a journal (a header naming the fields, then one array of values a line) or of a spill file (one
    object a line); fields this version does not know are dropped, fields it added take their defaults."""
    fields: list[str] | None = None
    for line in f:
        try:
            data = json.loads(line)
            if isinstance(data, list) and fields is not None:
                data = dict(zip(fields, data, strict=True))
            elif isinstance(data, dict) and "ledger_journal" in data:
                fields = list(data["fields"])
                continue
            entry = Entry(**{name: data[name] for name in _ENTRY_FIELDS if name in data})
            entry.day = entry.day or utc_day(entry.created)
        except (ValueError, TypeError, KeyError, OverflowError, OSError):
            result.bad_lines += 1
            continue
        yield {name: getattr(entry, name) for name in _ENTRY_FIELDS}


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _insert_new(store: Store, insert: Any, rows: list[dict[str, Any]]) -> int:
    """Inserts the rows the database does not hold yet; how many those were."""
    ids = sorted({row["request_id"] for row in rows})
    with store.write() as s:
        held = s.scalar(sa.select(sa.func.count()).select_from(LedgerRow).where(LedgerRow.request_id.in_(ids)))
        s.execute(insert, rows)
    return len(ids) - int(held or 0)


_LIVE: weakref.WeakSet[Ledger] = weakref.WeakSet()
_ATEXIT_INSTALLED = _SIGTERM_INSTALLED = False


def _close_all() -> None:
    for ledger in list(_LIVE):
        ledger.close()


def _on_sigterm(signum: int, _frame: Any) -> None:
    # Unwind the main thread (releasing whatever locks it holds) and exit through atexit, which closes the
    # ledgers; flushing here could deadlock on a lock the interrupted code holds.
    raise SystemExit(128 + signum)


def _install_exit_hooks(handle_sigterm: bool) -> None:
    global _ATEXIT_INSTALLED, _SIGTERM_INSTALLED
    if not _ATEXIT_INSTALLED:
        _ATEXIT_INSTALLED = True
        atexit.register(_close_all)
    if (
        handle_sigterm
        and not _SIGTERM_INSTALLED
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        _SIGTERM_INSTALLED = True
        signal.signal(signal.SIGTERM, _on_sigterm)


# --- queries ---

USAGE_GROUPS = {"key": LedgerRow.key_id, "user": LedgerRow.user_id, "day": LedgerRow.day, "model": LedgerRow.model}
USAGE_COLUMNS = (
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "device_seconds",
    "cost_device",
    "cost_tokens",
    "quarantined",
)


def usage(
    store: Store, by: Sequence[str] = ("user", "day"), since: str | None = None, until: str | None = None
) -> list[dict[str, Any]]:
    """Ledger sums grouped by any of key / user / day / model, ordered by the groups; `since` / `until` are UTC
    days (YYYY-MM-DD, inclusive)."""
    unknown = set(by) - set(USAGE_GROUPS)
    if unknown or not by:
        raise ValueError(f"group by one or more of {sorted(USAGE_GROUPS)}, got {list(by)}")
    groups = [USAGE_GROUPS[g].label(g) for g in by]
    query = sa.select(
        *groups,
        sa.func.count().label("requests"),
        sa.func.sum(LedgerRow.prompt_tokens).label("prompt_tokens"),
        sa.func.sum(LedgerRow.cached_tokens).label("cached_tokens"),
        sa.func.sum(LedgerRow.completion_tokens).label("completion_tokens"),
        sa.func.sum(LedgerRow.device_seconds).label("device_seconds"),
        sa.func.sum(LedgerRow.cost_device).label("cost_device"),
        sa.func.sum(LedgerRow.cost_tokens).label("cost_tokens"),
        sa.func.sum(sa.case((LedgerRow.quarantined, 1), else_=0)).label("quarantined"),
    )
    if since:
        query = query.where(LedgerRow.day >= since)
    if until:
        query = query.where(LedgerRow.day <= until)
    query = query.group_by(*[USAGE_GROUPS[g] for g in by]).order_by(*[USAGE_GROUPS[g] for g in by])
    with store.read() as s:
        rows = [dict(r._mapping) for r in s.execute(query)]
    for row in rows:
        for name in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "quarantined"):
            row[name] = int(row[name] or 0)
        for name in ("device_seconds", "cost_device", "cost_tokens"):
            row[name] = float(row[name] or 0.0)
    return rows


_EXPORTED_LEDGER_FIELDS = (
    "key_id",
    "user_id",
    "model",
    "replica",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "ttft_seconds",
    "total_seconds",
    "finish_reason",
    "cost_device",
    "cost_tokens",
    "quarantined",
    "prompt_text",
    "completion_text",
)


def feedback_rows(store: Store, since: float | None = None) -> Iterator[dict[str, Any]]:
    """Every feedback row joined to its request's ledger row (ledger fields None where the row is missing)."""
    query = (
        sa.select(Feedback, LedgerRow)
        .join(LedgerRow, LedgerRow.request_id == Feedback.request_id, isouter=True)
        .order_by(Feedback.id)
    )
    if since is not None:
        query = query.where(Feedback.created >= since)
    with store.read() as s:
        for fb, row in s.execute(query):
            out: dict[str, Any] = {
                "request_id": fb.request_id,
                "rating": fb.rating,
                "comment": fb.comment,
                "tags": list(fb.tags or []),
                "created": fb.created,
                "feedback_key_id": fb.key_id,
            }
            for name in _EXPORTED_LEDGER_FIELDS:
                out[name] = None if row is None else getattr(row, name)
            if row is not None:
                out["request_created"] = row.created
            yield out
