"""The search index: building, loading, searching, filtering and updating it.

- `build.py`: `python -m serve.build_index`, embed shards, folders or parquet into an index
- `sources.py`: the inputs a build reads, part by part
- `layout.py`: the names of the index directory's files
- `index.py`: the index directory on disk and `SearchIndex` in memory (metadata, loading)
- `vector_search.py`: which FAISS index suits N vectors; building and searching it
- `filters.py`, `filtered_search.py`: metadata filters, their columns, top-k among allowed rows
- `thumbnails.py`: one small image per row, packed beside the vectors
- `updates.py`: item ids of rows, deleted rows, items added since the snapshot
- `journal.py`: the write-ahead journal of adds and deletes; one writer per index
- `compaction.py`: a new snapshot with the journal folded in, swapped in while serving
- `store.py`: `ServedIndex`, what the routes use of an index, whichever store holds it
- `qdrant_store.py`, `qdrant_filters.py`: a Qdrant collection as the store; filters for it
- `to_qdrant.py`: `python -m serve.indexing.to_qdrant`, a built index into a Qdrant collection
"""
