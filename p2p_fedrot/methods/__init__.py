"""Aggregation methods, one module each; importing this package registers them all."""

from . import adf, centralized, decaf, fedex, fedit, fedrot, fedsa, ffa, local, rolora, tad  # noqa: F401  (registration side effect)
from .base import Method, MethodContext, PeerState, available_methods, make_method

__all__ = ["Method", "MethodContext", "PeerState", "available_methods", "make_method"]
