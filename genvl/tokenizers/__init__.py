"""Tokenizers: an offline-trainable BPE text tokenizer (:mod:`.text`) and the VQ-VAE image tokenizer (:mod:`.vqvae`)."""
