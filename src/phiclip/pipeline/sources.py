"""The inputs of a bulk run, as the pipeline sees them: records from :mod:`phiclip.inputs` (the one
input layer every command uses), cut into fixed shards.

The records of a listing are cut into shards of ``shard_size`` consecutive records
(:func:`plan_shards`); a shard is the unit of work and of resume. Reading the bytes of a record
(:class:`PayloadReader`) is separate from listing, so that worker processes can do it. Files of a
folder or glob that are not taken as inputs are named in :attr:`InputListing.skipped`, which the
runner writes to ``errors/skipped.parquet`` (stage ``skip``).
"""

from __future__ import annotations

from phiclip.inputs import (
    IMAGE_EXTENSIONS,
    InputError,
    InputListing,
    InputOptions,
    PayloadReader,
    Record,
    list_folder,
    list_glob,
    list_hf,
    list_inputs,
    list_path_file,
    list_table,
    list_texts,
    record_id,
)


def plan_shards(num_records: int, shard_size: int) -> list[range]:
    """Consecutive record positions of each shard: ``[0, s), [s, 2s), ...``; the last may be short.

    >>> plan_shards(5, 2)
    [range(0, 2), range(2, 4), range(4, 5)]
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    return [range(start, min(start + shard_size, num_records)) for start in range(0, num_records, shard_size)]


__all__ = [
    "IMAGE_EXTENSIONS",
    "InputError",
    "InputListing",
    "InputOptions",
    "PayloadReader",
    "Record",
    "list_folder",
    "list_glob",
    "list_hf",
    "list_inputs",
    "list_path_file",
    "list_table",
    "list_texts",
    "plan_shards",
    "record_id",
]
