"""Preference data in the Pick-a-Pic schema: reading (for training) and writing (for the embedded default).

A dataset is a table with the columns ``caption``, ``jpg_0``, ``jpg_1`` and ``label_0`` (1: image 0 preferred,
0: image 1 preferred, 0.5: tie; ties are dropped, as Diffusion-DPO does). Image columns hold encoded image
bytes (as in the Pick-a-Pic parquet shards) or paths relative to the table's folder. The table is one
``.parquet`` or ``.jsonl`` file, or a folder holding one ``.jsonl`` or any number of ``.parquet`` shards.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from .io import atomic_folder

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


class DatasetError(ValueError):
    """Preference data that cannot be used; the message names the file, row or column."""


def table_files(path: str | Path) -> list[Path]:
    """The table file(s) of a dataset path (a file, or a folder with parquet shards or one jsonl)."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in (".parquet", ".jsonl"):
            raise DatasetError(f"{path}: expected a .parquet or .jsonl table in the Pick-a-Pic schema")
        return [path]
    if not path.is_dir():
        raise DatasetError(f"dataset {path} does not exist")
    shards = sorted(path.glob("*.parquet"))
    lines = sorted(path.glob("*.jsonl"))
    if shards and not lines:
        return shards
    if len(lines) == 1 and not shards:
        return lines
    raise DatasetError(
        f"{path}: expected .parquet shards or one .jsonl table, found {[p.name for p in shards + lines] or 'none'}"
    )


def _read_jsonl(file: Path) -> dict[str, list]:
    rows = []
    with file.open() as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetError(f"{file} line {number} is not valid JSON ({err})") from err
                if not isinstance(row, dict):
                    kind = "an array" if isinstance(row, list) else f"a {type(row).__name__}"
                    raise DatasetError(
                        f"{file} line {number} holds {kind}, not a row: a .jsonl table is one JSON object per "
                        f"line, with the columns {list(COLUMNS)}"
                    )
                rows.append(row)
    missing = [c for c in COLUMNS if not rows or any(c not in row for row in rows)]
    if missing:
        raise DatasetError(_missing_message(file, missing, sorted({k for row in rows for k in row})))
    return {c: [row[c] for row in rows] for c in COLUMNS}


def parquet_schema(file: Path) -> pa.Schema:
    """A parquet table's schema (both readers); an empty or unreadable file fails here, naming it."""
    if file.stat().st_size == 0:
        raise DatasetError(f"{file} is empty (0 bytes): no parquet table in it")
    try:
        return pq.read_schema(file)
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"{file} is not a readable parquet file ({err})") from err


def no_pairs_error(path, dropped_ties: int) -> DatasetError:
    """The error of a dataset without a pair to train on (both readers)."""
    why = f"its {dropped_ties} rows are all ties, which are dropped" if dropped_ties else "the table has no rows"
    return DatasetError(f"{path}: no preference pairs ({why})")


def _read_parquet(file: Path) -> dict[str, list]:
    names = parquet_schema(file).names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise DatasetError(_missing_message(file, missing, names))
    return pq.read_table(file, columns=list(COLUMNS)).to_pydict()


def check_row(where: str, caption, label) -> None:
    """A row's caption and label_0, with one error naming the file and row (both readers use it)."""
    if not isinstance(caption, str):
        raise DatasetError(f"{where}: column 'caption' must be a string, got {type(caption).__name__}")
    if isinstance(label, bool) or not isinstance(label, (int, float)) or label not in (0, 0.5, 1):
        soft = isinstance(label, (int, float)) and not isinstance(label, bool) and 0 < label < 1
        raise DatasetError(
            f"{where}: column 'label_0' must be 1, 0 or 0.5; got {label!r}"
            + (
                " (soft preference labels are not supported: round them to 0 or 1, or mark the pair a 0.5 "
                "tie to drop it)"
                if soft
                else ""
            )
        )


def _missing_message(file: Path, missing: list[str], found) -> str:
    return (
        f"{file}: missing column(s) {missing}; a Pick-a-Pic preference table needs {list(COLUMNS)} "
        f"(found {list(found)})"
    )


