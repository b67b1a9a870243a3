"""The search index: building, loading, searching and updating it.

build.py          `python -m serve.build_index`: embed shards, folders or parquet into an index
sources.py        the inputs a build reads, part by part
index.py          the index directory on disk and `SearchIndex` in memory (metadata, loading)
vector_search.py  which FAISS index suits N vectors; building and searching it
thumbnails.py     one small image per row, packed beside the vectors
"""
