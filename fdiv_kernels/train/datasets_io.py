"""Pick-a-Pic preference data through the ``datasets`` library: memory-mapped Arrow, for datasets of any size.

:class:`~fdiv_kernels.train.data.PreferenceDataset` reads whole tables into memory: right for the embedded
default (a thousand pairs whose images are PNG files), wrong for Pick-a-Pic (about a million pairs whose image
bytes sit in the table). :class:`ArrowPreferenceDataset` reads the same schema through ``datasets``:

- ``.parquet`` shards are converted once, shard by shard (its peak memory follows the largest shard), into
  ``datasets``' Arrow cache (``cache_dir``, default ``HF_DATASETS_CACHE``; later runs reuse it), the way
  diffusers' DPO scripts' ``load_dataset`` does;
- ``.arrow`` shards (``datasets``' own files, e.g. a ``save_to_disk`` folder) are memory-mapped where they are.

Rows are then read on demand from the memory map, so the process holds one batch of rows at a time plus a
9-byte index entry per pair, not the images. The run's stream is unchanged: the same pairs in the same order as
the in-memory reader (ties dropped, winner first), the same ``table_digest`` and ``content_digest`` (so
``--resume`` and cached reference errors do not depend on the reader), and random access, so the seeded
permutation, exact resume and per-process slices of the loop stay as they are.

:func:`open_preferences` picks the reader (``--data-backend``): ``auto`` takes ``datasets`` for Arrow shards
and for parquet tables above :data:`AUTO_BYTES` in all, the in-memory reader otherwise (the embedded default,
jsonl tables).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from .data import (
    COLUMNS,
    DatasetError,
    PreferenceDataset,
    _missing_message,
    check_row,
    no_pairs_error,
    parquet_schema,
    table_files,
)

BACKENDS = ("auto", "memory", "datasets")
AUTO_BYTES = 64 << 20  # parquet tables above this size (all shards together) go through datasets under "auto"
SCAN_ROWS = 512  # rows per batch when the tables are checked and hashed


def dataset_files(path: str | Path) -> tuple[str, list[Path]]:
    """``(kind, files)`` of a dataset path: kind ``parquet``, ``jsonl``, ``arrow`` (shards) or ``saved`` (a
    ``datasets`` ``save_to_disk`` folder, given as the one file)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".arrow":
        return "arrow", [path]
    if path.is_dir():
        arrows = sorted(path.glob("*.arrow"))
        if arrows and (path / "state.json").is_file():
            return "saved", [path]
        others = sorted(path.glob("*.parquet")) + sorted(path.glob("*.jsonl"))
        if arrows and not others:
            return "arrow", arrows
        if arrows:
            raise DatasetError(
                f"{path}: expected one kind of table (.arrow shards, .parquet shards or one .jsonl), "
                f"found {[p.name for p in arrows + others]}"
            )
    files = table_files(path)
    return files[0].suffix[1:], files


def choose_backend(path: str | Path, backend: str = "auto") -> str:
    """The reader ``backend`` resolves to for ``path``: ``memory`` or ``datasets``."""
    if backend not in BACKENDS:
        raise ValueError(f"--data-backend {backend!r}: expected one of {list(BACKENDS)}")
    kind, files = dataset_files(path)
    if kind in ("arrow", "saved"):
        if backend == "memory":
            raise DatasetError(
                f"--data-backend memory reads .parquet and .jsonl tables; {path} holds Arrow data "
                f"(use --data-backend datasets or auto)"
            )
        return "datasets"
    if kind == "jsonl":
        if backend == "datasets":
            raise DatasetError(
                f"--data-backend datasets reads .parquet and .arrow shards; {path} is a jsonl table "
                f"(use --data-backend memory or auto)"
            )
        return "memory"
    if backend != "auto":
        return backend
    return "datasets" if sum(f.stat().st_size for f in files) > AUTO_BYTES else "memory"


def open_preferences(
    path: str | Path,
    resolution: int,
    check_images: bool = True,
    backend: str = "auto",
    cache_dir: str | Path | None = None,
) -> PreferenceDataset:
    """The preference pairs of ``path`` through the reader ``backend`` picks (see :func:`choose_backend`)."""
    if choose_backend(path, backend) == "memory":
        return PreferenceDataset(path, resolution, check_images=check_images)
    return ArrowPreferenceDataset(path, resolution, check_images=check_images, cache_dir=cache_dir)


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "reading large datasets needs the datasets package (pip install datasets, or "
            "pip install 'fdiv_kernels[train]')"
        ) from err
    return datasets


