"""Security checks with real workers.

* Stream types and ids are data: a run over streams with SQL, LIKE, glob, hash-tag and
  Unicode look-alike names compacts each of them individually and loses nothing.
* Task messages are JSON only: a pickled (or YAML) message, an undecodable body and a
  body of the wrong shape are refused without running anything, and the worker lives on.
* Passwords of the database and of Redis never reach a log line, a CLI output, a task
  result, a run's progress or the metrics page.

The workers of the first test import this module as a decider module (it registers the
odd stream types below), so it imports only what a worker can use: ``tests.fleet.conftest``
(and with it pytest's fixtures and ``tests.conftest``) is imported for type checking only.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import pickle
import shlex
import subprocess
import sys
import time
import unicodedata
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus

import pytest
import redis
from celery import Celery
from kombu import Connection, Producer
from sqlalchemy.engine import make_url

from eskit_tasks import NewEvent, SqlSnapshotStore, compact_all, load_state, register_decider
from eskit_tasks.fleet.constants import COMPACTION_QUEUE, LOCK_PREFIX, RUN_PREFIX
from eskit_tasks.fleet.runs import compaction_result
from eskit_tasks.tasks import compact_stream
from eskit_tasks.testing.deciders import Ledger, ledger_fold
from eskit_tasks.testing.services import CELERY, RedisServer, free_port, worker_env
from tests import REPO

if TYPE_CHECKING:
    from eskit_tasks.testing.services import Worker
    from tests.fleet.conftest import Fleet

# -- odd stream types, registered in the test process and in the workers ---------------

DROP_STREAMS = "'; DROP TABLE eskit_streams; --"
RUN_TYPES = ["a:b", "a", "ledger", "%", "_", "{tag}", DROP_STREAMS]
DECOY_TYPES = ["A:B", "z"]  # registered, but outside the run's stream types
for _stream_type in [*RUN_TYPES, *DECOY_TYPES]:
    if _stream_type != "ledger":
        register_decider(_stream_type, Ledger(), dict)

NFC = unicodedata.normalize("NFC", "caf\u00e9")
NFD = unicodedata.normalize("NFD", NFC)

HOSTILE_STREAMS = [
    ("a:b", "c"),
    ("a", "b:c"),
    ("ledger", "'; DROP TABLE eskit_events; --"),
    ("ledger", "*"),
    ("ledger", "?"),
    ("ledger", "[a]"),
    ("ledger", "{tag}"),
    ("ledger", ":"),
    ("ledger", NFC),
    ("ledger", NFD),
    ("ledger", "\u202e\U0001f642\U0001f468\u200d\U0001f469\u200d\U0001f467"),
    ("ledger", "%"),
    ("ledger", "_"),
    ("ledger", "\\"),
    ("ledger", "x" * 10_000),
    ("%", "%"),
    ("_", "_"),
    ("{tag}", "{tag}"),
    (DROP_STREAMS, "x"),
]
DECOYS = [("A:B", "c"), ("z", "b:c")]
DECIDERS_WITH_THIS_MODULE = "tests.fleet_deciders,tests.fleet.test_security"


def _wait(check: Callable[[], Any], timeout: float, what: str, poll: float = 0.1) -> Any:
    from tests.fleet.conftest import wait_until

    return wait_until(check, timeout, what, poll)


# -- 1. ids are data, with real workers -------------------------------------------------


def test_a_run_over_hostile_ids_compacts_each_stream_individually(fleet: Fleet):
    """compact_all over streams named with SQL, LIKE wildcards, globs, hash tags, NFC/NFD
    look-alikes, RTL marks, emoji and 10k characters, plus pairs that collide when
    joined naively: each stream is compacted once, as itself, nothing is lost, and
    streams of types outside the filter (but matched by it as a LIKE pattern or
    case-insensitively) are untouched."""
    assert NFC != NFD
    sizes: dict[tuple[str, str], int] = {}
    for n, pair in enumerate([*HOSTILE_STREAMS, *DECOYS]):
        sizes[pair] = 10 + n
        fleet.seed(*pair, sizes[pair])
    fleet.worker("ids", concurrency=2, ESKIT_DECIDER_MODULES=DECIDERS_WITH_THIS_MODULE)

    run = compact_all(min_events=1, retain_last=2, stream_types=RUN_TYPES)
    final = run.wait(timeout=180)
    assert final.outcomes == {"compacted": len(HOSTILE_STREAMS)}, fleet.worker_logs()
    assert (final.candidates, final.done) == (len(HOSTILE_STREAMS), len(HOSTILE_STREAMS))
    assert run.summary().failed_streams == []

    snaps = SqlSnapshotStore(fleet.store.engine, create_tables=False)
    for pair in HOSTILE_STREAMS:
        n = sizes[pair]
        [row] = fleet.store.compaction_log(*pair)
        assert (row.stream_type, row.stream_id) == pair
        assert (row.events_deleted, row.through_version, row.head_version) == (n - 2, n - 2, n)
        assert fleet.live_versions(*pair) == [n - 1, n]
        got = load_state(fleet.store, snaps, Ledger(), dict, *pair)
        assert got == (ledger_fold(list(range(1, n + 1))), n), pair[1][:20]
    for pair in DECOYS:
        assert fleet.live_versions(*pair) == list(range(1, sizes[pair] + 1))
        assert fleet.store.compaction_log(*pair) == []

    # One result per stream in the backend, naming it exactly; every lock released; the
    # run's streams hash holds one entry per stream, each reported.
    from tests.fleet.conftest import results_in_backend, stream_results

    # (Streams this small go several to a compact_batch message: its result holds each
    # stream's, and its message each stream's pair.)
    compacted = stream_results(fleet.broker)
    assert sorted((r["stream_type"], r["stream_id"]) for r in compacted) == (
        sorted(HOSTILE_STREAMS)
    )
    alone = [
        meta
        for meta in results_in_backend(fleet.broker).values()
        if meta.get("name") == "eskit_tasks.compact_stream"
    ]
    assert all(m["args"] == [m["result"]["stream_type"], m["result"]["stream_id"]] for m in alone)
    state = redis.Redis(port=fleet.state.port)
    try:
        assert state.keys(f"{LOCK_PREFIX}*") == []
        streams = state.hgetall(f"{RUN_PREFIX}{{{run.run_id}}}:streams")
        assert list(streams.values()) == [b"1"] * len(HOSTILE_STREAMS)
    finally:
        state.close()


# -- 2. task messages are JSON only ------------------------------------------------------


class _RunsOnUnpickle:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


# What the worker logs for a message of a content type it does not accept (once per message).
REFUSED = "Received invalid task message: Refusing to deserialize untrusted content"


def _task_headers(task_id: str, **extra: Any) -> dict[str, Any]:
    """Headers of a protocol 2 task message, as Celery writes them."""
    return {
        "lang": "py",
        "task": "eskit_tasks.compact_stream",
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": "attacker@security-test",
        "ignore_result": False,
        **extra,
    }


def _publish_raw(
    fleet: Fleet,
    body: bytes,
    content_type: str,
    *,
    content_encoding: str = "utf-8",
    **headers: Any,
) -> str:
    """Put one message on the compaction queue with kombu, bypassing Celery's client."""
    task_id = str(uuid.uuid4())
    with Connection(fleet.broker.url(0)) as conn:
        Producer(conn.default_channel).publish(
            body,
            exchange="",
            routing_key=COMPACTION_QUEUE,
            content_type=content_type,
            content_encoding=content_encoding,
            headers=_task_headers(task_id, **headers),
        )
    return task_id


