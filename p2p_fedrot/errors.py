"""Error types the command line turns into one clear message instead of a traceback."""


class P2PFedRotError(Exception):
    """Base class: a problem the user can fix (bad config, bad input) or a peer that failed."""


class ConfigError(P2PFedRotError, ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key and the fix."""


class PeerError(P2PFedRotError, RuntimeError):
    """A neighbour process timed out, died or sent something that does not match this peer."""


class DivergedError(P2PFedRotError, ArithmeticError):
    """A peer's training loss became inf or nan: the run cannot recover, so it stops with the cause."""
