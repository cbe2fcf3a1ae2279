"""Example Flax Linen models that load Hugging Face checkpoints (Llama decoder, BERT encoder)."""
