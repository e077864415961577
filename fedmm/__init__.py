"""fedmm: federated LoRA fine-tuning of open_clip vision-language models."""

__version__ = "0.1.0"
