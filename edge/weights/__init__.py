"""Weights: the registry (data), fetching and caching (fetch), checkpoint reading and loading (load)."""
