"""Reading and replacing the inputs or labels of a batch, whatever the dataloader yields.

Supported: a tuple/list ``(inputs, labels, ...)`` indexed by position (default keys 0 and 1) and a
dict indexed by key (pass e.g. ``input_key="image", target_key="label"``). The batch is never
modified in place: a new tuple/list/dict of the same type is returned.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from torch import Tensor


def get_field(batch: Any, key: Hashable, what: str) -> Tensor:
    if isinstance(batch, (tuple, list)):
        if not isinstance(key, int) or not -len(batch) <= key < len(batch):
            raise ValueError(f"{what} {key!r} is not a position in a batch of length {len(batch)}")
    elif isinstance(batch, dict):
        if key not in batch:
            raise ValueError(f"{what} {key!r} not in the batch's keys {sorted(map(str, batch))}")
    else:
        raise ValueError(
            f"unsupported batch type {type(batch).__name__}: faults read (inputs, labels) "
            "tuples/lists or dicts"
        )
    value = batch[key]
    if not isinstance(value, Tensor):
        raise ValueError(f"{what} {key!r} of the batch is a {type(value).__name__}, not a Tensor")
    return value


def replace_field(batch: Any, key: Hashable, value: Tensor) -> Any:
    if isinstance(batch, dict):
        return {**batch, key: value}
    items = list(batch)
    items[key] = value
    return type(batch)(items) if isinstance(batch, list) else tuple(items)
