"""The optional `port` label (`--metrics.port-label`): which listening port
each row of the per-role metrics stands for."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..kernel.probe import Tracer

PORT_LABEL_SLOTS = 20  # "other" plus 19 listening ports


class PortLabels:
    """Rows of the optional `port` label: slot 0 is "other", then listening
    ports in the order they were first seen. A port keeps its slot for the
    exporter's life, so a series never changes meaning."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._labels = ["other"]
        self._slot_of: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, ports: Sequence[int]) -> dict[int, int]:
        """Give slots to new ports while some are free; returns the new ones."""
        added = {}
        with self._lock:
            for port in sorted(set(ports)):
                if port in self._slot_of or len(self._labels) >= self.slots:
                    continue
                self._slot_of[port] = len(self._labels)
                added[port] = len(self._labels)
                self._labels.append(str(port))
        return added

    def labels(self) -> list[str]:
        with self._lock:
            return [*self._labels, *["other"] * (self.slots - len(self._labels))]

    def update(self, tracer: Tracer) -> None:
        """Give the listening ports the program knows a slot, and tell it."""
        listening = [int(key.port) for key in tracer.table("listeners")]
        added = self.add(listening)
        if added:
            table = tracer.table("port_slots")
            for port, slot in added.items():
                table[table.Key(port)] = table.Leaf(slot)
