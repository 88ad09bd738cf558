"""What travels between a worker and the server, whatever the transport.

A transport turns its wire format into these objects on the way in (:class:`Message`, or a
:class:`Rejection` when the bytes could not even be read as a message) and takes a :class:`Reply`
on the way out, so the serve loop and the worker step never see a header or a tag.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor


@dataclass
class Message:
    """A worker's update: who sent it, its local step, the server version it was computed at.

    ``vector`` is ``None`` when nothing arrived (a dropped or lost message): the server then answers
    with its current parameters without updating. ``buffers`` carries the worker's floating-point
    module buffers (BatchNorm statistics), or is ``None``. ``stop_request``: the worker received
    SIGTERM (no vector): the server stops the whole job as for its own SIGTERM, checkpoint first.
    ``refused``: why another server of a sharded server refused its slice of this message (the
    message is then rejected with that reason).
    """

    worker: int
    step: int
    version: int
    vector: Tensor | None
    buffers: Tensor | None = None
    stop_request: bool = False
    refused: str | None = None

    def clone(self) -> Message:
        """A copy that owns its tensors (a transport's receive buffer is reused for the next message)."""
        return replace(self, vector=_clone(self.vector), buffers=_clone(self.buffers))


@dataclass
class Rejection:
    """Bytes from ``worker`` that the transport could not read as a message (wrong length, a header
    naming another sender): the server counts ``reason``; no reply goes back."""

    worker: int
    reason: str


@dataclass
class Reply:
    """The server's answer: the parameters (and buffers) at ``version``; ``stop`` ends training;
    ``hyper``: the worker rule's scheduled hyper-parameters now (at most two floats, e.g. STORM's β)."""

    version: int
    params: Tensor
    buffers: Tensor | None = None
    stop: bool = False
    hyper: tuple[float, ...] = ()

    def clone(self) -> Reply:
        """A copy that owns its tensors (to send later, while the server's parameters move on)."""
        return replace(self, params=self.params.clone(), buffers=_clone(self.buffers))


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clone()