def _broker_idle(fleet: Fleet) -> bool:
    """Nothing waiting in the compaction queue, nothing delivered but unacknowledged."""
    client = redis.Redis(port=fleet.broker.port, db=0)
    try:
        return client.llen(COMPACTION_QUEUE) == 0 and client.hlen("unacked") == 0
    finally:
        client.close()


def _assert_untouched_then_a_normal_task_works(fleet: Fleet, worker: Worker, n: int) -> None:
    """Nothing was compacted; the worker is alive, and compacts a normal task correctly."""
    assert worker.proc is not None and worker.proc.poll() is None, worker.text()[-3000:]
    assert fleet.store.compaction_log() == []
    assert fleet.live_versions("ledger", "target") == list(range(1, n + 1))
    result = compact_stream.delay("ledger", "target", retain_last=5).get(timeout=60)
    assert (result["outcome"], result["events_deleted"]) == ("compacted", n - 5), result
    assert fleet.live_versions("ledger", "target") == list(range(n - 4, n + 1))
    assert len(fleet.store.compaction_log()) == 1
    fleet.assert_nothing_lost()


def test_pickled_and_yaml_task_messages_are_refused_without_being_deserialised(
    fleet: Fleet, tmp_path: Path
):
    """A pickle (and a YAML document with a python/object tag) that would run a shell
    command if deserialised is refused by the worker: the command never runs, the
    message is discarded (not redelivered), nothing is compacted, and the worker goes on
    to compact a normal task."""
    fleet.seed("ledger", "target", 20)
    marker = tmp_path / "pickle-ran"
    yaml_marker = tmp_path / "yaml-ran"
    evil = pickle.dumps(_RunsOnUnpickle(marker))
    # The payload is live: unpickled here, it does run the command.
    control = tmp_path / "control-ran"
    pickle.loads(pickle.dumps(_RunsOnUnpickle(control)))  # noqa: S301 -- the control
    assert control.exists()
    honest = pickle.dumps((("ledger", "target"), {}, {"callbacks": None}))  # a real task body
    worker = fleet.worker("json-only", concurrency=1)

    ids = [
        _publish_raw(fleet, evil, "application/x-python-serialize", content_encoding="binary"),
        _publish_raw(fleet, honest, "application/x-python-serialize", content_encoding="binary"),
        _publish_raw(
            fleet,
            f'!!python/object/apply:os.system ["touch {yaml_marker}"]'.encode(),
            "application/x-yaml",
        ),
    ]
    _wait(
        lambda: worker.text().count(REFUSED) == 3 and _broker_idle(fleet),
        60,
        "the worker to refuse three messages",
    )
    text = worker.text()
    assert text.count(f"{REFUSED} of type pickle (application/x-python-serialize)") == 2
    assert text.count(f"{REFUSED} of type yaml (application/x-yaml)") == 1
    time.sleep(1)  # a late side effect would show up now
    assert not marker.exists() and not yaml_marker.exists()
    from tests.fleet.conftest import results_in_backend

    assert not set(ids) & set(results_in_backend(fleet.broker))
    _assert_untouched_then_a_normal_task_works(fleet, worker, 20)


