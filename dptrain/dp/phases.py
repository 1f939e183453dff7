"""Names for the parts of a step (forward, backward, norms per layer, clipped sums), so that
`dptrain.dp.cost` can count each part's flops and memory. Costs nothing when nobody counts."""
from __future__ import annotations

import contextlib
import contextvars

_current = contextvars.ContextVar("dptrain_phase", default="other")


@contextlib.contextmanager
def phase(name: str):
    token = _current.set(name)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> str:
    return _current.get()
