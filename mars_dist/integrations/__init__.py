"""Thin adapters of the public API (mars_dist.api) to training frameworks: `hf_trainer` for the Hugging Face Trainer.
A plain accelerate or torch loop calls `mars_dist.attach` directly (docs/api.md)."""