def test_json_messages_with_an_undecodable_body_are_dropped(fleet: Fleet):
    """A JSON content type with a body that is not JSON (bad UTF-8, broken syntax, a
    pickle, a bad compression header) is logged and dropped; nothing runs."""
    fleet.seed("ledger", "target", 20)
    worker = fleet.worker("garbage", concurrency=1)
    bodies: list[tuple[bytes, dict[str, Any]]] = [
        (b"\xff\xfe{{{ not json", {}),
        (b"{not json", {}),
        (b'[["ledger", "target"], {}, {', {}),
        (pickle.dumps((("ledger", "target"), {}, {})), {}),
        (b'[["ledger", "target"], {}, {}]', {"compression": "application/x-gzip"}),
        (b'[["ledger", "target"], {}, {}]', {"compression": "application/x-no-such-codec"}),
    ]
    ids = [_publish_raw(fleet, body, "application/json", **extra) for body, extra in bodies]
    _wait(
        lambda: (
            worker.text().count("Can't decode message body") == len(bodies) and _broker_idle(fleet)
        ),
        60,
        "the worker to drop the undecodable messages",
    )
    from tests.fleet.conftest import results_in_backend

    assert not set(ids) & set(results_in_backend(fleet.broker))
    _assert_untouched_then_a_normal_task_works(fleet, worker, 20)


