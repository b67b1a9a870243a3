"""Retrieval service: FastAPI app, FAISS index and encoder over an exported Duet model artifact."""
