"""Jobs: one unit of training each. ``spec`` (one frozen dataclass per kind of job), ``cache`` (the
only place that computes keys and decides reuse), ``head`` (the shared MLM head's files),
``recipes`` (the training a job runs), ``run`` (running one on a runtime, dispatched on its type),
``executors`` (where it runs), ``ray`` (the only Ray Train import)."""
