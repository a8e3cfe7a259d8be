"""Jobs: one unit of training each. ``spec`` (what a job is), ``cache`` (digests and reuse),
``recipes`` (the training a job runs), ``run`` (running one on a runtime), ``executors`` (where it
runs), ``ray`` (the only Ray Train import)."""
