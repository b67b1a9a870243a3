"""Shared by train/ and serve/: config primitives, models, preprocessing, the model artifact."""
