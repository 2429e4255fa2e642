"""Per-host agents: mutual-TLS channels that speak the netpass wire protocol.

An I/O layer only: ``tls`` builds the contexts, ``channel`` runs one connection, ``server``
accepts many, ``clock`` estimates clock offsets, ``throughput`` measures FRAMES over TLS.
docs/agent.md describes the API and the test PKI.
"""

from netpass.agent.channel import (
    Channel,
    ChannelClosed,
    ChannelError,
    ConnectError,
    HandshakeError,
    accept,
    connect,
)
from netpass.agent.clock import ClockEstimate, estimate_offset
from netpass.agent.server import AgentServer, Handler, HandlerFactory
from netpass.agent.tls import TestPki, client_context, make_test_pki, server_context

__all__ = [
    "AgentServer",
    "Channel",
    "ChannelClosed",
    "ChannelError",
    "ClockEstimate",
    "ConnectError",
    "Handler",
    "HandlerFactory",
    "HandshakeError",
    "TestPki",
    "accept",
    "client_context",
    "connect",
    "estimate_offset",
    "make_test_pki",
    "server_context",
]