# Messages Celery hands to the task: compact_stream itself must turn them into a clear,
# reported failure. (name, [args, kwargs, embed], where the error must point)
TASK_LEVEL_CASES: list[tuple[str, list[Any], str]] = [
    ("unknown kwarg", [["ledger", "target"], {"drop_all": True}, {}], "drop_all"),
    ("retain_last str", [["ledger", "target"], {"retain_last": "lots"}, {}], "retain_last"),
    ("retain_last bool", [["ledger", "target"], {"retain_last": True}, {}], "retain_last"),
    ("retain_last neg", [["ledger", "target"], {"retain_last": -1}, {}], "retain_last"),
    ("dry_run dict", [["ledger", "target"], {"dry_run": {"$ne": 1}}, {}], "dry_run"),
    ("age list", [["ledger", "target"], {"retain_younger_than": [1]}, {}], "retain_younger"),
    ("age word", [["ledger", "target"], {"retain_younger_than": "ever"}, {}], "retain_younger"),
    ("type int", [[1, "target"], {}, {}], "as strings"),
    ("id list", [["ledger", ["target"]], {}, {}], "as strings"),
    ("id null", [["ledger", None], {}, {}], "as strings"),
    ("too few args", [["ledger"], {}, {}], "stream_id"),
    ("too many args", [["ledger", "target", None, 1, 2], {}, {}], "positional argument"),
    ("policy as args", [["ledger", "target", None, {"retain_last": 1}], {}, {}], "positional"),
]
# Messages whose envelope is wrong (args not a list, kwargs not a mapping, embed not a
# mapping): refused before the task runs, or failed clearly by it — never run.
ENVELOPE_CASES: list[tuple[str, list[Any]]] = [
    ("args str", ["ledger", {}, {}]),
    ("args dict", [{"stream_type": "ledger", "stream_id": "target"}, {}, {}]),
    ("args int", [5, {}, {}]),
    ("kwargs list", [["ledger", "target"], ["retain_last", 1], {}]),
    ("kwargs str", [["ledger", "target"], "retain_last=1", {}]),
    ("embed int", [["ledger", "target"], {}, 5]),
]


def _clear_failure(meta: dict[str, Any]) -> str | None:
    """The error text of a stored result that failed, None if it did not fail clearly."""
    if meta["status"] == "FAILURE":
        exc = meta["result"]
        text = f"{exc.get('exc_type')}: {' '.join(map(str, exc.get('exc_message') or []))}"
        return text if exc.get("exc_message") else None
    result = meta["result"]
    if meta["status"] == "SUCCESS" and isinstance(result, dict) and result["outcome"] == "failed":
        return f"{result['error_type']}: {result['error']}"
    return None


def test_json_messages_with_wrong_argument_shapes_fail_clearly_and_run_nothing(fleet: Fleet):
    """Well-formed JSON with the wrong arguments — unknown keyword arguments, policy
    values of the wrong types, stream type or id not strings, too few or too many
    arguments, args/kwargs/embed of the wrong type — runs no compaction. Each one the
    task sees ends in a failure stored in the backend that names the problem; the
    worker stays up and then compacts a normal task."""
    fleet.seed("ledger", "target", 20)
    worker = fleet.worker("shapes", concurrency=1)
    task_ids = {
        name: _publish_raw(fleet, json.dumps(body).encode(), "application/json")
        for name, body, _ in TASK_LEVEL_CASES
    }
    envelope_ids = {
        name: _publish_raw(fleet, json.dumps(body).encode(), "application/json")
        for name, body in ENVELOPE_CASES
    }
    # A run id that is a Redis pattern must not become part of a key.
    odd_run = _publish_raw(
        fleet,
        json.dumps([["ledger", "absent"], {"run_id": "{x}*"}, {}]).encode(),
        "application/json",
    )
    # One worker process takes one message at a time: when this one is done, so are all.
    sentinel = compact_stream.delay("ledger", "no-such-stream")
    assert sentinel.get(timeout=90)["outcome"] == "nothing_to_compact", worker.text()[-3000:]
    _wait(lambda: _broker_idle(fleet), 30, "the broker to be idle")

    from tests.fleet.conftest import results_in_backend

    stored = results_in_backend(fleet.broker)
    for name, _, expected in TASK_LEVEL_CASES:
        meta = stored.get(task_ids[name])
        assert meta is not None, (name, worker.text()[-3000:])
        error = _clear_failure(meta)
        assert error is not None and expected in error, (name, meta)
    for name, _ in ENVELOPE_CASES:
        meta = stored.get(envelope_ids[name])
        if meta is not None:  # refused before running is fine; a result must be a failure
            assert _clear_failure(meta) is not None, (name, meta)
    assert stored[odd_run]["result"]["outcome"] == "nothing_to_compact"
    state = redis.Redis(port=fleet.state.port)
    try:
        assert not [k for k in state.keys("*") if b"{x}" in k or b"*" in k]
    finally:
        state.close()
    assert "Unrecoverable error" not in worker.text()
    _assert_untouched_then_a_normal_task_works(fleet, worker, 20)


