"""Talking to other processes: the process group and its collectives, the neighbour exchange, who
needs whose payload, screening of what arrives, the fault drill. Moves flat tensors; knows nothing of
LoRA, peers' models or methods."""
