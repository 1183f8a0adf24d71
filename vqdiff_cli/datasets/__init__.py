"""Synthetic captioned data and the quality meter that scores generated pictures against it."""