MALFORMED_ENVELOPES: list[tuple[str, bytes, dict[str, Any]]] = [
    ("body 42", b"42", {}),
    ("body null", b"null", {}),
    ("body true", b"true", {}),
    ("body empty", b"", {}),
    ("body []", b"[]", {}),
    ("body {}", b"{}", {}),
    ("two items", b'[["ledger", "target"], {}]', {}),
    ("four items", b'[["ledger", "target"], {}, {}, 1]', {}),
    ("task header list", b'[["ledger", "target"], {}, {}]', {"task": ["x"]}),
    ("id header dict", b'[["ledger", "target"], {}, {}]', {"id": {"a": 1}}),
    ("id header null", b'[["ledger", "target"], {}, {}]', {"id": None}),
    ("timelimit header", b'[["ledger", "target"], {}, {}]', {"timelimit": "never"}),
    ("builtin task 42", b"42", {"task": "celery.backend_cleanup"}),
]


def test_malformed_task_envelopes_are_rejected_and_do_not_stop_the_worker(fleet: Fleet):
    """A JSON body that is not [args, kwargs, embed] (a number, null, "", a list of two or
    four items) or a task/id/timelimit header of the wrong type is rejected and dropped:
    the worker stays up, the message is not redelivered, and nothing runs."""
    fleet.seed("ledger", "target", 20)
    worker = fleet.worker("envelopes", concurrency=1)
    for name, body, headers in MALFORMED_ENVELOPES:
        _publish_raw(fleet, body, "application/json", **headers)
        _wait(
            lambda: _broker_idle(fleet) or worker.proc.poll() is not None,  # type: ignore[union-attr]
            60,
            f"the worker to handle {name!r}",
        )
        time.sleep(0.5)  # a worker about to die has logged it by now
        assert worker.proc is not None and worker.proc.poll() is None, (
            name,
            worker.text()[-3000:],
        )
        assert _broker_idle(fleet), name
    assert "Unrecoverable error" not in worker.text()
    _assert_untouched_then_a_normal_task_works(fleet, worker, 20)


# -- 3. passwords never leak ---------------------------------------------------------------

PG_SECRET = "S3cr3t-pg/XYZ@9#q"  # noqa: S105 -- fake passwords the test looks for
REDIS_SECRET = "R3dis S3cr3t:42/x+y"  # noqa: S105
WRONG_PG_SECRET = "Wr0ng-pg/S3cr3t"  # noqa: S105
WRONG_REDIS_SECRET = "Wr0ng-r3dis:S3cr3t"  # noqa: S105
SECRETS = [PG_SECRET, REDIS_SECRET, WRONG_PG_SECRET, WRONG_REDIS_SECRET]


def _secret_forms() -> dict[str, str]:
    """Each secret as written, URL-encoded (as in a URL) and form-encoded."""
    forms = {}
    for secret in SECRETS:
        for form in (secret, quote(secret, safe=""), quote(secret), quote_plus(secret)):
            forms[form] = secret
    return forms


def _leaks(text: str) -> list[str]:
    return sorted({form for form in _secret_forms() if form in text})


class PasswordRedis(RedisServer):
    """A private redis-server that refuses clients without the password."""

    password: str

    def __init__(self, port: int, workdir: Path, password: str) -> None:
        super().__init__(port, workdir, password)

    def url(self, db: int = 0, password: str | None = None) -> str:
        secret = quote(self.password if password is None else password, safe="")
        return f"redis://:{secret}@127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db, password=self.password)

    def dump(self) -> dict[str, str]:
        """Every key and value of every database, as text; message bodies decoded."""
        found: dict[str, str] = {}
        for db in range(16):
            client = self.client(db)
            try:
                for key in client.scan_iter("*"):
                    name = f"db{db}:{key.decode(errors='replace')}"
                    found[name] = _value_text(client, key)
            finally:
                client.close()
        return found


