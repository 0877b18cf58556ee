"""One process's place in the cluster: its instance id, served endpoints and model cards."""

from __future__ import annotations

import logging
import socket
import uuid

from epdserve.config import RuntimeConfig
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.runtime.discovery import Discovery, Watch
from epdserve.runtime.pool import encode_card
from epdserve.runtime.request_plane import Handler, RequestPlane

log = logging.getLogger(__name__)


class Runtime:
    """etcd discovery plus the NATS request plane, under one namespace and instance id.

    Everything this process registers rides one etcd lease: `shutdown` revokes it first, so
    no new request is routed here, then drains in-flight requests.
    """

    def __init__(self, config: RuntimeConfig, discovery: Discovery, plane: RequestPlane):
        self.config = config
        self.discovery = discovery
        self.plane = plane
        self.instance_id = uuid.uuid4().hex[:12]

    @classmethod
    async def connect(cls, config: RuntimeConfig) -> Runtime:
        discovery = await Discovery.connect(config.etcd_endpoints, config.namespace, config.lease_ttl)
        plane = await RequestPlane.connect(config.nats_server, config.plane)
        return cls(config, discovery, plane)

    def subject(self, component: str, endpoint: str) -> str:
        return f"epdserve.{self.config.namespace}.{component}.{endpoint}.{self.instance_id}"

    async def serve(self, component: str, endpoint: str, handler: Handler) -> str:
        """Serve `handler` on this instance's subject and announce it; returns the subject."""
        subject = self.subject(component, endpoint)
        await self.plane.serve(subject, handler)
        info = pb.InstanceInfo(
            instance_id=self.instance_id,
            component=component,
            endpoint=endpoint,
            subject=subject,
            host=socket.gethostname(),
        )
        await self.discovery.register(
            self.discovery.key("instances", component, endpoint, self.instance_id), info.SerializeToString()
        )
        log.info("serving %s/%s as %s", component, endpoint, subject)
        return subject

    def card_key(self, model_name: str, component: str) -> str:
        # One process may serve several components (the text-only role), each with a card.
        return self.discovery.key("models", model_name, f"{component}-{self.instance_id}")

    async def publish_card(self, card: pb.ModelCard) -> None:
        await self.discovery.register(self.card_key(card.served_model_name, card.component), encode_card(card))

    async def withdraw_card(self, card: pb.ModelCard) -> None:
        await self.discovery.unregister(self.card_key(card.served_model_name, card.component))

    async def watch_cards(self, model_name: str | None = None) -> Watch:
        """Watch every model card, or those of one model."""
        parts = ("models", model_name, "") if model_name else ("models", "")
        return await self.discovery.watch(self.discovery.key(*parts))

    async def shutdown(self) -> None:
        await self.discovery.close()
        await self.plane.close()
