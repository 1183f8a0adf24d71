"""Checkpoints: the only wing that knows files, the Hub, the cache and key names."""