def _value_text(client: redis.Redis, key: bytes) -> str:
    kind = client.type(key).decode()
    parts: list[bytes] = []
    if kind == "string":
        parts = [client.get(key) or b""]
    elif kind == "hash":
        parts = [x for kv in client.hgetall(key).items() for x in kv]
    elif kind == "list":
        parts = list(client.lrange(key, 0, -1))
    elif kind == "set":
        parts = list(client.smembers(key))
    elif kind == "zset":
        parts = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
    texts = [p.decode(errors="replace") for p in parts]
    for text in list(texts):  # kombu keeps message bodies base64-encoded in a JSON envelope
        try:
            envelope = json.loads(text)
            body = envelope["body"]
            if envelope["properties"]["body_encoding"] == "base64":
                texts.append(base64.b64decode(body).decode(errors="replace"))
        except (ValueError, KeyError, TypeError):
            pass
    return "\n".join(texts)


@pytest.fixture
def secret_redis(tmp_path: Path) -> Iterator[PasswordRedis]:
    server = PasswordRedis(free_port(), tmp_path / "secret-redis", REDIS_SECRET)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _cli(args: list[str], env: dict[str, str], *, module: bool = False) -> tuple[int, str, str]:
    """Run the installed ``eskit-tasks`` console script (or ``python -m eskit_tasks``)."""
    command = (
        [sys.executable, "-m", "eskit_tasks"]
        if module
        else [str(Path(CELERY).with_name("eskit-tasks"))]
    )
    done = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "200"},
        cwd=REPO,
        timeout=240,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def _client_app(
    server: PasswordRedis, broker_db: int, result_db: int, monkeypatch: pytest.MonkeyPatch
) -> Celery:
    """A Celery client on the passworded Redis. Celery prefers CELERY_BROKER_URL and
    CELERY_RESULT_BACKEND from the environment (set for the fleet by tests/conftest.py)
    over the URLs given to the app, so they are set too (undo with the monkeypatch)."""
    monkeypatch.setenv("CELERY_BROKER_URL", server.url(broker_db))
    monkeypatch.setenv("CELERY_RESULT_BACKEND", server.url(result_db))
    client = Celery(
        "security-client",
        broker=server.url(broker_db),
        backend=server.url(result_db),
        set_as_current=False,  # later tests' AsyncResult(id) must keep using the fleet's app
    )
    client.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    return client