class PreferenceDataset(Dataset):
    """Pairs of a Pick-a-Pic table, winner first: item ``i`` is ``{"pixels": [2, 3, R, R] in [-1, 1], "caption"}``.

    Images are resized (shorter side to ``resolution``) and centre-cropped to ``resolution`` squares. All
    columns, labels and image references are checked here, before training starts: image files must exist and
    every image must open and pass ``PIL.Image.verify`` (``check_images=False`` skips that on huge datasets).
    """

    def __init__(self, path: str | Path, resolution: int, check_images: bool = True):
        self.resolution = resolution
        self.files = table_files(path)
        self.rows: list[tuple[str, object, object, str]] = []  # caption, winner ref, loser ref, where (for errors)
        self.dropped_ties = 0
        # The tables' content as read (captions, labels, image bytes or paths), for checks on --resume.
        self._table_digest = hashlib.sha256()
        for file in self.files:
            self._add_rows(file, _read_jsonl(file) if file.suffix == ".jsonl" else _read_parquet(file))
        self.table_digest = self._table_digest.hexdigest()
        if not self.rows:
            raise no_pairs_error(path, self.dropped_ties)
        if check_images:
            for _, winner, loser, where in self.rows:
                for ref in (winner, loser):
                    image = self._open(ref, where)
                    try:
                        image.verify()
                    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
                        raise DatasetError(
                            f"{_source(ref, where)}: not a readable image, it fails PIL's "
                            f"verification ({type(err).__name__}: {err}); fix or drop that row"
                        ) from err

    def _add_rows(self, file: Path, columns: dict[str, list]) -> None:
        for row, (caption, jpg_0, jpg_1, label) in enumerate(zip(*(columns[c] for c in COLUMNS))):
            where = f"{file} row {row}"
            check_row(where, caption, label)
            self._table_digest.update(f"{len(caption)}:{caption}\0{float(label)!r}\0".encode())
            if label == 0.5:
                self.dropped_ties += 1
                continue
            refs = []
            for column, ref in (("jpg_0", jpg_0), ("jpg_1", jpg_1)):
                if isinstance(ref, str):
                    self._table_digest.update(b"path:" + ref.encode() + b"\0")
                    ref = file.parent / ref
                    if not ref.is_file():
                        raise DatasetError(f"{where}: column {column!r} names {ref}, which does not exist")
                elif not isinstance(ref, bytes):
                    raise DatasetError(
                        f"{where}: column {column!r} must hold image bytes or a path, got {type(ref).__name__}"
                    )
                if isinstance(ref, bytes):
                    self._table_digest.update(b"bytes:" + hashlib.sha256(ref).digest())
                refs.append(ref)
            winner, loser = refs if label > 0.5 else refs[::-1]
            self.rows.append((caption, winner, loser, where))

    @staticmethod
    def _open(ref, where: str) -> Image.Image:
        try:
            return Image.open(ref if isinstance(ref, Path) else io.BytesIO(ref))
        except Exception as err:  # UnidentifiedImageError, OSError, DecompressionBombError, ...
            raise DatasetError(f"{_source(ref, where)}: not a readable image ({err})") from err

    def _pixels(self, ref, where: str) -> torch.Tensor:
        image = self._open(ref, where)
        try:
            image = image.convert("RGB")
        except Exception as err:  # truncated or corrupt image data (OSError, SyntaxError, ValueError, ...)
            raise DatasetError(f"{_source(ref, where)}: image data is corrupt ({err}); fix or drop that row") from err
        r = self.resolution
        if image.size != (r, r):
            scale = r / min(image.size)
            size = (max(r, round(image.width * scale)), max(r, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            left, top = (image.width - r) // 2, (image.height - r) // 2
            image = image.crop((left, top, left + r, top + r))
        array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        return array.permute(2, 0, 1) / 127.5 - 1

    def __len__(self) -> int:
        return len(self.rows)

    def content_digest(self, order) -> str:
        """sha256 of the pairs drawn in ``order`` (pair indices), in that order: caption, winner and loser image
        bytes (read from their files for tables that hold paths). Everything a data stream feeds the model."""
        pair_digests: dict[int, bytes] = {}
        digest = hashlib.sha256()
        for index in order:
            index = int(index)
            if index not in pair_digests:
                caption, winner, loser, where = self.rows[index]
                pair = hashlib.sha256(f"{len(caption)}:{caption}\0".encode())
                for ref in (winner, loser):
                    pair.update(hashlib.sha256(self._read_bytes(ref, where)).digest())
                pair_digests[index] = pair.digest()
            digest.update(pair_digests[index])
        return digest.hexdigest()

    @staticmethod
    def _read_bytes(ref, where: str) -> bytes:
        if not isinstance(ref, Path):
            return ref
        try:
            return ref.read_bytes()
        except OSError as err:
            raise DatasetError(f"{where}: cannot read {ref} ({err})") from err

    def __getitem__(self, index: int) -> dict:
        caption, winner, loser, where = self.rows[index]
        return {"pixels": torch.stack([self._pixels(winner, where), self._pixels(loser, where)]), "caption": caption}


def _source(ref, where: str) -> str:
    """Where an image comes from, for messages: its file, or the table row that holds its bytes."""
    return str(ref) if isinstance(ref, Path) else f"{where} (image bytes)"


def to_png_bytes(image: torch.Tensor) -> bytes:
    """An image [3, H, W] in [0, 1] as PNG bytes (lossless: JPEG would blur 16-pixel objects)."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pairs(
    folder: str | Path,
    captions: list[str],
    images_0: torch.Tensor,
    images_1: torch.Tensor,
    label_0: list[float],
    extra: dict[str, list] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Pick-a-Pic dataset: ``images/`` of PNGs and ``pairs.parquet`` whose jpg_* columns hold their paths."""
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        paths_0, paths_1 = [], []
        for i, (a, b) in enumerate(zip(images_0, images_1)):
            for image, paths, side in ((a, paths_0, 0), (b, paths_1, 1)):
                name = f"images/{i:06d}_{side}.png"
                (tmp / name).write_bytes(to_png_bytes(image))
                paths.append(name)
        columns = {"caption": captions, "jpg_0": paths_0, "jpg_1": paths_1, "label_0": label_0, **(extra or {})}
        pq.write_table(pa.table(columns), tmp / "pairs.parquet")
    return Path(folder)
