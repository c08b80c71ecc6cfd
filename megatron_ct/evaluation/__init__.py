"""Offline evaluation of saved models (bits per byte of any checkpoint on any text)."""
