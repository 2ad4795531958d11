"""One run: the round loop, the peers a process hosts, a round's exchange step, the disagreement
metrics and diagnostics, the records a round leaves, the output folder and checkpoints."""
