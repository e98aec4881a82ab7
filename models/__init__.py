"""Keras architectures, built inside a distribution strategy's scope."""
