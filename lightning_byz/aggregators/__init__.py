"""Weighted robust aggregation rules: ``get_aggregator(name, **kw)(vectors[n, d], weights[n]) -> [d]``.

Pure torch (no Lightning, no MPI), batched, on any device, float32/float64.
"""

from lightning_byz.aggregators.base import Aggregator, available_aggregators, check_inputs
from lightning_byz.aggregators.registry import get_aggregator

__all__ = ["Aggregator", "available_aggregators", "check_inputs", "get_aggregator"]
