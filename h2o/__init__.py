"""h2o-lab: KV-cache eviction (H2O and friends) for LLaMA-family models on transformers."""
