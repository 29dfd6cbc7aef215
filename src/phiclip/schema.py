"""The on-disk layout of an embedding output directory (written by ``phiclip embed``).

One place for the names, so the writer, the readers (search, evaluation, compare) and the README
agree::

    OUT/
      manifest.json                 what produced the vectors and how many (see ``MANIFEST_*``)
      embeddings/part-00000.parquet id, source, width, height, embedding  (one row per embedded input)
      errors/part-00000.parquet     id, source, stage, reason             (one row per failed input)
      tokens/part-00000.parquet     id, num_tokens, tokens                (Phi-3-vision with --tokens)
      index/                        FAISS index and its metadata (``phiclip index``)

``embedding`` is a fixed-size list of float16 or float32 (``manifest["dtype"]``) of length
``manifest["dim"]``; vectors are L2-normalised when ``manifest["normalized"]`` is true.
"""

from __future__ import annotations

MANIFEST_FILE = "manifest.json"
EMBEDDINGS_DIR = "embeddings"
ERRORS_DIR = "errors"
TOKENS_DIR = "tokens"
INDEX_DIR = "index"
SHARD_PATTERN = "part-{:05d}.parquet"

# Columns of embeddings/*.parquet
COL_ID = "id"  # string: stable id of the input (hash of its source)
COL_SOURCE = "source"  # string: path, URL or dataset key of the input
COL_WIDTH = "width"  # int32: width of the decoded image, pixels (0 for text)
COL_HEIGHT = "height"  # int32: height of the decoded image, pixels (0 for text)
COL_EMBEDDING = "embedding"  # fixed_size_list<float16|float32>[dim]
COL_TEXT = "text"  # string: the text, for embed-text outputs (instead of width/height)

# Columns of errors/*.parquet
COL_STAGE = "stage"  # string: read | decode | preprocess | encode
COL_REASON = "reason"  # string: human-readable reason

# Columns of tokens/*.parquet
COL_NUM_TOKENS = "num_tokens"  # int32
COL_TOKENS = "tokens"  # list<fixed_size_list<float16|float32>[token_dim]>

# Keys of manifest.json
MANIFEST_KEYS = (
    "phiclip_version",  # str
    "kind",  # "image" | "text"
    "encoder",  # dict: Encoder.describe() (spec, name, dim, preprocessing, dtype, device, ...)
    "dim",  # int
    "dtype",  # "float16" | "float32": dtype of the stored vectors
    "normalized",  # bool
    "input",  # dict: what was read (source spec)
    "counts",  # dict: inputs, embedded, failed
    "complete",  # bool: every shard is written
    "settings",  # dict: the run settings that decide the output (compared on rerun)
    "timings",  # dict: seconds per stage of the last run
)
