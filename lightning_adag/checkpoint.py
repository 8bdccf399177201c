"""What a checkpoint holds besides the model's weights, so that resuming restarts the server where it stood."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lightning_adag.flat import Layout
from lightning_adag.wire import PartClocks

#: The checkpoint key of :class:`CenterRecord`.
KEY = "adag"
#: Where checkpoints written before the record had a key of its own kept it: the callback's state.
_CALLBACK_KEY = "ADAGCallback"


@dataclass
class CenterRecord:
    """The clock of the center a checkpoint's weights hold, the algorithm's server-side state at that same clock
    (for example an outer optimizer's momentum) and, when the weights hold the center rounded
    (``precision="bf16-true"``), the center itself with the layout it belongs to.

    A center cut into parts (``ADAGStrategy(servers=k)``) has a clock per part: ``clock`` is then a
    :class:`~lightning_adag.wire.PartClocks`, saved as its lowest clock plus every part's. A run resumed with the
    same cut restores each part's clock; with another cut, every part starts at the lowest (the weights and server
    state are whole vectors, cut again as the new run's servers hold them)."""

    clock: int = 0
    server_state: dict[str, Tensor] = field(default_factory=dict)
    exact_center: Tensor | None = None
    exact_layout: Layout | None = None
    #: With dynamic data assignment: the epoch, and the position of its order before which every sample had been
    #: trained (where a resumed run starts handing out samples again).
    data: tuple[int, int] | None = None

    def save(self, checkpoint: dict[str, Any]) -> None:
        record: dict[str, Any] = {"clock": int(self.clock), "server_state": self.server_state}
        if isinstance(self.clock, PartClocks):
            record["part_clocks"] = list(self.clock.parts)
        if self.data is not None:
            record["data"] = {"epoch": self.data[0], "position": self.data[1]}
        if self.exact_center is not None:
            record["exact_center"] = {"layout": self.exact_layout.to_json(), "values": self.exact_center}
        checkpoint[KEY] = record

    @classmethod
    def load(cls, checkpoint: dict[str, Any]) -> CenterRecord:
        """The record a checkpoint holds; an empty one (clock 0) for a checkpoint of another strategy."""
        record = checkpoint.get(KEY) or checkpoint.get("callbacks", {}).get(_CALLBACK_KEY) or {}
        exact, data = record.get("exact_center"), record.get("data")
        return cls(
            clock=PartClocks(record["part_clocks"]) if "part_clocks" in record else int(record.get("clock", 0)),
            server_state=dict(record.get("server_state", {})),
            exact_center=None if exact is None else exact["values"],
            exact_layout=None if exact is None else Layout.from_json(exact["layout"]),
            data=None if data is None else (int(data["epoch"]), int(data["position"])),
        )
