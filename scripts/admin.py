"""Administers the gateway's store: users, API keys, policies, limits, flags, usage and feedback.

python scripts/admin.py user create --name=alice
python scripts/admin.py user list | disable --user=alice [--enable]
python scripts/admin.py key create --user=alice --name=laptop        # prints the secret, once
python scripts/admin.py key list [--user=alice] | rotate --key=ID | revoke --key=ID
python scripts/admin.py policy set --key=ID --max_tokens_cap=512 --priority_class=paid --preferences='{"tone": "brief"}'
python scripts/admin.py policy set --key=ID --quarantine              # --noquarantine lifts it
python scripts/admin.py policy set --user=ops --operator               # may open the fleet dashboard
python scripts/admin.py policy show --user=alice [--audit]
python scripts/admin.py limits set --user=alice --tokens_per_minute=20000 --concurrent_streams=4   # -1: unlimited
python scripts/admin.py limits show --key=ID
python scripts/admin.py flags list [--all] | review --flag=3
python scripts/admin.py usage --by=user,day --since=2026-01-01 --format=csv --png=usage.png
python scripts/admin.py feedback export --out=feedback.jsonl
python scripts/admin.py ledger replay [--dir=DIR]   # ledger rows left in the journals of killed gateways

--db=URL selects the database everywhere (default: $MESHSERVE_GATEWAY_DB, else SQLite at $MESHSERVE_CACHE/gateway.db);
the schema is migrated to the newest version first. Every policy or limits change is audited under --who.
"""

from __future__ import annotations

import csv
import datetime
import getpass
import io
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

# Run as a plain script, Python puts scripts/ on the path, not the repository root that holds the packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from engine import paths
from gateway import ledger
from gateway.keys import KeyStore, NotFoundError
from gateway.limits import LIMIT_NAMES, Limiter
from gateway.policy import FlagMonitor, PolicyStore
from gateway.store import Store, default_url

_DB = flags.DEFINE_string("db", None, "Database URL (sqlite:///path or postgresql+psycopg://...); default: see above.")
_WHO = flags.DEFINE_string("who", None, "Who makes the change, for the audit trail (default: user@host).")
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "csv", "json"], "Output format of listings.")
_NAME = flags.DEFINE_string("name", None, "user create: the user's name; key create: a label for the key.")
_USER = flags.DEFINE_string("user", None, "A user, by id or name.")
_KEY = flags.DEFINE_string("key", None, "A key, by its public id.")
_ENABLE = flags.DEFINE_bool("enable", False, "user disable: enable the user again instead.")
_ALL = flags.DEFINE_bool("all", False, "flags list: include reviewed flags.")
_FLAG = flags.DEFINE_integer("flag", None, "flags review: the flag's id.")
_AUDIT = flags.DEFINE_bool("audit", False, "policy show / limits show: print the audit trail too.")
_BY = flags.DEFINE_list("by", ["user", "day"], "usage: group by any of key, user, day, model.")
_SINCE = flags.DEFINE_string("since", None, "usage: first UTC day (YYYY-MM-DD).")
_UNTIL = flags.DEFINE_string("until", None, "usage: last UTC day (YYYY-MM-DD).")
_PNG = flags.DEFINE_string("png", None, "usage: also draw tokens and cost per day per user into this PNG.")
_OUT = flags.DEFINE_string("out", None, "feedback export: the JSONL file to write.")
_DIR = flags.DEFINE_string(
    "dir", None, "ledger replay: the journal directory (default: this database's, plus older spill files)."
)

