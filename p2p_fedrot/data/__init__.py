"""Data: labelled corpora (sources) and their non-IID partitions across peers (federated), the same on
every process. The public names of ``federated`` are importable from here: ``from p2p_fedrot.data
import build_data``."""

from .federated import (DEFAULT_SYNTHETIC_SAMPLES, IGNORE_INDEX, Dataset, FederatedData, PeerData, as_corpus,
                        build_data, flip_labels, joined, partition_labels, pool, synthetic_classification,
                        text_datasets)
from .sources import load_text_corpus

__all__ = ["DEFAULT_SYNTHETIC_SAMPLES", "IGNORE_INDEX", "Dataset", "FederatedData", "PeerData", "as_corpus",
           "build_data", "flip_labels", "joined", "load_text_corpus", "partition_labels", "pool",
           "synthetic_classification", "text_datasets"]
