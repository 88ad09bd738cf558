"""The parameter-server core, independent of Lightning and of how messages travel.

- :mod:`.messages`: :class:`Message`, :class:`Rejection`, :class:`Reply`, what transports carry;
- :mod:`.server`: :class:`ParameterServer`, validation, per-worker state, aggregation, the server rule;
- :mod:`.serve`: :class:`ServeLoop`, receive → validate → update → whom to answer (async and sync);
- :mod:`.worker`: :class:`WorkerStep`, batch faults → gradient(s) → worker rule → message faults;
- :mod:`.flat`: :class:`FlatModel`, a module's parameters as one flat vector.

Dependencies run one way: aggregators, optim, faults ← ps ← transports ← strategy ← cli.
"""

from lightning_byz.ps.flat import FlatModel
from lightning_byz.ps.messages import Message, Rejection, Reply
from lightning_byz.ps.serve import ServeLoop, ServerTransport
from lightning_byz.ps.server import ParameterServer
from lightning_byz.ps.worker import WorkerStep, gradient_at

__all__ = [
    "FlatModel",
    "Message",
    "ParameterServer",
    "Rejection",
    "Reply",
    "ServeLoop",
    "ServerTransport",
    "WorkerStep",
    "gradient_at",
]
