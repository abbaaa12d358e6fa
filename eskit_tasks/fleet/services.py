"""The services a fleet client talks to, and the one error it raises when one is down.

Redis, kombu, amqp and Celery's result backends each fail in their own way (a chain of
five exceptions, when Celery's result backend gives up its reconnects). Every place
that uses one of them wraps the call in :func:`reaching`, which turns a connection
failure into a :class:`~eskit_tasks.errors.ServiceUnavailableError` that says which
service, from which setting, at which URL (password masked)::

    with reaching(STATE_REDIS, settings.redis_url):
        progress.create(run_id, kwargs)
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from eskit_tasks.domain.redact import mask_url
from eskit_tasks.errors import EskitError, ServiceUnavailableError

#: The services, each with the setting that names it.
BROKER = "the broker (CELERY_BROKER_URL {url})"
STATE_REDIS = "the Redis for locks and run progress (ESKIT_REDIS_URL {url})"
RESULT_BACKEND = "the result backend (CELERY_RESULT_BACKEND {url})"


def describe(service: str, url: str | None) -> str:
    """``the broker (CELERY_BROKER_URL amqp://guest:***@mq:5672//)``."""
    return service.format(url=mask_url(str(url or "(not set)")))


def unreachable(exc: BaseException) -> bool:
    """True when ``exc``, or an exception it was raised from, says a connection to a
    service could not be made or was lost (redis, kombu, amqp, sockets)."""
    from amqp.exceptions import ConnectionError as AmqpUnreachable
    from kombu.exceptions import OperationalError as BrokerUnreachable
    from redis.exceptions import ConnectionError as RedisUnreachable
    from redis.exceptions import TimeoutError as RedisTimeout

    kinds = (
        RedisUnreachable,
        RedisTimeout,
        BrokerUnreachable,
        AmqpUnreachable,
        ConnectionError,  # OSError's: refused, reset, aborted
        socket.timeout,
    )
    return any(isinstance(e, kinds) for e in _chain(exc))


def reason(exc: BaseException) -> str:
    """The innermost connection error's first line: ``Error 111 connecting to
    127.0.0.1:6399. Connection refused.`` rather than Celery's "must be restarted"."""
    found = [e for e in _chain(exc) if unreachable(e) and str(e).strip()]
    text = str(found[-1] if found else exc).strip()
    return mask_url(text.splitlines()[0] if text else type(exc).__name__)


@contextmanager
def reaching(service: str, url: str | None) -> Iterator[None]:
    """Run the block; a connection failure in it becomes one ServiceUnavailableError
    naming ``service`` (one of this module's constants) at ``url``."""
    try:
        yield
    except EskitError:
        raise
    except Exception as exc:
        if not unreachable(exc):
            raise
        raise unavailable(service, url, exc) from exc


def unavailable(service: str, url: str | None, exc: BaseException) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        f"cannot reach {describe(service, url)}: {reason(exc)}. Check that it is running "
        "and that the URL is right."
    )


def raised_by_result_backend(exc: BaseException) -> bool:
    """True when ``exc`` (or one it was raised from) was raised inside Celery's result
    backend code: sending a task subscribes to its result there before the broker
    publishes it, and both fail with the same client errors when both are Redis."""
    return any(_in_backend(e.__traceback__) for e in _chain(exc))


def _in_backend(tb: TracebackType | None) -> bool:
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith("celery.backends"):
            return True
        tb = tb.tb_next
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and not any(current is s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen
