"""Aggregation methods, one module each; importing this package registers them all."""

from . import adf, centralized, decaf, fedex, fedgalore, fedit, fedrot, fedsa, ffa, local, rolora, tad  # noqa: F401  (registration side effect)
from .base import (Method, MethodContext, PeerState, available_methods, make_method, method_class,
                   trains_dense_deltas)

__all__ = ["Method", "MethodContext", "PeerState", "available_methods", "make_method", "method_class",
           "trains_dense_deltas"]
