"""Synchronisation methods behind one interface (:class:`Synchroniser`): plain DDP, DiLoCo /
Streaming DiLoCo (with PPU's count-normalised partial sync), per-step SDP."""
from .base import Synchroniser
from .ddp import DDPSync
from .diloco import DiLoCoSync, Fragment
from .replicas import ReplicaTransport, StaticReplicas
from .sdp import SDPSync

__all__ = ["Synchroniser", "DDPSync", "DiLoCoSync", "Fragment", "SDPSync", "ReplicaTransport", "StaticReplicas"]
