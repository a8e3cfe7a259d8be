"""Live metrics of the phase being trained: where :func:`deftx.training.phase.run_phase` sends each
step's values (loss, learning rate, steps per second) while it trains.

One process-wide sink, set around a job by the job runner on rank 0 (``deftx.jobs.run``); none by
default, and then nothing is sent. The sink decides what to do with the values (deftx logs them to
the job's MLflow run, ``deftx.tracking.live``); a sink that fails is dropped, never the training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

Sink = Callable[[str, int, Mapping[str, float]], None]   # (phase name, step, values)

_sink: Sink | None = None


@contextlib.contextmanager
def sending_to(sink: Sink | None) -> Iterator[None]:
    """Send the phases' step values to ``sink`` inside the block."""
    global _sink
    previous, _sink = _sink, sink
    try:
        yield
    finally:
        _sink = previous


def emit(phase: str, step: int, values: Mapping[str, float]) -> None:
    """Hand one step's values to the current sink, if any."""
    global _sink
    if _sink is None:
        return
    try:
        _sink(phase, step, values)
    except Exception:   # noqa: BLE001 - metrics must never stop a training run
        _sink = None
