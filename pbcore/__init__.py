"""pbcore: Perspective Broker for modern Python.

A Sans-IO implementation of Twisted's PB protocol (Banana bytes, Jelly
serialization) that speaks to ``twisted.spread.pb`` byte for byte.
"""

from __future__ import annotations

from .banana import DEFAULT_LIMITS, Decoder, Encoder, Limits
from .broker import Broker, PendingCall
from .budget import DEFAULT_BUDGET, MemoryBudget, OverBudget
from .cred import (
    Avatar,
    IPerspective,
    IUsernameMD5Password,
    Portal,
    Unauthorized,
    _JellyableAvatarMixin,
    _PortalAuthChallenger,
    _PortalRoot,
    _PortalWrapper,
    challenge,
    respond,
)
from .errors import (
    BananaError,
    DeadReferenceError,
    Error,
    InsecureJelly,
    JellyError,
    NoSuchMethod,
    NotJellyable,
    PBConnectionLost,
    ProtocolError,
    RemoteError,
)
from .factory import PBClientFactory, PBServerFactory
from .flavors import (
    MAX_BROKER_REFS,
    AsReferenceable,
    Cacheable,
    CopiedFailure,
    Copyable,
    CopyableFailure,
    IPBRoot,
    Local,
    Referenceable,
    RemoteCache,
    RemoteCacheObserver,
    RemoteCopy,
    RemoteMethod,
    RemoteReference,
    Root,
    Serializable,
    Viewable,
    ViewPoint,
    copyTags,
    failure2Copyable,
    setCopierForClass,
    setCopierForClassTree,
    setFactoryForClass,
)
from .jelly import (
    Jellyable,
    SecurityOptions,
    Unjellyable,
    globalSecurity,
    setUnjellyableFactoryForClass,
    setUnjellyableForClass,
    setUnjellyableForClassTree,
)

#: The TCP port PB servers listen on by convention.
portno = 8787

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LIMITS",
    "Avatar",
    "IPerspective",
    "IUsernameMD5Password",
    "PBClientFactory",
    "PBServerFactory",
    "Portal",
    "Unauthorized",
    "_JellyableAvatarMixin",
    "_PortalAuthChallenger",
    "_PortalRoot",
    "_PortalWrapper",
    "challenge",
    "respond",
    "MAX_BROKER_REFS",
    "AsReferenceable",
    "BananaError",
    "Cacheable",
    "Broker",
    "CopiedFailure",
    "Copyable",
    "CopyableFailure",
    "IPBRoot",
    "Local",
    "PendingCall",
    "Referenceable",
    "RemoteCache",
    "RemoteCacheObserver",
    "RemoteCopy",
    "RemoteMethod",
    "RemoteReference",
    "Root",
    "Serializable",
    "ViewPoint",
    "Viewable",
    "copyTags",
    "failure2Copyable",
    "DeadReferenceError",
    "Decoder",
    "Encoder",
    "Error",
    "InsecureJelly",
    "JellyError",
    "Jellyable",
    "Limits",
    "MemoryBudget",
    "OverBudget",
    "DEFAULT_BUDGET",
    "NoSuchMethod",
    "NotJellyable",
    "PBConnectionLost",
    "ProtocolError",
    "RemoteError",
    "SecurityOptions",
    "Unjellyable",
    "globalSecurity",
    "portno",
    "setCopierForClass",
    "setCopierForClassTree",
    "setFactoryForClass",
    "setUnjellyableFactoryForClass",
    "setUnjellyableForClass",
    "setUnjellyableForClassTree",
]
