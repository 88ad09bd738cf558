"""``get_aggregator``: names (and the ``pre=`` pre-aggregation option) to aggregator callables."""

from __future__ import annotations

import inspect

from lightning_byz.aggregators import coordinate, distance, flag  # noqa: F401  (they register their rules)
from lightning_byz.aggregators.base import AggregatorFn, registered


def get_aggregator(name: str | AggregatorFn, **kwargs) -> AggregatorFn:
    """Return the aggregator ``name`` built with ``kwargs``; a callable is returned unchanged.

    ``pre="nnm"`` puts nearest-neighbour mixing in front of the rule (it shares the rule's ``lam``).
    """
    if callable(name) and not isinstance(name, str):
        if kwargs:
            raise ValueError(f"keyword arguments {sorted(kwargs)} given with a callable aggregator")
        return name
    pre = kwargs.pop("pre", None)
    cls = registered(name)
    if pre is None:
        return cls(**kwargs)
    lam = kwargs.get("lam", 0.0)
    if "lam" not in inspect.signature(cls).parameters:  # e.g. cwmed, gm: lam is NNM's alone
        kwargs.pop("lam", None)
    return distance.with_pre_aggregation(pre, cls(**kwargs), lam=lam)
