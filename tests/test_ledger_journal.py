"""The ledger's write-ahead journal (gateway/ledger.py): a process killed with rows still queued loses none of them,
a running process's journal is never replayed by another, rotation keeps rows recorded during a batch write, the
journal stays small, and the older spill files are replayed too. Real child processes and SIGKILL, on SQLite (WAL)
and, for the kill, on PostgreSQL too."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import sqlalchemy as sa

from gateway import ledger as ledger_module
from gateway.ledger import Entry, Ledger
from gateway.store import Store
from gateway.store.models import LedgerRow
from tests.postgres_support import create_database, postgres_url  # noqa: F401  (the session fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/gateway.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/gateway.db"
    return create_database(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(url):
    s = Store(url)
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def journal(tmp_path) -> str:
    return str(tmp_path / "journal")


def entry(request_id: str, i: int = 0) -> Entry:
    return Entry(request_id, time.time(), "k1", "u1", "smollm2", "r0", completion_tokens=i, device_seconds=0.5)


def rows_in(store: Store, prefix: str) -> list[tuple[str, int]]:
    with store.read() as s:
        query = sa.select(LedgerRow.request_id, LedgerRow.completion_tokens).where(LedgerRow.request_id.like(prefix))
        return sorted(s.execute(query).all())


def journal_rows(directory: str, busy: bool = False) -> list[str]:
    """The request ids in every journal file in `directory` (each file: a header line, then one array a line).
    `busy`: the writer is running, so a file may go, or be new, between listing and reading it."""
    ids = []
    for name in sorted(os.listdir(directory)):
        try:
            with open(os.path.join(directory, name)) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            assert busy
            continue
        if busy and not lines:
            continue
        fields = json.loads(lines[0])["fields"]
        ids += [dict(zip(fields, json.loads(line), strict=True))["request_id"] for line in lines[1:]]
    return ids


def writer_ready(directory: str) -> list[str]:
    """The journal files once the writer has opened its next one (the file record() appends to, and that one)."""
    deadline = time.monotonic() + 10
    while True:
        names = sorted(os.listdir(directory))
        if len(names) == 2 and not any(n.endswith(".tmp") for n in names):
            return names
        assert time.monotonic() < deadline, names
        time.sleep(0.01)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from gateway.ledger import Entry, Ledger
    from gateway.store import Store
    ledger = Ledger(Store({url!r}), batch_rows=100_000, flush_interval=60.0, journal_dir={journal!r})
    for i in range({rows}):
        ledger.record(Entry(f"kill-{{i}}", time.time(), "k1", "u1", "m", "r0", completion_tokens=i))
    print("recorded", ledger.written, ledger.pending, flush=True)
    time.sleep(60)
    """
)

# The writer's first batch (rows 0-2) is held inside its database write while rows 3 and 4 are recorded: they land
# in the journal file the writer rotated to, which must outlive the deletion of the file of the batch.
SLOW_CHILD = textwrap.dedent(
    """
    import contextlib, sys, threading, time
    sys.path.insert(0, {root!r})
    from gateway.ledger import Entry, Ledger
    from gateway.store import Store
    store = Store({url!r})
    writing, go, committed = threading.Event(), threading.Event(), threading.Event()
    ledger = Ledger(
        store, batch_rows=3, flush_interval=60.0, journal_dir={journal!r}, on_write=lambda b: committed.set()
    )
    real_write = store.write

    @contextlib.contextmanager
    def slow_write():
        writing.set()
        go.wait(10)
        with real_write() as s:
            yield s

    store.write = slow_write
    for i in range(3):
        ledger.record(Entry(f"kill-{{i}}", time.time(), "k1", "u1", "m", "r0", completion_tokens=i))
    assert writing.wait(10)
    for i in range(3, 5):
        ledger.record(Entry(f"kill-{{i}}", time.time(), "k1", "u1", "m", "r0", completion_tokens=i))
    go.set()
    assert committed.wait(10)  # the batch's file is deleted before on_write runs
    print("recorded", ledger.written, ledger.pending, flush=True)
    time.sleep(60)
    """
)


