"""The files of an index directory (serve/indexing/index.py's docstring says what each holds)."""

MANIFEST_FILE = "index.json"
VECTORS_FILE = "vectors.npy"
FAISS_FILE = "index.faiss"
METADATA_FILE = "metadata.sqlite"
IDS_FILE = "ids.npy"
CREATE_ITEMS_TABLE = (
    "CREATE TABLE items (id INTEGER PRIMARY KEY, key TEXT NOT NULL, "
    "caption TEXT NOT NULL, url TEXT NOT NULL, meta TEXT NOT NULL)"
)
