"""Audio loading, features, tokenizers, manifests and the default corpus."""