def test_passwords_never_appear_in_logs_results_progress_metrics_or_cli_output(
    fleet: Fleet, secret_redis: PasswordRedis, postgres_url: str, monkeypatch: pytest.MonkeyPatch
):
    """Workers and CLI commands get the database and Redis passwords only in their URLs
    (percent-encoded, with characters that matter: "/", "@", "#", ":", "+", a space).
    After successful compactions, failing ones (a decider that raises, no decider, an
    unreachable database), a fleet run that gives up, and CLI commands with wrong
    passwords and unreachable URLs, no worker log, CLI output, result, run progress key
    or metrics page holds a password, raw or encoded — while the masked form "***" is
    there wherever a URL is shown."""
    from eskit_tasks.fleet.messages import policy_kwargs

    db_url = make_url(postgres_url).set(password=PG_SECRET).render_as_string(hide_password=False)
    dead_port = free_port()
    dead_db_url = (
        make_url(postgres_url)
        .set(password=PG_SECRET, port=dead_port)
        .render_as_string(hide_password=False)
    )
    assert quote(PG_SECRET, safe="") in db_url  # the URL carries the encoded password
    anonymous = redis.Redis(port=secret_redis.port)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()  # the workers must really authenticate
    anonymous.close()

    fleet.seed("ledger", "ok-1", 30)
    fleet.seed("ledger", "ok-2", 12)
    fleet.store.append(
        "ledger",
        "boom",
        [NewEvent("Deposited", {"amount": 1}), NewEvent("Boom"), NewEvent("Deposited")],
        expected_version=0,
    )
    fleet.seed("ghost", "no-decider", 4)

    common = {"ESKIT_METRICS_ADDRESS": "127.0.0.1", "ESKIT_LOCKED_RETRY_BASE": "0.1"}
    good_env = {
        "CELERY_BROKER_URL": secret_redis.url(0),
        "CELERY_RESULT_BACKEND": secret_redis.url(1),
        "ESKIT_REDIS_URL": secret_redis.url(2),
        "ESKIT_DATABASE_URL": db_url,
        **common,
    }
    # The "dead" fleet: its database URL points at a closed port; short limits, so the
    # fan-out gives up within seconds.
    dead_env = {
        "CELERY_BROKER_URL": secret_redis.url(3),
        "CELERY_RESULT_BACKEND": secret_redis.url(4),
        "ESKIT_REDIS_URL": secret_redis.url(2),
        "ESKIT_DATABASE_URL": dead_db_url,
        "ESKIT_LOCKED_MAX_RETRIES": "1",
        "ESKIT_TASK_SOFT_TIME_LIMIT": "4",
        "ESKIT_TASK_TIME_LIMIT": "5",
        "ESKIT_VISIBILITY_TIMEOUT": "6",
        **common,
    }
    good_port, dead_port_metrics = free_port(), free_port()
    good = fleet.worker("secret-good", ESKIT_METRICS_PORT=str(good_port), **good_env)
    dead = fleet.worker("secret-dead", ESKIT_METRICS_PORT=str(dead_port_metrics), **dead_env)

    # Tasks straight to each fleet, through the passworded broker.
    results: dict[str, dict[str, Any]] = {}
    for name, jobs in [
        (
            "good",
            [
                ("ok-1", ("ledger", "ok-1"), policy_kwargs(retain_last=5)),
                ("ok-2", ("ledger", "ok-2"), policy_kwargs(retain_last=3)),
                ("boom", ("ledger", "boom"), {}),
                ("ghost", ("ghost", "no-decider"), {}),
            ],
        ),
        ("dead", [("dead-db", ("ledger", "ok-2"), {})]),
    ]:
        broker_db, result_db = (0, 1) if name == "good" else (3, 4)
        with monkeypatch.context() as env:
            client = _client_app(secret_redis, broker_db, result_db, env)
            sent = [
                (
                    label,
                    client.send_task(
                        "eskit_tasks.compact_stream",
                        args=args,
                        kwargs=kwargs,
                        queue=COMPACTION_QUEUE,
                    ),
                )
                for label, args, kwargs in jobs
            ]
            try:
                for label, async_result in sent:
                    # An outcome that needs attention is FAILURE: read the result either way.
                    found = compaction_result(async_result.id, app=client, timeout=120)
                    assert found is not None, (label, async_result.state)
                    results[label] = found
                    del async_result
            finally:
                # Each AsyncResult unsubscribes when it dies: let them die while this
                # client's Redis is still there, not in a later test.
                sent.clear()
                gc.collect()
                client.close()
    assert {k: v["outcome"] for k, v in results.items()} == {
        "ok-1": "compacted",
        "ok-2": "compacted",
        "boom": "failed",
        "ghost": "failed",
        "dead-db": "failed",
    }, fleet.worker_logs()
    assert results["boom"]["error_type"] == "EvolveError"
    assert results["dead-db"]["error_type"] == "DatabaseUnavailableError"
    assert f"postgres:***@127.0.0.1:{dead_port}" in results["dead-db"]["error"]

    # CLI commands. Every one's output is checked; `expect` is its exit status.
    base = worker_env(REPO, **good_env)
    dead_base = worker_env(REPO, **dead_env)
    wrong_pg = make_url(dead_db_url).set(password=WRONG_PG_SECRET)
    outputs: dict[str, str] = {}

    def cli(label: str, args: list[str], env: dict[str, str], expect: set[int], **kw: Any) -> str:
        """Run a command; return its stdout and stderr together (both are checked)."""
        code, out, err = _cli(args, env, **kw)
        outputs[label] = f"{out}\n{err}"
        assert code in expect, (label, code, out, err)
        assert "Traceback" not in err, (label, err)
        return outputs[label]

    shown = cli("init-db", ["init-db", "--database", db_url], base, {0})
    assert "postgres:***@" in shown
    shown = cli("candidates-unreachable", ["candidates", "--database", dead_db_url], base, {3})
    assert f"postgres:***@127.0.0.1:{dead_port}" in shown
    cli(
        "log-wrong-password-unreachable",
        ["log", "--database", wrong_pg.render_as_string(hide_password=False)],
        base,
        {3},
        module=True,
    )
    no_such_db = make_url(db_url).set(password=WRONG_PG_SECRET, database="eskit_no_such_database")
    shown = cli(
        "log-no-such-database",
        ["log", "--database", no_such_db.render_as_string(hide_password=False)],
        base,
        {1, 3},
    )
    assert "postgres:***@" in shown
    cli(
        "compact-unreachable",
        [
            "compact",
            "ledger",
            "ok-1",
            "--database",
            dead_db_url,
            "--decider-module",
            "tests.fleet_deciders",
        ],
        base,
        {3},
    )
    cli(
        "bad-port-syntax",
        [
            "candidates",
            "--database",
            f"postgresql+psycopg://postgres:{quote(PG_SECRET, safe='')}@h:port/x",
        ],
        base,
        {2},
    )
    cli("compact-all-local-env-url", ["compact-all", "--local", "--json"], dead_base, {3})
    cli(
        "status-wrong-redis-password",
        ["status", "0" * 32],
        {**base, "ESKIT_REDIS_URL": secret_redis.url(2, WRONG_REDIS_SECRET)},
        {3},
    )
    cli(
        "compact-all-wrong-broker-password",
        ["compact-all", "--min-events", "1"],
        {**base, "CELERY_BROKER_URL": secret_redis.url(0, WRONG_REDIS_SECRET)},
        {1, 3},
    )
    cli(
        "invalid-settings",
        ["candidates"],
        {**base, "ESKIT_LOCK_TTL": "9999"},
        {1, 2},
        module=True,
    )
    good_run = cli(
        "compact-all-good-fleet",
        ["compact-all", "--wait", "--timeout", "120", "--json", "--min-events", "1"],
        base,
        {4},  # the Boom stream and the stream without a decider fail
    )
    failed = {f["stream_id"]: f for f in _summary_line(good_run)["failed_streams"]}
    assert set(failed) == {"boom", "no-decider"}
    dead_run = cli(
        "compact-all-dead-fleet",
        ["compact-all", "--wait", "--timeout", "180", "--json", "--min-events", "1"],
        dead_base,
        {4},  # the fan-out gives up: the run ends with an error
    )
    run_error = _summary_line(dead_run)["error"]
    assert run_error.startswith("fan-out gave up: open the event store: cannot reach"), run_error
    assert f"postgres:***@127.0.0.1:{dead_port}" in run_error

    # Gather everything a person or a program could read.
    texts: dict[str, str] = {f"cli {k}": v for k, v in outputs.items()}
    texts["worker log good"] = good.text()
    texts["worker log dead"] = dead.text()
    texts["metrics good"] = _scrape(good_port)
    texts["metrics dead"] = _scrape(dead_port_metrics)
    stored = secret_redis.dump()
    texts.update({f"redis {k}": v for k, v in stored.items()})
    texts["results"] = json.dumps(results)

    leaked = {where: _leaks(text) for where, text in texts.items() if _leaks(text)}
    assert leaked == {}, leaked

    # ...and the check looked at the right text: URLs are there, masked.
    def masked(text: str) -> bool:
        return f"postgres:***@127.0.0.1:{dead_port}" in text

    assert masked(texts["worker log dead"])
    assert any(masked(v) for k, v in stored.items() if k.startswith("db4:celery-task-meta-"))
    assert any(masked(v) for k, v in stored.items() if k.startswith(f"db2:{RUN_PREFIX}"))
    assert any(k.startswith("db1:celery-task-meta-") for k in stored)
    assert "eskit_compactions_total" in texts["metrics good"]
    assert "redis://:**@127.0.0.1" in texts["worker log good"]  # Celery's own masking
    assert "ready." in texts["worker log dead"]


def _summary_line(output: str) -> dict[str, Any]:
    """The summary of compact-all --wait --json: its line marked "summary": true (the
    lines before it are the streams' results)."""
    [line] = [x for x in output.splitlines() if x.startswith('{"summary":true')]
    return json.loads(line)
