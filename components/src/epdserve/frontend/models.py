"""The frontend's view of served models: processor cards in etcd, grouped by name."""

from __future__ import annotations

from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.runtime.discovery import Watch
from epdserve.runtime.pool import watched_cards


class ModelDirectory:
    """Models that have at least one live processor (a card with `input == "text"`)."""

    def __init__(self, watch: Watch):
        self.watch = watch
        self._by_name: dict[str, list[pb.ModelCard]] = {}
        self._turn = 0
        watch.add_listener(self._refresh)
        self._refresh()

    def _refresh(self) -> None:
        by_name: dict[str, list[pb.ModelCard]] = {}
        for card in watched_cards(self.watch, lambda c: c.input == "text"):
            by_name.setdefault(card.served_model_name, []).append(card)
        self._by_name = by_name

    def list(self) -> list[dict]:
        return [
            {
                "id": name,
                "object": "model",
                "created": min(c.created for c in cards),
                "owned_by": "epdserve",
                "max_model_len": cards[0].context_length,
            }
            for name, cards in sorted(self._by_name.items())
        ]

    def pick(self, model: str) -> pb.ModelCard:
        cards = self._by_name.get(model)
        if not cards:
            raise EpdError(404, f"The model `{model}` does not exist.", param="model", type="NotFoundError")
        self._turn += 1
        return cards[self._turn % len(cards)]
