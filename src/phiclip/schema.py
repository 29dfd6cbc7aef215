"""The on-disk layout of an embedding output directory (written by ``phiclip embed``).

One place for the names, so the writer, the readers (search, evaluation, compare) and the README
agree::

    OUT/
      manifest.json                 what produced the vectors and how many (see ``MANIFEST_*``)
      embeddings/part-00000.parquet id, source, width, height, embedding, label, captions, split, metadata
                                    (one row per embedded input; the annotations null where the input has none)
      errors/part-00000.parquet     id, source, stage, reason             (one row per failed input)
      errors/skipped.parquet        id, source, stage, reason             (one row per file not taken as an input)
      tokens/part-00000.parquet     id, num_tokens, tokens                (Phi-3-vision with --tokens)
      index/                        FAISS index and its metadata (``phiclip index``)

``embedding`` is a fixed-size list of float16 or float32 (``manifest["dtype"]``) of length
``manifest["dim"]``; vectors are L2-normalised when ``manifest["normalized"]`` is true.

``source`` of a file is its absolute path as text (:func:`path_to_source`). POSIX file names are
bytes and need not be UTF-8, while Parquet strings must be, so the text form is lossless: every
backslash is doubled and every byte that is not part of valid UTF-8 is written ``\\xNN`` (two
lower-case hex digits), so ``b"/photos/caf\\xe9.png"`` (Latin-1) is stored as ``/photos/caf\\xe9.png``
and :func:`source_to_path` gives the bytes back. Every other path (valid UTF-8, no backslash, which
is nearly all) is stored unchanged. The ``id`` of a file is computed from the bytes of its path.
"""

from __future__ import annotations

import os
import re

MANIFEST_FILE = "manifest.json"
EMBEDDINGS_DIR = "embeddings"
ERRORS_DIR = "errors"
TOKENS_DIR = "tokens"
INDEX_DIR = "index"
SHARD_PATTERN = "part-{:05d}.parquet"
#: dtypes of the stored vectors (``manifest["dtype"]``).
VECTOR_DTYPES = ("float16", "float32")
#: ``errors/skipped.parquet``: the files of a folder, glob or list that were not taken as inputs (no
#: image extension, hidden), stage ``skip``; not part of any shard and not counted as failed.
SKIPPED_FILE = "skipped.parquet"
STAGE_SKIP = "skip"

# Columns of embeddings/*.parquet
COL_ID = "id"  # string: stable id of the input (hash of its source)
COL_SOURCE = "source"  # string: path, URL or dataset key of the input
COL_WIDTH = "width"  # int32: width of the decoded image, pixels (0 for text)
COL_HEIGHT = "height"  # int32: height of the decoded image, pixels (0 for text)
COL_EMBEDDING = "embedding"  # fixed_size_list<float16|float32>[dim]
COL_TEXT = "text"  # string: the text, for embed-text outputs (instead of width/height)
# Annotations of image outputs (manifest["annotations"] true; every column nullable, null when the input has none):
COL_LABEL = "label"  # string: the input's label (a class name; an integer label, e.g. a WebDataset cls, as text)
COL_CAPTIONS = "captions"  # list<string>: its captions (a table's caption column, a WebDataset txt member)
COL_SPLIT = "split"  # string: its split (a dataset's split, a table's split column)
COL_METADATA = "metadata"  # string: JSON object of its metadata (--metadata-column values, a WebDataset json member)
ANNOTATION_COLUMNS = (COL_LABEL, COL_CAPTIONS, COL_SPLIT, COL_METADATA)

# Columns of errors/*.parquet
COL_STAGE = "stage"  # string: read | fetch (a URL) | decode | preprocess | encode | skip (in SKIPPED_FILE)
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
    "generations",  # list of dict: one per run that added inputs (first_shard, num_shards, num_inputs, fingerprint)
    "annotations",  # bool: embeddings/ has the ANNOTATION_COLUMNS (outputs made before them do not)
)


_ESCAPED = re.compile(r"\\(\\|x[0-9a-f]{2})")


def path_to_source(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """The lossless text form of a file path stored in ``source`` (see the module docstring).

    >>> path_to_source(b"/in/caf\\xe9.png")
    '/in/caf\\\\xe9.png'
    >>> path_to_source("/in/café.png")
    '/in/café.png'
    """
    raw = os.fsencode(path)
    if b"\\" not in raw:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
    out: list[str] = []
    for ch in raw.decode("utf-8", "surrogateescape"):
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":  # an undecodable byte, as surrogateescape keeps it
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def source_to_path(source: str) -> bytes:
    """The file path (bytes, as the file system has it) of a ``source`` written by :func:`path_to_source`;
    ``os.fsdecode`` of it opens the file from Python.

    Raises:
        ValueError: ``source`` has a backslash that is neither ``\\\\`` nor ``\\xNN``, so it is not
            such a text form (row sources such as ``TABLE#row=3`` are not paths either).
    """
    out = bytearray()
    pos = 0
    for m in _ESCAPED.finditer(source):
        plain = source[pos : m.start()]
        if "\\" in plain:
            break
        out += plain.encode("utf-8")
        token = m.group(1)
        out += b"\\" if token == "\\" else bytes([int(token[1:], 16)])
        pos = m.end()
    rest = source[pos:]
    if "\\" in rest:
        raise ValueError(f"{source!r} is not a path text form of phiclip: a backslash must be written \\\\ or \\xNN")
    out += rest.encode("utf-8")
    return bytes(out)
