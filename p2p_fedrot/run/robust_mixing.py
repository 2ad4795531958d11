"""The robust rule a run mixes with (``robust:``), checked against its method and graph.

A rule takes the place of the method's combine on every mixing row that reads the receiver's own
payload; it needs whole buffers mixed by a weighted average (``Method.averages_buffers``: fedit,
fedrot, adf, tad). Methods that send parts of the buffer (ffa, rolora, fedsa), mix in product space
(decaf, flexlora), fold residuals into the base weights (fedex) or mix dense deltas and moments
(fedgalore) have no such average to replace. Rules are self-centred, so they do not run in server
mode: its hub mixes no model of its own, and its clients adopt the hub's as it is.
"""

from __future__ import annotations

import math
from typing import Any

from ..config import RobustConfig
from ..errors import ConfigError
from ..methods import available_methods, method_class
from ..robust.rules import RULES, Rule, make_rule

OPTIONAL = ("tau", "b")  # settings that only some rules take


def rule_settings(config: RobustConfig) -> dict[str, Any]:
    """The ``robust:`` section as make_rule reads it: the rule, ``gauge``, and each optional setting that
    the rule takes or that differs from its default (so that make_rule names one the rule does not take)."""
    takes = RULES[config.rule].params if config.rule in RULES else {}
    defaults = RobustConfig()
    settings = {"rule": config.rule, "gauge": config.gauge}
    for key in OPTIONAL:
        if key in takes or getattr(config, key) != getattr(defaults, key):
            settings[key] = getattr(config, key)
    return settings


def robust_rule(config: RobustConfig, method: str, server: bool) -> Rule | None:
    """The run's rule, its settings checked by make_rule; None for ``rule: none`` (the method's own mixing)."""
    if config.rule == "none":
        changed = [key for key in ("gauge", *OPTIONAL) if getattr(config, key) != getattr(RobustConfig(), key)]
        if changed:
            raise ConfigError(f"robust.{changed[0]} is set but robust.rule is none; name a rule "
                              f"({', '.join(RULES)}) or leave robust.{changed[0]} out")
        return None
    rule = make_rule(rule_settings(config))
    if not method_class(method).averages_buffers:
        accepting = [m for m in available_methods() if method_class(m).averages_buffers]
        raise ConfigError(f"robust.rule = {config.rule} replaces a weighted average of whole buffers, which method "
                          f"{method} does not mix; robust rules mix with {', '.join(accepting)}")
    if server:
        raise ConfigError(f"robust.rule = {config.rule} is centred on the receiver's own model, and in server mode "
                          "the hub mixes none; use a gossip topology, or robust.rule: none")
    return rule


def rule_record(config: RobustConfig) -> dict[str, Any]:
    """The rule and its settings as summary.json describes them (an infinite radius as "inf")."""
    return {key: "inf" if isinstance(value, float) and math.isinf(value) else value
            for key, value in rule_settings(config).items()}
