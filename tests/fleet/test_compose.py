"""docker/compose.yaml and docker/Dockerfile, checked without Docker.

Docker cannot run here, so these tests read the files the way Compose and the image
would, and run each eskit service's command *for real* (init-db, worker, beat) with
the compose environment, its hosts rewritten to this test run's PostgreSQL and Redis.
A command, a variable name or a setting that drifts from the code fails here.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import sqlalchemy as sa
import yaml
from packaging.specifiers import SpecifierSet
from sqlalchemy.engine import make_url

from eskit_tasks import SqlSnapshotStore, load_state
from eskit_tasks.fleet.settings import EskitSettings
from eskit_tasks.stores.schema import metadata
from eskit_tasks.testing.services import RedisServer, free_port, scratch_database, worker_env
from tests import REPO
from tests.fleet.conftest import Fleet, results_in_backend

pytestmark = pytest.mark.slow

DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BIN = Path(sys.executable).parent
ESKIT_SERVICES = {"init-db", "worker", "beat", "flower"}


# -- reading the files as Compose and Docker do --------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<dollar>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, :?, :+.

    Unlike Compose (which warns and substitutes ""), an unset variable without a
    default is an error: the file must work with no .env at all.
    """
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m["dollar"]:
            return "$"
        name = m["braced"] or m["bare"]
        op, arg = m["op"], m["arg"] or ""
        assert "$" not in arg, f"nested substitution in {m[0]!r}"
        is_set = name in env if op is None or not op.startswith(":") else bool(env.get(name))
        if op in ("-", ":-"):
            return env[name] if is_set else arg
        if op in ("+", ":+"):
            return arg if is_set else ""
        if not is_set:
            raise AssertionError(f"{m[0]} needs {name} to be set ({arg or 'no default'})")
        return env[name]

    result = _VAR.sub(sub, value)
    unmatched = _VAR.sub("", value)
    assert "$" not in unmatched, f"invalid substitution in {value!r}"
    return result


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as Compose sees it: anchors and merge keys resolved, variables
    substituted from ``env`` (nothing set by default)."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return interpolate(raw, env or {})


def argv_of(service: Mapping[str, Any]) -> list[str]:
    """A service's command as an argument vector (Compose splits strings like a shell)."""
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile():
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative to the context) out of the build
    context: the last matching rule wins, a rule matching a directory covers its files."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _ignore_regex(line.lstrip("!").strip("/"))))
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


# -- running a service's command here --------------------------------------------------


def local_argv(service: Mapping[str, Any]) -> list[str]:
    """The service's command with its program taken from this virtualenv (as in the
    image, where `pip install .` puts celery and eskit-tasks on PATH)."""
    argv = argv_of(service)
    assert argv[0] in ("celery", "eskit-tasks"), argv
    program = BIN / argv[0]
    assert program.exists(), f"{argv[0]} is not installed in {BIN}"
    return [str(program), *argv[1:]]


def local_env(
    service: Mapping[str, Any], *, database_url: str, redis_server: RedisServer
) -> dict[str, str]:
    """The service's environment with the compose hosts pointing at this run's services.

    Nothing of the test run's own ESKIT_*/CELERY_* settings leaks in: the process runs
    with the compose values and the package's defaults, like the container. The image's
    ENV comes too, with /app (where celeryconfig.py is) mapped to the repository.
    """
    base = worker_env()
    env = {k: v for k, v in base.items() if not k.startswith(("ESKIT_", "CELERY_"))}
    image_env = dockerfile_env()
    image_env["PYTHONPATH"] = os.pathsep.join([str(REPO), base.get("PYTHONPATH", "")])
    env.update(image_env)
    test_db = make_url(database_url)
    for name, value in service.get("environment", {}).items():
        host = urlsplit(value).hostname if "://" in value else None
        if host == "postgres":
            value = (
                make_url(value)
                .set(
                    host=test_db.host,
                    port=test_db.port,
                    username=test_db.username,
                    password=test_db.password,
                    database=test_db.database,
                )
                .render_as_string(hide_password=False)
            )
        elif host == "redis":
            value = urlunsplit(urlsplit(value)._replace(netloc=f"127.0.0.1:{redis_server.port}"))
        elif name == "ESKIT_METRICS_PORT":
            value = str(free_port())
        env[name] = value
    return env


