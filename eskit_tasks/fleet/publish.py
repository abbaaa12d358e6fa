"""A page of compact_stream messages, built from one template and published by kombu.

Celery builds every task message it sends from scratch: the task's execution options,
routing, protocol 2 headers, two fresh uuids, argument checks and a handful of option
dicts, each time. For a fan-out page those are the same for every message but a few
fields, and Celery's work was most of the fan-out's time. So a page is sent this way:

1. Celery builds the page's **first** message the ordinary way (``Task.apply_async``),
   into a stand-in producer that keeps what it would publish: the protocol 2 headers
   (``lang``, ``task``, ``id``, ``root_id``, ``parent_id``, ``group``, ``retries``,
   ``eta``, ``expires``, ``timelimit``, ``argsrepr``, ``kwargsrepr``, ``origin``,
   ``ignore_result``, stamps...), the properties (``correlation_id``, ``reply_to``,
   ``priority``, ``delivery_mode``) and the destination (exchange, routing key, the
   queue to declare). Whatever the configuration routes, limits or prioritises, the
   template has it, because Celery made it.
2. Every message of the page is that template with its own task id (in the ``id``
   header, in ``correlation_id``, and in ``root_id`` when the root is the task itself),
   its own ``argsrepr`` (and ``kwargsrepr`` for a capped stream), and its own body
   ``[args, kwargs, embed]``, serialised as JSON once per page but for the args.
3. The messages go to kombu's ``Producer.publish`` inside ``Producer.batch``: on Redis
   one pipeline per page.

A worker cannot tell these messages from Celery's own (tests/fleet/test_publish.py
compares them field by field and has a real worker run them). Where Celery would build
messages differently from one to the next, the template is not used and Celery sends
every message itself (:func:`template_applies`): task-publish signal receivers (they may
add per-message headers, and expect to run per message), ``task_send_sent_event``, a
router other than name-based ``task_routes`` (a function may route on the arguments),
protocol 1, eager mode, or a task class that changes how it sends.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from json.encoder import encode_basestring_ascii
from typing import Any

from celery import Celery, Task, signals
from celery.app.routes import MapRoute
from kombu.utils.json import dumps as kombu_dumps

from eskit_tasks.fleet.constants import COMPACT_STREAM_TASK
from eskit_tasks.fleet.messages import short_repr

#: The last group of a task id (12 hex digits) counts the messages of a page.
_ID_COUNTER = (1 << 48) - 1


class _StandIn:
    """Takes the place of a kombu producer while Celery builds a page's first message:
    keeps the body and publish options Celery hands over, publishes nothing."""

    def __init__(self, producer: Any) -> None:
        self.connection = producer.connection  # send_task wraps its errors with it
        self.body: Any = None
        self.options: dict[str, Any] = {}

    def publish(self, body: Any, **options: Any) -> None:
        self.body, self.options = body, options


def template_applies(app: Celery, task: Task[Any, Any]) -> bool:
    """Whether Celery would build every message of a page alike, but for the fields a
    template changes (see the module's docstring); if not, Celery sends each itself."""
    conf = app.conf
    if int(conf.task_protocol) != 2 or conf.task_always_eager or conf.task_send_sent_event:
        return False
    for signal in (signals.before_task_publish, signals.after_task_publish, signals.task_sent):
        if signal.receivers:
            return False
    routes: Any = getattr(app.amqp.router, "routes", None)  # the stubs do not know it
    if routes is None or not all(isinstance(route, MapRoute) for route in routes):
        return False
    kind = type(task)
    return (
        kind.apply_async is Task.apply_async
        and kind.shadow_name is Task.shadow_name
        and getattr(task, "_dump_pydantic_arguments", None) is None
    )


class PageTemplate:
    """The messages of one page: Celery's message for the page's first stream, with
    what changes from one stream to the next filled in per message."""

    def __init__(
        self, app: Celery, producer: Any, first: tuple[str, str], kwargs: dict[str, Any]
    ) -> None:
        task = app.tasks[COMPACT_STREAM_TASK]
        stand_in = _StandIn(producer)
        first_id = str(uuid.uuid4())
        send: Any = task.apply_async  # the stubs predate these options
        send(
            args=first,
            kwargs=kwargs,
            task_id=first_id,
            producer=stand_in,
            add_to_parent=False,  # no result object per message in the fan-out's request
        )
        options = dict(stand_in.options)
        headers: dict[str, Any] = options.pop("headers")
        if headers.get("id") != first_id or options.pop("correlation_id", None) != first_id:
            raise RuntimeError("Celery's task message no longer carries its id where expected")
        # The argument reprs monitors show: bounded, and built here per message (Celery's
        # saferepr was a fifth of the fan-out's time once).
        headers["kwargsrepr"] = short_repr(kwargs)
        self.root_is_task = headers.get("root_id") == first_id
        self.headers = headers
        self.declare: list[Any] = options.pop("declare", None) or []
        self.serializer = options.pop("serializer", None) or app.conf.task_serializer
        # In a kombu publish batch a message is only buffered (a failed pipeline raises
        # at its flush, and the fan-out retries the page), so kombu's per-message retry
        # wrapper has nothing to retry; where the broker publishes one by one, Celery's
        # retry policy stays.
        if producer.supports_batch_publish:
            options["retry"] = False
            options.pop("retry_policy", None)
        self.options = options
        args, _, embed = stand_in.body
        if list(args) != list(first):
            raise RuntimeError("Celery's task message no longer carries the args first")
        self.json = self.serializer == "json" and not options.get("compression")
        self.embed = embed
        self.tail = f", {kombu_dumps(kwargs)}, {kombu_dumps(embed)}]"  # as kombu would
        # Task ids: a random uuid4 per page, its last 12 hex digits counting up.
        prefix = str(uuid.uuid4())
        self.id_prefix, self.id_start = prefix[:24], int(prefix[24:], 16)

    def publish(
        self,
        producer: Any,
        streams: Iterable[tuple[str, str]],
        kwargs: dict[str, Any],
        caps: Mapping[tuple[str, str], int] | None,
    ) -> None:
        """Publish one message per stream through ``producer`` (inside its batch)."""
        for queue in self.declare:
            producer.maybe_declare(queue)
        publish = producer.publish
        base, options = self.headers, self.options
        prefix, start, root_is_task = self.id_prefix, self.id_start, self.root_is_task
        tail, embed, as_json = self.tail, self.embed, self.json
        quoted = encode_basestring_ascii  # == json.dumps(s) for a str, in C
        for n, stream in enumerate(streams):
            task_id = f"{prefix}{(start + n) & _ID_COUNTER:012x}"
            headers = {**base, "id": task_id, "argsrepr": short_repr(stream)}
            if root_is_task:
                headers["root_id"] = task_id
            cap = None if caps is None else caps.get(stream)
            if cap is None:
                these, these_tail = kwargs, tail
            else:
                these = {**kwargs, "through_version": cap}
                headers["kwargsrepr"] = short_repr(these)
                these_tail = f", {kombu_dumps(these)}, {kombu_dumps(embed)}]"
            if as_json:
                body: Any = f"[[{quoted(stream[0])}, {quoted(stream[1])}]{these_tail}"
                publish(
                    body,
                    content_type="application/json",
                    content_encoding="utf-8",
                    headers=headers,
                    correlation_id=task_id,
                    **options,
                )
            else:
                publish(
                    (list(stream), these, embed),
                    serializer=self.serializer,
                    headers=headers,
                    correlation_id=task_id,
                    **options,
                )