_IMAGE_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_string, pa.types.is_large_string)


def _check_types(file: Path, schema: pa.Schema) -> None:
    """Column types that cannot hold the schema's values fail here, naming the file and column."""
    for name, ok, what in (
        ("caption", (pa.types.is_string, pa.types.is_large_string, pa.types.is_null), "strings"),
        ("jpg_0", _IMAGE_TYPES, "image bytes or paths"),
        ("jpg_1", _IMAGE_TYPES, "image bytes or paths"),
        ("label_0", (pa.types.is_integer, pa.types.is_floating), "numbers 1, 0 or 0.5"),
    ):
        kind = schema.field(name).type
        image_struct = (
            name.startswith("jpg") and pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
        )  # datasets' Image feature: {bytes, path}
        if not (image_struct or any(test(kind) for test in ok)):
            raise DatasetError(f"{file}: column {name!r} must hold {what}; its type is {kind}")


def _source(ref, where: str) -> str:
    """Where an image comes from, for messages: its file, or the table row that holds its bytes."""
    return str(ref) if isinstance(ref, Path) else f"{where} (image bytes)"


def _image_value(value):
    """A cell of an image column as bytes or a path string (``{bytes, path}`` structs: the bytes, else the path)."""
    if isinstance(value, dict):
        return value.get("bytes") if value.get("bytes") is not None else value.get("path")
    return value


class _Rows(Sequence):
    """``(caption, winner, loser, where)`` of pair ``i``, read from the memory map when asked for (the in-memory
    reader's ``rows`` list, lazily)."""

    def __init__(self, owner: ArrowPreferenceDataset):
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner._row)

    def __getitem__(self, i: int):
        o = self.owner
        f, r = int(o._file[i]), int(o._row[i])
        row = o._tables[f].slice(r, 1).to_pylist()[0]
        return o._pair(f, r, row["caption"], row["jpg_0"], row["jpg_1"], bool(o._swap[i]))

    def __iter__(self):
        for f, r, caption, jpg_0, jpg_1, label in self.owner._scan():
            if label != 0.5:
                yield self.owner._pair(f, r, caption, jpg_0, jpg_1, label < 0.5)


