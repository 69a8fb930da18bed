"""Shared by the robust strategies: reduce the updates coordinate by coordinate, one tensor at a time.

A coordinate-wise statistic (median, trimmed mean) needs every site's value of a coordinate at once,
so the stored updates are opened together (safetensors maps them, nothing is read yet) and stacked
one tensor name at a time: memory is ``sites x largest tensor``, not ``sites x model``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from safetensors import SafetensorError, safe_open

from federation.strategies.base import State, UpdateInfo
from federation.wire import WireError


def reduce_coordinatewise(
    updates: Sequence[UpdateInfo],
    names: list[str],
    like: State,
    reduce: Callable[[torch.Tensor], torch.Tensor],
) -> State:
    """``{name: reduce(stack([u[name] for u in updates]))}``; ``reduce`` gets a sorted (m, ...) stack."""
    if not updates:
        raise ValueError("no updates to aggregate")
    out: State = {}
    with contextlib.ExitStack() as stack:
        try:
            files = [stack.enter_context(safe_open(str(u.path), framework="pt")) for u in updates]
        except SafetensorError as exc:
            raise WireError(f"stored update unreadable ({exc})") from None
        for name in names:
            values = torch.stack([f.get_tensor(name).to(torch.float32) for f in files])
            out[name] = reduce(values.sort(dim=0).values).to(like[name].dtype)
    return out
