"""Shared by train/ and serve/: config primitives, model building, preprocessing, the model artifact."""