# policy set
_SYSTEM_PROMPT = flags.DEFINE_string("system_prompt", None, "Default system prompt ('' unsets).")
_PREFERENCES = flags.DEFINE_string("preferences", None, 'JSON object, e.g. {"language": "French"} ("null" unsets).')
_SAMPLING = flags.DEFINE_string("sampling", None, 'JSON object of default sampling values, e.g. {"temperature": 0.7}.')
_MAX_TOKENS_CAP = flags.DEFINE_integer("max_tokens_cap", None, "Largest max_tokens (0 unsets).")
_ALLOWED_PARAMS = flags.DEFINE_list("allowed_params", None, "Sampling parameters the key may set ('' allows all).")
_PRIORITY_CLASS = flags.DEFINE_string("priority_class", None, "paid, standard, free or quarantine ('' unsets).")
_REGION = flags.DEFINE_string(
    "region",
    None,
    "Policy: the fleet region whose replicas serve first, over the caller's x-meshserve-region ('' unsets).",
)
_ALIASES = flags.DEFINE_string("model_aliases", None, 'JSON object, e.g. {"gpt-4o": "smollm2-135m"}.')
_LOG_CONTENT = flags.DEFINE_bool("log_content", None, "Keep prompt and completion text in the ledger.")
_QUARANTINE = flags.DEFINE_bool("quarantine", None, "Serve this key or user under the quarantine persona.")
_Q_PROMPT = flags.DEFINE_string("quarantine_prompt", None, "The quarantine persona's system prompt ('' unsets).")
_Q_MAX_TOKENS = flags.DEFINE_integer("quarantine_max_tokens", None, "max_tokens cap under quarantine (0 unsets).")
_OPERATOR = flags.DEFINE_bool(
    "operator", None, "The operator role: may open /fleet and /fleet.json (--nooperator lifts it)."
)
_REPLACE = flags.DEFINE_bool("replace", False, "policy set: start from an empty policy instead of the current one.")

# limits set: -1 is unlimited
_LIMIT_FLAGS = {
    name: flags.DEFINE_integer(name, None, f"limits set: {name.replace('_', ' ')} (-1: unlimited).")
    for name in LIMIT_NAMES
}

COMMANDS = {
    "user": ("create", "list", "disable"),
    "key": ("create", "list", "rotate", "revoke"),
    "policy": ("set", "show"),
    "limits": ("set", "show"),
    "flags": ("list", "review"),
    "usage": (),
    "feedback": ("export",),
    "ledger": ("replay",),
}


def _fail(message: str) -> NoReturn:
    print(f"admin: {message}", file=sys.stderr)
    sys.exit(2)


