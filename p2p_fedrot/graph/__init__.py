"""The communication graph and what mixing on it does: topologies, mixing weights, the per-round
schedule, partial participation, and consensus simulated without any model. Graph maths only:
numpy, scipy and networkx, never torch or the process group."""
