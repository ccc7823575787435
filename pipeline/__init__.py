"""Distributed ViT pretraining: DeepSpeed ZeRO ranks on WebDataset shards, tracked in MLflow."""

__version__ = "0.1.0"