class ArrowPreferenceDataset(PreferenceDataset):
    """:class:`PreferenceDataset`'s pairs, read through ``datasets`` from memory-mapped Arrow (see the module doc).

    Every check of the in-memory reader runs here too, a batch of rows at a time, with the same messages
    (naming the file, row and column): missing columns, column types, captions, labels, image paths and, with
    ``check_images``, that every image opens and verifies.
    """

    def __init__(
        self, path: str | Path, resolution: int, check_images: bool = True, cache_dir: str | Path | None = None
    ):
        self.resolution = resolution
        kind, self.files = dataset_files(path)
        if kind == "jsonl":
            raise DatasetError(f"{path}: the datasets reader takes .parquet or .arrow shards, not a jsonl table")
        datasets = _import_datasets()
        self._tables = [self._load(datasets, kind, file, cache_dir) for file in self.files]
        self.dropped_ties = 0
        digest = hashlib.sha256()
        files, rows, swaps = array("i"), array("q"), array("b")  # 13 bytes a pair, not Python ints
        for f, r, caption, jpg_0, jpg_1, label in self._scan():
            where = f"{self.files[f]} row {r}"
            check_row(where, caption, label)
            digest.update(f"{len(caption)}:{caption}\0{float(label)!r}\0".encode())
            if label == 0.5:
                self.dropped_ties += 1
                continue
            _, winner, loser, _ = self._pair(f, r, caption, jpg_0, jpg_1, label < 0.5, check=True, digest=digest)
            if check_images:
                for ref in (winner, loser):
                    self._verify(ref, where)
            files.append(f)
            rows.append(r)
            swaps.append(label < 0.5)
        self._file = np.asarray(files, dtype=np.int32)
        self._row = np.asarray(rows, dtype=np.int64)
        self._swap = np.asarray(swaps, dtype=bool)
        del files, rows, swaps
        self.table_digest = digest.hexdigest()
        self.rows = _Rows(self)
        if not len(self.rows):
            raise no_pairs_error(path, self.dropped_ties)

    @staticmethod
    def _load(datasets, kind: str, file: Path, cache_dir) -> pa.Table:
        """The file's four columns as a memory-mapped Arrow table (parquet: through datasets' cache)."""
        if kind == "parquet":
            schema = parquet_schema(file)
            missing = [c for c in COLUMNS if c not in schema.names]
            if missing:
                raise DatasetError(_missing_message(file, missing, schema.names))
            _check_types(file, schema)
            if pq.ParquetFile(file).metadata.num_rows == 0:  # datasets cannot convert it; no rows, nothing to map
                return pq.read_table(file, columns=list(COLUMNS))
        try:
            if kind == "parquet":
                # No pre-buffering: the conversion holds a row group at a time, not the whole shard's bytes.
                ds = datasets.Dataset.from_parquet(
                    str(file),
                    columns=list(COLUMNS),
                    cache_dir=None if cache_dir is None else str(cache_dir),
                    fragment_scan_options=pds.ParquetFragmentScanOptions(pre_buffer=False),
                )
            elif kind == "arrow":
                ds = datasets.Dataset.from_file(str(file))
            else:
                ds = datasets.load_from_disk(str(file))
        except Exception as err:  # datasets and pyarrow raise many kinds on a damaged file
            what = {
                "parquet": "parquet file",
                "arrow": "Arrow file of the datasets library (IPC stream format)",
                "saved": "datasets save_to_disk folder",
            }[kind]
            raise DatasetError(f"{file} is not a readable {what} ({type(err).__name__}: {err})") from err
        if kind != "parquet":
            missing = [c for c in COLUMNS if c not in ds.column_names]
            if missing:
                raise DatasetError(_missing_message(file, missing, ds.column_names))
        ds = ds.select_columns(list(COLUMNS))
        _check_types(file, ds.data.schema)
        if ds._indices is not None:  # a save_to_disk of a shuffled or selected dataset: rows in its order
            return _IndexedTable(ds.with_format("arrow"))
        return ds.data  # datasets' memory-mapped table: pickles (DataLoader workers) by file, not by content

    def _scan(self):
        """``(file index, row, caption, jpg_0, jpg_1, label)`` of every row, in order, a batch at a time."""
        for f, table in enumerate(self._tables):
            for start in range(0, table.num_rows, SCAN_ROWS):
                batch = table.slice(start, SCAN_ROWS).to_pydict()
                for i, row in enumerate(zip(*(batch[c] for c in COLUMNS))):
                    yield (f, start + i, *row)

    def _pair(self, f: int, r: int, caption, jpg_0, jpg_1, swap: bool, check: bool = False, digest=None):
        """``(caption, winner, loser, where)``: image paths resolved against the table's folder, checked and
        hashed into ``digest`` as the in-memory reader does."""
        file = self.files[f]
        where = f"{file} row {r}"
        refs = []
        for column, ref in (("jpg_0", _image_value(jpg_0)), ("jpg_1", _image_value(jpg_1))):
            if isinstance(ref, str):
                if digest is not None:
                    digest.update(b"path:" + ref.encode() + b"\0")
                ref = (file if file.is_dir() else file.parent) / ref
                if check and not ref.is_file():
                    raise DatasetError(f"{where}: column {column!r} names {ref}, which does not exist")
            elif not isinstance(ref, bytes):
                raise DatasetError(
                    f"{where}: column {column!r} must hold image bytes or a path, got {type(ref).__name__}"
                )
            elif digest is not None:
                digest.update(b"bytes:" + hashlib.sha256(ref).digest())
            refs.append(ref)
        winner, loser = refs[::-1] if swap else refs
        return caption, winner, loser, where

    def _verify(self, ref, where: str) -> None:
        image = self._open(ref, where)
        try:
            image.verify()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
            raise DatasetError(
                f"{_source(ref, where)}: not a readable image, it fails PIL's verification "
                f"({type(err).__name__}: {err}); fix or drop that row"
            ) from err

    def __len__(self) -> int:
        return len(self._row)


class _IndexedTable:
    """A ``save_to_disk`` dataset with an indices mapping, sliced in its own row order (``slice``/``num_rows``)."""

    def __init__(self, ds):
        self.ds = ds
        self.num_rows = len(ds)

    def slice(self, start: int, length: int) -> pa.Table:
        return self.ds[start : start + length]


__all__ = ["AUTO_BYTES", "BACKENDS", "ArrowPreferenceDataset", "choose_backend", "dataset_files", "open_preferences"]
