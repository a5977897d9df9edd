"""A throwaway PostgreSQL server for tests: initdb in a temporary directory, a free port on 127.0.0.1, torn down at
the end of the session. Nothing is skipped: when the server cannot start, the test fails with the reason.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user (else `nobody`) through
runuser. The binaries come from PATH or /usr/lib/postgresql/*/bin (Debian's `postgresql` package, which
`make setup-test` installs when initdb is missing).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

_counter = itertools.count()


def _binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} is not installed (run `make setup-test`, which installs postgresql)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user() -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix that runs a binary as a non-root user, and that user (None when not root)."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"], user
    pytest.fail("running as root and there is neither a postgres nor a nobody user to run PostgreSQL as")


def _run(cmd: list[str], what: str, timeout: float = 60) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"PostgreSQL {what} failed: {e}")
    if done.returncode != 0:
        pytest.fail(f"PostgreSQL {what} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Starts a server and yields the URL of its `postgres` database (user postgres, trust authentication)."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    prefix, user = _as_server_user()
    root = tempfile.mkdtemp(prefix="meshserve-pg-")
    data = os.path.join(root, "data")
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    port = _free_port()
    log = os.path.join(root, "server.log")
    try:
        _run([*prefix, initdb, "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"], "initdb")
        options = (
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        _run([*prefix, pg_ctl, "-D", data, "-o", options, "-l", log, "-w", "-t", "60", "start"], "start")
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*prefix, pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True)
    except BaseException:
        if os.path.exists(log):
            with open(log) as f:
                print(f"PostgreSQL server log:\n{f.read()[-4000:]}")
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str) -> str:
    """A fresh, empty database on the server; returns its URL."""
    import psycopg

    name = f"test_{os.getpid()}_{next(_counter)}"
    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a session-wide throwaway PostgreSQL server's default database."""
    with postgres_server() as url:
        yield url