def start(script: str, **fields) -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen(
        [sys.executable, "-c", script.format(root=ROOT, **fields)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = child.stdout.readline()
    if not line:
        child.wait(10)
        pytest.fail(f"child failed: {child.stderr.read()}")
    return child, line


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL


def test_rows_queued_when_the_process_is_killed_are_replayed_exactly_once(any_url, journal):
    url, rows = any_url, 2000
    store = Store(url)
    store.migrate()
    child, line = start(CHILD, url=url, journal=journal, rows=rows)
    try:
        assert line.split() == ["recorded", "0", str(rows)]  # nothing written: every row still queued
        writer_ready(journal)
    finally:
        kill(child)
    assert rows_in(store, "kill-%") == []
    assert len(journal_rows(journal)) == rows
    # a row the database already holds (a batch committed just before the kill) is skipped, not doubled; the last
    # line cut short by a kill mid-write is counted and skipped
    with store.write() as s:
        s.add(LedgerRow(**{**dataclasses.asdict(entry("kill-7", 7)), "day": "2026-01-01"}))
    # the rows are in one file; the other is the writer's next one, opened ahead, empty
    path = max((os.path.join(journal, n) for n in os.listdir(journal)), key=os.path.getsize)
    with open(path, "a") as f:
        f.write('["kill-torn", 1.0, "k1"')

    ledger = Ledger(store, journal_dir=journal, handle_sigterm=False)
    try:
        assert ledger.replayed is not None
        assert (ledger.replayed.rows, ledger.replayed.inserted) == (rows, rows - 1)
        assert ledger.replayed.bad_lines == 1 and ledger.replayed.live == 0
        assert rows_in(store, "kill-%") == sorted((f"kill-{i}", i) for i in range(rows))
        assert not os.path.exists(path)
    finally:
        ledger.close()
        store.close()
    assert not os.path.exists(journal)  # nothing left: the last ledger removed the empty directory


def test_a_running_process_journal_is_never_replayed(store, url, journal):
    child, line = start(CHILD, url=url, journal=journal, rows=50)
    try:
        assert line.split() == ["recorded", "0", "50"]
        child_files = writer_ready(journal)  # the child holds the locks of both
        ledger = Ledger(store, journal_dir=journal, handle_sigterm=False)
        ledger.close()
        assert ledger.replayed.live == len(child_files) and ledger.replayed.rows == 0
        assert sorted(os.listdir(journal)) == child_files
        assert rows_in(store, "kill-%") == [] and len(journal_rows(journal)) == 50
        # An unlocked journal named after a running process (here a journal left by a closed ledger of the child,
        # faked by copying the child's file under another name) is left alone too, and replayed once it is gone.
        name = max(child_files, key=lambda n: os.path.getsize(os.path.join(journal, n)))
        pid, start_ticks = name.split("-")[1:3]
        assert int(pid) == child.pid
        unlocked = os.path.join(journal, f"journal-{pid}-{start_ticks}-0-1.jsonl")
        with open(os.path.join(journal, name), "rb") as src, open(unlocked, "wb") as dst:
            dst.write(src.read())
        assert ledger_module.replay_journals(store, journal).live == len(os.listdir(journal))
    finally:
        kill(child)
    files = len(os.listdir(journal))
    done = ledger_module.replay_journals(store, journal)
    assert (done.files, done.rows, done.inserted, done.live) == (files, 100, 50, 0)
    assert len(rows_in(store, "kill-%")) == 50
    assert os.listdir(journal) == []


def test_a_row_recorded_during_a_batch_write_survives_the_rotation(store, url, journal):
    child, line = start(SLOW_CHILD, url=url, journal=journal)
    try:
        assert line.split() == ["recorded", "3", "2"]
        # the file of the committed batch is gone; the rows recorded meanwhile are in the one the writer rotated to
        writer_ready(journal)
        assert sorted(journal_rows(journal)) == ["kill-3", "kill-4"]
    finally:
        kill(child)
    ledger = Ledger(store, journal_dir=journal, handle_sigterm=False)
    ledger.close()
    assert (ledger.replayed.rows, ledger.replayed.inserted) == (2, 2)
    assert rows_in(store, "kill-%") == [(f"kill-{i}", i) for i in range(5)]


def test_the_journal_stays_small_in_steady_state(store, journal):
    ledger = Ledger(store, batch_rows=16, flush_interval=0.005, journal_dir=journal, handle_sigterm=False)
    other = None
    try:
        most_files = most_rows = 0
        for burst in range(60):
            for i in range(20):
                ledger.record(entry(f"steady-{burst}-{i}"))
            time.sleep(0.002)
            names = os.listdir(journal)
            most_files = max(most_files, len(names))
            if burst % 10 == 0:
                most_rows = max(most_rows, len(journal_rows(journal, busy=True)))
        assert ledger.flush(10)
        # at rest: the file record() appends to and the writer's next one, each just its header
        assert len(os.listdir(journal)) <= 2 and journal_rows(journal) == []
        assert most_files <= 4 and most_rows < 200, (most_files, most_rows)
        assert ledger.written == 1200 and ledger.batches > 10
        # another ledger on the same journal, in the same process, leaves a live ledger's files alone
        ledger.record(entry("steady-last"))
        other = Ledger(store, journal_dir=journal, handle_sigterm=False)
        assert other.replayed.rows == 0 and other.replayed.live >= 1
        assert ledger.flush(10)
    finally:
        ledger.close()
        if other is not None:
            other.close()
    assert len(rows_in(store, "steady-%")) == 1201
    assert not os.path.exists(journal)


def test_rows_the_database_refuses_at_close_stay_in_the_journal(store, journal, monkeypatch):
    ledger = Ledger(store, journal_dir=journal, journal_fsync=True, handle_sigterm=False)

    def refuse():
        raise sa.exc.OperationalError("INSERT", None, Exception("database is down"))

    monkeypatch.setattr(store, "write", refuse)
    for i in range(5):
        ledger.record(entry(f"down-{i}", i))
    ledger.close(timeout=0.2)
    assert ledger.spilled == 5 and ledger.written == 0 and ledger.journal_errors == 0
    assert sorted(journal_rows(journal)) == [f"down-{i}" for i in range(5)]

    monkeypatch.undo()  # the database is back; this process's closed ledger released its files
    again = Ledger(store, journal_dir=journal, handle_sigterm=False)
    again.close()
    assert (again.replayed.rows, again.replayed.inserted) == (5, 5)
    assert rows_in(store, "down-%") == [(f"down-{i}", i) for i in range(5)]


def test_older_spill_files_are_replayed_into_the_default_journal_database(store, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MESHSERVE_CACHE", str(cache))
    cache.mkdir()
    spill = cache / f"ledger-unwritten-{dead_pid()}-1700000000.jsonl"  # what close() wrote before the journal
    with open(spill, "w") as f:
        for i in range(3):
            f.write(json.dumps(dataclasses.asdict(entry(f"spill-{i}", i))) + "\n")
    ledger = Ledger(store, handle_sigterm=False)
    try:
        assert ledger.journal_dir == ledger_module.default_journal_dir(store.url)
        assert ledger.journal_dir.startswith(str(cache / "ledger-journal"))
        assert (ledger.replayed.files, ledger.replayed.rows, ledger.replayed.inserted) == (1, 3, 3)
        assert not spill.exists()
        assert [r for r, _ in rows_in(store, "spill-%")] == ["spill-0", "spill-1", "spill-2"]
    finally:
        ledger.close()


def test_admin_ledger_replay(store, url, journal):
    pid = dead_pid()
    os.makedirs(journal)
    with open(os.path.join(journal, f"journal-{pid}-0-abc-1.jsonl"), "w") as f:
        fields = ["request_id", "created", "key_id", "user_id", "model", "replica", "completion_tokens"]
        f.write(json.dumps({"ledger_journal": 1, "fields": fields}) + "\n")
        f.write(json.dumps(["admin-1", 1.0, "k1", "u1", "m", "r0", 3]) + "\n")  # fewer fields: the rest default
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "admin.py"),
            "ledger",
            "replay",
            f"--db={url}",
            f"--dir={journal}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("replayed 1 rows (1 not yet in the database) from 1 files"), out.stdout
    assert rows_in(store, "admin-%") == [("admin-1", 3)]
