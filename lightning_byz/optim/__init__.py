"""μ²-SGD and its split into a worker half (STORM momentum) and a server half (AnyTime SGD).

``Mu2SGD`` is a standalone ``torch.optim.Optimizer``; ``split_optimizer`` turns ``Mu2SGD`` (STORM +
AnyTime) or any other ``torch.optim`` optimizer (gradients or worker momentum + the optimizer itself
on the server) into the ``WorkerRule`` / ``ServerRule`` factories the parameter server uses.
The formulas live once in :mod:`lightning_byz.optim.rules`.
"""

from lightning_byz.optim.mu2sgd import Mu2SGD
from lightning_byz.optim.split import (
    AnyTimeServer,
    HeavyBall,
    OptimizerServer,
    OptimizerSplit,
    SendGradient,
    ServerRule,
    SGDServer,
    Storm,
    WorkerRule,
    split_optimizer,
)

__all__ = [
    "AnyTimeServer",
    "HeavyBall",
    "Mu2SGD",
    "OptimizerServer",
    "OptimizerSplit",
    "SGDServer",
    "SendGradient",
    "ServerRule",
    "Storm",
    "WorkerRule",
    "split_optimizer",
]
