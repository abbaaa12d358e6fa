"""The domain: the rules of compaction as plain values, with no I/O.

* :mod:`~eskit_tasks.domain.events` — ``NewEvent``, ``RecordedEvent``, stream labels;
* :mod:`~eskit_tasks.domain.decider` — the ``Decider`` protocol (initial state, evolve,
  decide) that users implement;
* :mod:`~eskit_tasks.domain.policy` — ``CompactionPolicy``: what to keep, dry runs;
* :mod:`~eskit_tasks.domain.codec` — how a state becomes snapshot bytes and back
  (canonical JSON, hash, upcasting, strict decoding);
* :mod:`~eskit_tasks.domain.schema` — which state schema wrote a snapshot: markers,
  fingerprints, acceptable upcasters;
* :mod:`~eskit_tasks.domain.compare` — "indistinguishable", stricter than ``==``;
* :mod:`~eskit_tasks.domain.result` — ``CompactionResult`` and ``Outcome``, with the one
  rule of which outcomes need attention;
* :mod:`~eskit_tasks.domain.redact` — passwords masked in every message.

Imports only :mod:`eskit_tasks.errors` (tests/test_layers.py checks the layers).
"""
