"""Merging LoRA adapters into base models, verifying the result, and the safe-merge command."""
