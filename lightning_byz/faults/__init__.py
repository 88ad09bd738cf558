"""Fault injection: Byzantine attacks, crashes, stragglers, packet loss, nonlinear augmentation.

Every fault is a Lightning ``Callback`` and a :class:`Fault`; pass it in
``Trainer(callbacks=[...])`` (or a YAML ``trainer.callbacks`` list) and the parameter-server
strategy calls its hooks at the same points in MPI and simulated mode. Worker ids are 1..N
(MPI ranks; the same numbers when simulated).
"""

from lightning_byz.faults.attacks import ATTACKS, ByzantineWorkers, alie_z, alie_z_weighted
from lightning_byz.faults.augmentation import NonlinearAugmentation, cat_map_period
from lightning_byz.faults.base import Fault, FaultSet
from lightning_byz.faults.network import PacketLoss
from lightning_byz.faults.schedule import byzantine_fraction, workers_for_fraction
from lightning_byz.faults.system import Crash, Straggler

__all__ = [
    "ATTACKS",
    "ByzantineWorkers",
    "Crash",
    "Fault",
    "FaultSet",
    "NonlinearAugmentation",
    "PacketLoss",
    "Straggler",
    "alie_z",
    "alie_z_weighted",
    "byzantine_fraction",
    "cat_map_period",
    "workers_for_fraction",
]
