"""``get_aggregator``: names (and the ``pre=`` pre-aggregation option) to aggregator callables."""

from __future__ import annotations

import inspect

from lightning_byz.aggregators import coordinate, distance, flag  # noqa: F401  (they register their rules)
from lightning_byz.aggregators.base import AggregatorFn, registered


def get_aggregator(name: str | AggregatorFn, **kwargs) -> AggregatorFn:
    """Return the aggregator ``name`` built with ``kwargs``; a callable is returned unchanged.

    ``pre="nnm"`` puts nearest-neighbour mixing in front of the rule, with Byzantine budget
    ``pre_lam``. It defaults to the rule's own ``lam`` where that is a Byzantine budget (krum, cwtm,
    ...); for rules without a ``lam`` (cwmed, gm, ...) a given ``lam`` is NNM's alone; where the
    rule's ``lam`` means something else (flag: its regulariser weight) ``pre_lam`` is required.
    """
    if callable(name) and not isinstance(name, str):
        if kwargs:
            raise ValueError(f"keyword arguments {sorted(kwargs)} given with a callable aggregator")
        return name
    pre, pre_lam = kwargs.pop("pre", None), kwargs.pop("pre_lam", None)
    cls = registered(name)
    if pre is None:
        if pre_lam is not None:
            raise ValueError("pre_lam is the budget of a pre-aggregation: it needs pre='nnm'")
        return cls(**kwargs)
    if pre_lam is None and "lam" not in inspect.signature(cls).parameters:
        pre_lam = kwargs.pop("lam", None)
    rule = cls(**kwargs)
    if pre_lam is None:
        if not cls.lam_is_budget:
            raise ValueError(f"{name}: its lam is not a Byzantine budget; give NNM's budget as pre_lam=")
        pre_lam = getattr(rule, "lam", None)
    if pre_lam is None:
        raise ValueError(f"pre={pre!r} needs a Byzantine budget: pass pre_lam= (or lam=)")
    return distance.with_pre_aggregation(pre, rule, lam=pre_lam)
