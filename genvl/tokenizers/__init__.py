"""Tokenizers: an offline-trainable BPE text tokenizer (and, later, the VQ-VAE image tokenizer)."""
