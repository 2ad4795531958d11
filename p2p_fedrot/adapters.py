"""Where ``p2p_fedrot.adapters`` was: the module is now ``p2p_fedrot.peers.adapters``. This name keeps
working for one release (``p2p_fedrot.adapters.add_dense_deltas`` as the docs used to show)."""

from .peers.adapters import (CONFIG_FILE, CONSENSUS, DELTAS_FILE, MODEL_CONFIG_FILE, WEIGHTS_FILE, adapter_name,
                             adapter_texts, add_dense_deltas, label_config_text, save_adapter,
                             save_consensus_adapter, save_peer_adapters)

__all__ = ["CONFIG_FILE", "CONSENSUS", "DELTAS_FILE", "MODEL_CONFIG_FILE", "WEIGHTS_FILE", "adapter_name",
           "adapter_texts", "add_dense_deltas", "label_config_text", "save_adapter", "save_consensus_adapter",
           "save_peer_adapters"]
