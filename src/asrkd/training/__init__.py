"""Losses, callbacks and the Trainer factory."""
