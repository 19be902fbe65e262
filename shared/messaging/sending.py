"""Publishing what the lifecycle produces, with confirms: commands to their consumer and merchant events.

The scheduler, the API and the command line send through these, so a command's or an event's routing is
decided here and in the topology only.
"""

from __future__ import annotations

from authnotify.domain.commands import RefreshRequest, RevokeCommand
from authnotify.domain.events import MerchantEvent
from authnotify.messaging.messages import command_message, event_message
from authnotify.messaging.publisher import Publisher
from authnotify.messaging.topology import Consumer, Topology, command_routing_key, event_routing_key


def consumer_of(command: RefreshRequest | RevokeCommand) -> Consumer:
    return Consumer.REVOCATIONS if isinstance(command, RevokeCommand) else Consumer.TOKEN_REFRESH


async def send_command(publisher: Publisher, topology: Topology, command: RefreshRequest | RevokeCommand) -> None:
    """Returns once the broker confirmed the command; :class:`~authnotify.errors.PublishFailed` otherwise."""
    consumer = consumer_of(command)
    await publisher.publish(command_message(command, kind=consumer.value), exchange=topology.notifications_exchange,
                            routing_key=command_routing_key(consumer))


async def send_event(publisher: Publisher, topology: Topology, event: MerchantEvent) -> None:
    """Returns once the broker confirmed the event; :class:`~authnotify.errors.PublishFailed` otherwise."""
    await publisher.publish(event_message(event), exchange=topology.notifications_exchange,
                            routing_key=event_routing_key(event.type))
