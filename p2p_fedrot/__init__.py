"""Decentralized gossip fine-tuning of LoRA adapters with Procrustes alignment."""