def _who() -> str:
    if _WHO.value:
        return _WHO.value
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _time(t: float | None) -> str:
    if t is None:
        return ""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _emit(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Prints rows as a table, CSV or JSON (--format)."""
    if _FORMAT.value == "json":
        print(json.dumps([{c: r.get(c) for c in columns} for r in rows], indent=1))
        return
    if _FORMAT.value == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        print(out.getvalue(), end="")
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _subject(keys: KeyStore) -> tuple[str, str]:
    """("key", id) or ("user", id) from --key / --user (exactly one)."""
    if (_KEY.value is None) == (_USER.value is None):
        _fail("name exactly one of --key or --user")
    if _KEY.value is not None:
        return "key", keys.get_key(_KEY.value).id
    return "user", keys.get_user(_USER.value).id


def _json_flag(flag: flags.FlagHolder) -> Any:
    try:
        value = json.loads(flag.value)
    except json.JSONDecodeError as e:
        _fail(f"--{flag.name} is not valid JSON: {e}")
    if value is not None and not isinstance(value, dict):
        _fail(f"--{flag.name} must be a JSON object")
    return value


def _policy_changes() -> dict[str, Any]:
    changes: dict[str, Any] = {}

    def present(holder: flags.FlagHolder) -> bool:
        return flags.FLAGS[holder.name].present

    for holder in (_SYSTEM_PROMPT, _PRIORITY_CLASS, _Q_PROMPT, _REGION):
        if present(holder):
            changes[holder.name] = holder.value or None
    for holder in (_MAX_TOKENS_CAP, _Q_MAX_TOKENS):
        if present(holder):
            changes[holder.name] = holder.value or None
    for holder in (_PREFERENCES, _SAMPLING, _ALIASES):
        if present(holder):
            changes[holder.name] = _json_flag(holder)
    if present(_ALLOWED_PARAMS):
        changes["allowed_params"] = [p for p in _ALLOWED_PARAMS.value if p] or None
    for holder in (_LOG_CONTENT, _QUARANTINE, _OPERATOR):
        if present(holder):
            changes[holder.name] = holder.value
    return changes


def _user_names(keys: KeyStore) -> dict[str, str]:
    return {u.id: u.name for u in keys.list_users()}


def _draw_usage(rows: list[dict[str, Any]], names: dict[str, str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = sorted({r["day"] for r in rows})
    users = sorted({r["user"] for r in rows}, key=lambda u: names.get(u, u))
    fig, (tokens_ax, cost_ax) = plt.subplots(2, 1, figsize=(max(6.0, 0.6 * len(days) + 3), 7), sharex=True)
    for user in users:
        by_day = {r["day"]: r for r in rows if r["user"] == user}
        tokens = [by_day[d]["prompt_tokens"] + by_day[d]["completion_tokens"] if d in by_day else 0 for d in days]
        cost = [by_day[d]["cost_device"] + by_day[d]["cost_tokens"] if d in by_day else 0.0 for d in days]
        label = names.get(user, user)
        tokens_ax.plot(days, tokens, marker="o", label=label)
        cost_ax.plot(days, cost, marker="o", label=label)
    tokens_ax.set_ylabel("tokens (prompt + completion)")
    tokens_ax.set_title("Gateway usage per day (UTC)")
    cost_ax.set_ylabel("cost (device + tokens)")
    cost_ax.set_xlabel("day")
    tokens_ax.legend(loc="upper left", fontsize="small")
    tokens_ax.grid(alpha=0.3)
    cost_ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(command: str, sub: str | None, store: Store) -> None:
    keys = KeyStore(store)
    if command == "user":
        if sub == "create":
            if not _NAME.value:
                _fail("user create needs --name")
            user = keys.create_user(_NAME.value)
            _emit([vars(user) | {"created": _time(user.created)}], ["id", "name", "created"])
        elif sub == "list":
            _emit(
                [vars(u) | {"created": _time(u.created)} for u in keys.list_users()],
                ["id", "name", "created", "disabled"],
            )
        else:
            if not _USER.value:
                _fail("user disable needs --user")
            user = keys.set_user_disabled(_USER.value, not _ENABLE.value)
            print(f"user {user.name} ({user.id}) {'disabled' if user.disabled else 'enabled'}")
    elif command == "key":
        columns = ["id", "user", "name", "created", "revoked_at", "last_used"]
        if sub in ("create", "rotate"):
            if sub == "create":
                if not _USER.value:
                    _fail("key create needs --user")
                new = keys.create_key(_USER.value, _NAME.value or "")
            else:
                if not _KEY.value:
                    _fail("key rotate needs --key")
                new = keys.rotate_key(_KEY.value)
            if _FORMAT.value == "json":
                print(json.dumps({"id": new.info.id, "user_id": new.info.user_id, "secret": new.secret}))
            else:
                print(f"key {new.info.id} of user {new.info.user_id} ({new.info.name or 'no name'})")
                print(new.secret)
            print("Store the secret now: it is not kept anywhere and cannot be shown again.", file=sys.stderr)
        elif sub == "list":
            names = _user_names(keys)
            _emit(
                [
                    vars(k)
                    | {
                        "user": names.get(k.user_id, k.user_id),
                        "created": _time(k.created),
                        "revoked_at": _time(k.revoked_at),
                        "last_used": _time(k.last_used),
                    }
                    for k in keys.list_keys(_USER.value)
                ],
                columns,
            )
        else:
            if not _KEY.value:
                _fail("key revoke needs --key")
            info = keys.revoke_key(_KEY.value)
            print(f"key {info.id} revoked at {_time(info.revoked_at)}")
    elif command == "policy":
        policies = PolicyStore(store)
        kind, subject_id = _subject(keys)
        if sub == "set":
            changes = _policy_changes()
            if not changes and not _REPLACE.value:
                _fail("policy set: give at least one policy flag (see --help)")
            policy = policies.set(kind, subject_id, _who(), changes, replace=_REPLACE.value)
            print(json.dumps({"subject": f"{kind}:{subject_id}", "policy": policy.to_dict()}, indent=1))
        else:
            print(json.dumps({"subject": f"{kind}:{subject_id}", "policy": policies.get(kind, subject_id).to_dict()}))
            if _AUDIT.value:
                _print_audit(policies, kind, subject_id, "policy")
    elif command == "limits":
        limiter = Limiter(store)
        kind, subject_id = _subject(keys)
        if sub == "set":
            changes = {
                name: (None if holder.value < 0 else holder.value)
                for name, holder in _LIMIT_FLAGS.items()
                if flags.FLAGS[name].present
            }
            if not changes:
                _fail(f"limits set: give at least one of --{', --'.join(LIMIT_NAMES)}")
            limits = limiter.set(kind, subject_id, _who(), **changes)
        else:
            limits = limiter.get(kind, subject_id)
        _emit([{"subject": f"{kind}:{subject_id}", **limits.as_dict()}], ["subject", *LIMIT_NAMES])
        if sub == "show" and _AUDIT.value:
            _print_audit(PolicyStore(store), kind, subject_id, "limits")
    elif command == "flags":
        monitor = FlagMonitor(store)
        if sub == "list":
            _emit(
                [
                    vars(f) | {"created": _time(f.created), "reviewed_at": _time(f.reviewed_at)}
                    for f in monitor.list_flags(_ALL.value)
                ],
                ["id", "key_id", "reason", "detail", "created", "reviewed", "reviewed_by"],
            )
        else:
            if _FLAG.value is None:
                _fail("flags review needs --flag")
            monitor.review(_FLAG.value, _who())
            print(f"flag {_FLAG.value} reviewed")
    elif command == "usage":
        rows = ledger.usage(store, _BY.value, _SINCE.value, _UNTIL.value)
        names = _user_names(keys)
        columns = list(_BY.value)
        if "user" in _BY.value:
            for r in rows:
                r["user_name"] = names.get(r["user"], r["user"])
            columns.insert(columns.index("user") + 1, "user_name")
        _emit(rows, [*columns, *ledger.USAGE_COLUMNS])
        if _PNG.value:
            daily = (
                rows
                if list(_BY.value) == ["user", "day"]
                else ledger.usage(store, ["user", "day"], _SINCE.value, _UNTIL.value)
            )
            _draw_usage(daily, names, _PNG.value)
            print(f"wrote {_PNG.value}", file=sys.stderr)
    elif command == "feedback":
        if not _OUT.value:
            _fail("feedback export needs --out")
        count = 0
        with open(_OUT.value, "w") as f:
            for row in ledger.feedback_rows(store):
                f.write(json.dumps(row) + "\n")
                count += 1
        print(f"wrote {count} feedback rows to {_OUT.value}", file=sys.stderr)
    elif command == "ledger":
        # what every gateway's start does too; by hand for a journal no gateway of this database will start on
        directory = _DIR.value or ledger.default_journal_dir(store.url)
        done = ledger.replay_journals(store, directory, legacy_dir=None if _DIR.value else paths.cache_root())
        print(
            f"replayed {done.rows} rows ({done.inserted} not yet in the database) from {done.files} files in "
            f"{directory}; left {done.live} files of running processes, {done.failed} the database refused; "
            f"{done.bad_lines} unreadable lines"
        )


def _print_audit(policies: PolicyStore, kind: str, subject_id: str, what: str) -> None:
    rows = [
        {"at": _time(a.at), "who": a.who, "before": a.before, "after": a.after}
        for a in policies.audit(kind, subject_id)
        if a.what == what
    ]
    _emit(rows, ["at", "who", "before", "after"])


def main(argv: list[str]) -> None:
    args = argv[1:]
    if not args or args[0] not in COMMANDS:
        raise app.UsageError(f"name a command: {', '.join(COMMANDS)}")
    command, subs = args[0], COMMANDS[args[0]]
    sub = None
    if subs:
        if len(args) != 2 or args[1] not in subs:
            raise app.UsageError(f"{command} takes one of: {', '.join(subs)}")
        sub = args[1]
    elif len(args) != 1:
        raise app.UsageError(f"unexpected arguments: {args[1:]}")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # a first run's migration is no news here
    store = Store(_DB.value or default_url())
    try:
        store.migrate()
        run(command, sub, store)
    except (NotFoundError, ValueError, LookupError) as e:
        _fail(str(e))
    finally:
        store.close()


if __name__ == "__main__":
    app.run(main)
