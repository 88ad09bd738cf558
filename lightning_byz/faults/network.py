"""Packet loss on the links between chosen workers and the server (FA paper §3.2, "drop 10% of
gradients", emulated there with Linux netem).

A message of ``numel`` elements of ``itemsize`` bytes is cut into packets of
``packet_bytes // itemsize`` whole elements (1,408 bytes = 352 float32 by default, the last packet
shorter). In ``mode="zero"`` each packet is lost independently with probability ``rate`` and its
elements arrive as zeros. In ``mode="message"`` the whole message is lost with probability ``rate``
(the hook returns ``None`` and the server keeps that worker's stale vector).
"""

from __future__ import annotations

from collections import Counter

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_byz.faults.common import WorkerFault

MODES = ("zero", "message")


def packet_loss_mask(
    numel: int, itemsize: int, packet_bytes: int, rate: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Bool masks of the lost packets [packets] and of the elements they carried [numel]."""
    per_packet = packet_bytes // itemsize
    packets = -(-numel // per_packet)
    lost = torch.rand(packets, generator=generator) < rate
    return lost, lost.repeat_interleave(per_packet)[:numel]


class PacketLoss(WorkerFault):
    """Lose packets (or whole messages) sent by the workers in ``links`` with probability ``rate``.

    Counters (see :meth:`metrics`): ``messages``, ``messages_lost``, ``packets``, ``packets_lost``.
    """

    kind = "packet_loss"
    counters = ('messages', 'messages_lost', 'packets', 'packets_lost')

    def __init__(
        self, links: Sequence[int], rate: float = 0.1, packet_bytes: int = 1408, mode: str = "zero"
    ) -> None:
        super().__init__(links, what="links")
        if not (isinstance(rate, (int, float)) and 0 <= rate < 1):
            raise ValueError(f"packet loss rate must be in [0, 1), got {rate!r}")
        if isinstance(packet_bytes, bool) or not isinstance(packet_bytes, int) or packet_bytes < 8:
            raise ValueError(f"packet_bytes must be an integer >= 8, got {packet_bytes!r}")
        if mode not in MODES:
            raise ValueError(f"unknown packet loss mode {mode!r}; choose one of {', '.join(MODES)}")
        self.rate, self.packet_bytes, self.mode = float(rate), packet_bytes, mode

    def on_worker_message(self, worker: int, step: int, vector: Tensor) -> Tensor | None:
        if not self.targets(worker):
            return vector
        generator = self.generator(worker, step)
        self.counts["messages"] += 1
        if self.mode == "message":
            if torch.rand((), generator=generator) < self.rate:
                self.counts["messages_lost"] += 1
                return None
            return vector
        if vector.element_size() > self.packet_bytes:
            raise ValueError(
                f"packet_bytes={self.packet_bytes} is smaller than one {vector.dtype} element"
            )
        lost_packets, lost_elements = packet_loss_mask(
            vector.numel(), vector.element_size(), self.packet_bytes, self.rate, generator
        )
        packets_lost = int(lost_packets.sum())
        self.counts["packets"] += lost_packets.numel()
        self.counts["packets_lost"] += packets_lost
        if packets_lost == 0:
            return vector
        return vector.masked_fill(lost_elements.to(vector.device).view(vector.shape), 0)

    def metrics_of(self, counts: Counter[str]) -> dict[str, float]:
        """Counters plus ``lost_fraction`` of packets (``zero`` mode) or messages (``message``)."""
        out = super().metrics_of(counts)
        unit = "messages" if self.mode == "message" else "packets"
        if counts[unit]:
            out[f"{self.kind}/lost_fraction"] = counts[f"{unit}_lost"] / counts[unit]
        return out
