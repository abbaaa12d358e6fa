"""The core: compaction and loading, written against the ports only.

* :mod:`~eskit_tasks.core.compactor` — the ``Compactor``: plan, snapshot, read back,
  verify, then the fenced delete;
* :mod:`~eskit_tasks.core.settlement` — a delete whose COMMIT reply was lost, settled
  from the audit log (also how the fleet reports a task that died after its commit);
* :mod:`~eskit_tasks.core.loading` — ``load_state``: the newest verified snapshot plus
  the events after it, retried when a compaction moved underneath;
* :mod:`~eskit_tasks.core.candidates` — which streams a run compacts, page by page;
* :mod:`~eskit_tasks.core.registry` — ``register_decider``: a stream type's decider,
  state type, schema version and upcasters;
* :mod:`~eskit_tasks.core.verify` — ``verify_snapshots``: can the deciders about to be
  deployed read every stored snapshot?

Imports the domain and the ports; never a database driver, Celery or Redis.
"""
