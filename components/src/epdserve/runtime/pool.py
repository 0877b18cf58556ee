"""Model cards in etcd: encoding, and a live round-robin pool of the instances behind them."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from google.protobuf import json_format

from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.runtime.discovery import Watch


def encode_card(card: pb.ModelCard) -> bytes:
    return json_format.MessageToJson(card, indent=None).encode()


def decode_card(value: bytes) -> pb.ModelCard:
    return json_format.Parse(value, pb.ModelCard(), ignore_unknown_fields=True)


def watched_cards(watch: Watch, accept: Callable[[pb.ModelCard], bool]) -> list[pb.ModelCard]:
    """The accepted cards of a watch's snapshot, in key order."""
    cards = (decode_card(v) for _, v in sorted(watch.items().items()))
    return [c for c in cards if accept(c)]


class InstancePool:
    """The cards under a watched prefix that pass `accept`, kept current by the watch.

    `pick` rotates over them; with none alive it raises a 503 the client sees.
    """

    def __init__(self, watch: Watch, accept: Callable[[pb.ModelCard], bool], what: str):
        self.watch = watch
        self.accept = accept
        self.what = what
        self._cards: list[pb.ModelCard] = []
        self._turn = itertools.count()
        watch.add_listener(self._refresh)
        self._refresh()

    def _refresh(self) -> None:
        self._cards = watched_cards(self.watch, self.accept)

    def cards(self) -> list[pb.ModelCard]:
        return list(self._cards)

    def pick(self) -> pb.ModelCard:
        cards = self._cards
        if not cards:
            raise EpdError(503, f"no live {self.what}")
        return cards[next(self._turn) % len(cards)]
