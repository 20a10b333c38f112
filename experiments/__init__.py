"""Reproducible studies of LoRA on real models and data; see experiments/README.md."""