class Process:
    """A service's command running in its own process group, its output in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} in {timeout}s:\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM to the main process only, as `docker stop` does through the init
        process; the process group is killed if it is not gone in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError(f"no clean exit on SIGTERM:\n{self.text()[-3000:]}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture
def empty_database(postgres_url: str) -> Iterator[str]:
    """A database with no tables, like the compose postgres volume on first start."""
    with scratch_database(postgres_url, "eskit_compose") as url:
        yield url


# -- the file itself -------------------------------------------------------------------


def test_every_substitution_resolves_without_a_dot_env_file():
    services = compose()["services"]
    assert set(services) == {"postgres", "redis", *ESKIT_SERVICES}
    db = make_url(services["worker"]["environment"]["ESKIT_DATABASE_URL"])
    password = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert db.password == password == "eskit"  # noqa: S105 -- the file's documented default
    assert services["worker"]["environment"]["ESKIT_DECIDER_MODULES"] == "eskit_tasks.demo"
    # Compose's own escapes and a variable without a default are understood here too.
    assert interpolate("$$x ${A:-a} ${B-b} ${C:+c} $D", {"B": "", "C": "1", "D": "d"}) == (
        "$x a  c d"
    )
    with pytest.raises(AssertionError, match="needs E"):
        interpolate("${E}", {})


def test_postgres_password_and_names_agree_between_the_database_and_its_url():
    chosen = {"POSTGRES_PASSWORD": "Chosen4ThisFleet"}
    services = compose(chosen)["services"]
    pg = services["postgres"]["environment"]
    for name in ESKIT_SERVICES:
        url = make_url(services[name]["environment"]["ESKIT_DATABASE_URL"])
        assert url.drivername == "postgresql+psycopg"  # the driver the package installs
        assert (url.host, url.port) == ("postgres", 5432)
        assert url.username == pg["POSTGRES_USER"]
        assert url.password == pg["POSTGRES_PASSWORD"] == chosen["POSTGRES_PASSWORD"]
        assert url.database == pg["POSTGRES_DB"]


def test_every_eskit_service_shares_one_environment_of_known_settings():
    doc = compose()
    shared = interpolate(doc["x-eskit-env"], {})
    services = doc["services"]
    for name in ESKIT_SERVICES:
        env = services[name]["environment"]
        assert {k: env[k] for k in shared} == shared, name
        extra = set(env) - set(shared)
        assert extra == ({"ESKIT_METRICS_PORT"} if name == "worker" else set()), name
    assert services["worker"]["environment"]["ESKIT_METRICS_PORT"] == "9100"
    # Every variable is one the code reads (a typo would silently fall back to a default).
    fields = EskitSettings.model_fields
    known = {f"ESKIT_{n.upper()}" for n in fields} | {
        alias
        for f in fields.values()
        if f.validation_alias is not None
        for alias in getattr(f.validation_alias, "choices", [f.validation_alias])
    }
    source = "\n".join(p.read_text() for p in (REPO / "eskit_tasks").rglob("*.py"))
    for variable in services["worker"]["environment"]:
        assert variable in known or f'"{variable}"' in source, f"{variable} is read nowhere"


def test_urls_point_at_services_of_the_file_and_keep_their_data_apart():
    services = compose()["services"]
    env = services["worker"]["environment"]
    redis_urls = [env[k] for k in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "ESKIT_REDIS_URL")]
    for url in redis_urls:
        parts = urlsplit(url)
        assert (parts.scheme, parts.hostname, parts.port) == ("redis", "redis", 6379)
    assert len({urlsplit(u).path for u in redis_urls}) == 3  # broker, results, locks apart
    assert "redis" in services and "postgres" in services


def test_workers_scale_and_start_after_the_schema_exists():
    services = compose()["services"]
    worker = services["worker"]
    for fixed in ("container_name", "hostname", "ports"):
        assert fixed not in worker, f"worker has {fixed}: `--scale worker=4` would clash"
    argv = argv_of(worker)
    node = argv[argv.index("-n") + 1]
    assert node.startswith("worker@") and node.endswith("%h")  # one name per container
    assert worker["depends_on"]["init-db"] == {"condition": "service_completed_successfully"}
    assert worker["depends_on"]["redis"] == {"condition": "service_healthy"}
    init_db = services["init-db"]
    assert init_db["restart"] == "no"  # the string: a bare `no` is YAML's false
    assert init_db["depends_on"]["postgres"] == {"condition": "service_healthy"}
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
            if rule["condition"] == "service_completed_successfully":
                assert services[dependency]["restart"] == "no", (name, dependency)


def test_exactly_one_beat_whose_schedule_file_is_writable_by_the_image_user():
    services = compose()["services"]
    beats = [n for n, s in services.items() if "command" in s and "beat" in argv_of(s)]
    assert beats == ["beat"]
    beat = services["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    argv = argv_of(beat)
    assert argv[:4] == ["celery", "-A", "eskit_tasks", "beat"]
    # /app belongs to root in the image and the processes run as another user.
    assert argv[argv.index("-s") + 1].startswith("/tmp/")  # noqa: S108 -- the image's /tmp


def test_postgres_and_redis_keep_their_data_and_report_health():
    doc = compose()
    services = doc["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert "--appendonly yes" in " ".join(argv_of(services["redis"]))
    for name, mount in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        service = services[name]
        assert service["healthcheck"]["test"], name
        volumes = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert volumes[mount] in doc["volumes"], f"{name} data is not on a named volume"


def test_flower_comes_with_the_image_and_is_published_on_its_port():
    # Flower is not installed in this virtualenv, so its command is checked, not run.
    flower = compose()["services"]["flower"]
    argv = argv_of(flower)
    assert argv[:4] == ["celery", "-A", "eskit_tasks", "flower"]
    port = next(a.split("=", 1)[1] for a in argv if a.startswith("--port="))
    assert [p.rsplit(":", 1)[1] for p in flower["ports"]] == [port]
    installs = [args for kw, args in dockerfile() if kw == "RUN" and "pip install" in args]
    assert any(re.search(r"[\"' ]flower\b", args) for args in installs), installs


def test_dockerfile_builds_from_the_repository_root_the_compose_file_names():
    services = compose()["services"]
    for name in ESKIT_SERVICES:
        build = services[name]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == REPO, name
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE, name
        assert services[name]["image"] == services["worker"]["image"], name
    instructions = dockerfile()
    base = next(args for kw, args in instructions if kw == "FROM")
    assert base == "python:3.11-slim"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "3.11" in SpecifierSet(requires)
    copied: list[str] = []
    for keyword, args in instructions:
        if keyword == "COPY":
            *sources, _ = shlex.split(args)
            copied += [s for s in sources if not s.startswith("--")]
    assert {"pyproject.toml", "celeryconfig.py", "eskit_tasks"} <= set(copied)
    for source in copied:
        path = REPO / source
        assert path.exists(), f"COPY {source}: no such file in the build context"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        sent = [f for f in files if not dockerignored(str(f.relative_to(REPO)))]
        assert sent, f"COPY {source}: .dockerignore keeps it out of the context"
        if path.is_dir():
            assert {f.name for f in sent} >= {p.name for p in path.glob("*.py")}, source
    for heavy in (".venv/bin/python", ".git/HEAD", "eskit-demo.db", "tests/conftest.py"):
        assert dockerignored(heavy), f"{heavy} would be sent to the Docker daemon"


def test_image_runs_as_a_user_with_celeryconfig_importable_and_a_worker_by_default():
    instructions = dockerfile()
    env = dockerfile_env()
    assert env["PYTHONUNBUFFERED"] == "1"  # log lines reach `docker compose logs` at once
    workdir = [args for kw, args in instructions if kw == "WORKDIR"][-1]
    assert workdir in env["PYTHONPATH"].split(":")
    copy_config = next(a for kw, a in instructions if kw == "COPY" and "celeryconfig.py" in a)
    assert shlex.split(copy_config)[-1] in ("./", ".", workdir, f"{workdir}/")
    keywords = [kw for kw, _ in instructions]
    user = [args for kw, args in instructions if kw == "USER"]
    assert user and user[-1] not in ("root", "0") and not user[-1].startswith(("root:", "0:"))
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")
    cmd = json.loads(next(args for kw, args in instructions if kw == "CMD"))
    assert cmd == argv_of(compose()["services"]["worker"])  # `docker run` starts the worker


# -- each service's command, for real --------------------------------------------------


def test_init_db_creates_the_schema_on_an_empty_database_and_can_run_again(
    empty_database: str, redis_servers: tuple[RedisServer, RedisServer]
):
    service = compose()["services"]["init-db"]
    env = local_env(service, database_url=empty_database, redis_server=redis_servers[0])
    for attempt in (1, 2):  # every `docker compose up` runs it again
        done = subprocess.run(
            local_argv(service), cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (attempt, done.stdout, done.stderr)
    engine = sa.create_engine(empty_database)
    try:
        assert set(metadata.tables) <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_init_db_fails_without_a_database_so_workers_do_not_start(
    redis_servers: tuple[RedisServer, RedisServer],
):
    service = compose({"POSTGRES_PASSWORD": "s3cret-pw"})["services"]["init-db"]
    nowhere = f"postgresql+psycopg://eskit:s3cret-pw@127.0.0.1:{free_port()}/eskit"
    env = local_env(service, database_url=nowhere, redis_server=redis_servers[0])
    done = subprocess.run(
        local_argv(service), cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0  # service_completed_successfully holds the workers back
    assert "s3cret-pw" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_worker_service_compacts_a_demo_account(
    fleet: Fleet, postgres_url: str, tmp_path: Path, processes: list[Process]
):
    from eskit_tasks.demo import Account, AccountState, seed
    from eskit_tasks.tasks import compact_stream

    service = compose()["services"]["worker"]
    env = local_env(service, database_url=postgres_url, redis_server=fleet.broker)
    worker = Process(local_argv(service), env, tmp_path / "worker.log")
    processes.append(worker)
    worker.wait_for(" ready.")
    # This test process enqueues through its own broker URL: the compose one, rewritten.
    assert env["CELERY_BROKER_URL"] == compact_stream.app.conf.broker_url, "broker db moved"

    head = seed(fleet.store, "acct-compose", 300, random.Random(11))
    snapshots = SqlSnapshotStore(fleet.store.engine, create_tables=False)
    before = load_state(fleet.store, snapshots, Account(), AccountState, "account", "acct-compose")
    task = compact_stream.delay("account", "acct-compose", retain_last=10)
    result = task.get(timeout=90)

    assert result["outcome"] == "compacted", worker.text()[-3000:]
    assert result["events_deleted"] == head - 10
    assert fleet.live_versions("account", "acct-compose") == list(range(head - 9, head + 1))
    after = load_state(fleet.store, snapshots, Account(), AccountState, "account", "acct-compose")
    assert after == before
    # The node name of the compose command (worker@%h) did the work.
    assert results_in_backend(fleet.broker)[task.id]["worker"].startswith("worker@")
    # ESKIT_METRICS_PORT (rewritten to a free port here) serves the worker's metrics.
    port = env["ESKIT_METRICS_PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        metrics = page.read().decode()
    assert 'eskit_compactions_total{outcome="compacted",stream_type="account"} 1.0' in metrics
    # `docker stop` sends SIGTERM: a warm shutdown, exit status 0.
    assert worker.terminate() == 0, worker.text()[-3000:]


def test_beat_service_starts_and_keeps_running(
    redis_servers: tuple[RedisServer, RedisServer],
    postgres_url: str,
    tmp_path: Path,
    processes: list[Process],
):
    service = compose()["services"]["beat"]
    argv = local_argv(service)
    schedule = argv.index("-s") + 1
    argv[schedule] = str(tmp_path / Path(argv[schedule]).name)  # not the machine's /tmp
    env = local_env(service, database_url=postgres_url, redis_server=redis_servers[0])
    beat = Process(argv, env, tmp_path / "beat.log")
    processes.append(beat)
    beat.wait_for("beat: Starting")
    time.sleep(3)
    assert beat.proc.poll() is None, beat.text()[-3000:]
    assert list(tmp_path.glob("celerybeat-schedule*")), "beat wrote no schedule file"
    assert "Error" not in beat.text(), beat.text()[-3000:]
    assert beat.terminate() == 0, beat.text()[-3000:]
