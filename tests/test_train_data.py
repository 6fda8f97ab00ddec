"""Preference data through the datasets library (fdiv_kernels.train.datasets_io): the same pairs, digests and
errors as the in-memory reader, and memory that stays flat as the table grows."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

pytest.importorskip("datasets")

from fdiv_kernels.train.data import DatasetError, PreferenceDataset, write_pairs  # noqa: E402
from fdiv_kernels.train.datasets_io import (  # noqa: E402
    ArrowPreferenceDataset,
    choose_backend,
    open_preferences,
)

ROOT = Path(__file__).resolve().parents[1]


def png(seed: int, side: int = 8) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def shard_rows(start: int, n: int, labels=(1.0, 0.0, 0.5)) -> dict[str, list]:
    return {
        "caption": [f"caption {i}" for i in range(start, start + n)],
        "jpg_0": [png(2 * i) for i in range(start, start + n)],
        "jpg_1": [png(2 * i + 1) for i in range(start, start + n)],
        "label_0": [labels[i % len(labels)] for i in range(start, start + n)],
        "extra": list(range(start, start + n)),  # Pick-a-Pic shards carry more columns than the four read
    }


def write_shards(folder: Path, sizes=(7, 5)) -> Path:
    folder.mkdir(parents=True)
    start = 0
    for k, n in enumerate(sizes):
        pq.write_table(pa.table(shard_rows(start, n)), folder / f"train-{k:05d}.parquet", row_group_size=4)
        start += n
    return folder


def assert_same_pairs(a: PreferenceDataset, b: PreferenceDataset, same_files: bool = True) -> None:
    assert len(a) == len(b) and a.dropped_ties == b.dropped_ties
    assert a.table_digest == b.table_digest
    order = torch.randperm(len(a), generator=torch.Generator().manual_seed(0)).repeat(2)
    assert a.content_digest(order) == b.content_digest(order)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and torch.equal(x["pixels"], y["pixels"])
        assert a.rows[i][0] == b.rows[i][0] and (a.rows[i][3] == b.rows[i][3] or not same_files)
    # Iteration (the caption check) in the same order.
    assert [r[0] for r in a.rows] == [r[0] for r in b.rows]
    assert [r[3] for r in b.rows] == [b.rows[i][3] for i in range(len(b))]


def test_parquet_shards_read_the_same_pairs_as_the_memory_reader(tmp_path):
    data = write_shards(tmp_path / "shards")
    arrow = ArrowPreferenceDataset(data, 8, cache_dir=tmp_path / "cache")
    assert_same_pairs(PreferenceDataset(data, 8), arrow)
    assert arrow[0]["pixels"].shape == (2, 3, 8, 8) and arrow.dropped_ties == 4
    assert arrow.rows[len(arrow) - 1][3].endswith("train-00001.parquet row 3")  # the shard and its own row
    # A second open reuses datasets' cache: no copy is made twice.
    again = ArrowPreferenceDataset(data, 8, cache_dir=tmp_path / "cache")
    assert again.table_digest == arrow.table_digest
    assert len(list((tmp_path / "cache").rglob("*.arrow"))) == 2


def test_image_paths_and_arrow_shards_and_save_to_disk_read_the_same_pairs(tmp_path):
    import datasets

    # The embedded default's layout: a parquet of image paths next to images/.
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 8, 8, generator=g)
    paths = write_pairs(tmp_path / "paths", [f"c{i}" for i in range(3)], images[:3], images[3:], [1.0, 0.0, 1.0])
    assert_same_pairs(PreferenceDataset(paths, 8), ArrowPreferenceDataset(paths, 8, cache_dir=tmp_path / "c1"))

    shards = write_shards(tmp_path / "shards")
    memory = PreferenceDataset(shards, 8)
    ds = datasets.concatenate_datasets(
        [
            datasets.Dataset.from_parquet(str(f), cache_dir=str(tmp_path / "c2"))
            for f in sorted(shards.glob("*.parquet"))
        ]
    )
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    assert_same_pairs(memory, open_preferences(tmp_path / "saved", 8), same_files=False)
    # Bare .arrow shards (datasets' files), memory-mapped in place.
    bare = tmp_path / "arrow"
    bare.mkdir()
    for f in sorted((tmp_path / "saved").glob("*.arrow")):
        (bare / f.name).write_bytes(f.read_bytes())
    assert_same_pairs(memory, open_preferences(bare, 8), same_files=False)
    # A saved dataset in a shuffled order is read in that order.
    ds.shuffle(seed=0).save_to_disk(str(tmp_path / "shuffled"))
    shuffled = open_preferences(tmp_path / "shuffled", 8)
    assert sorted(r[0] for r in shuffled.rows) == sorted(r[0] for r in memory.rows)
    assert [r[0] for r in shuffled.rows] == [r["caption"] for r in ds.shuffle(seed=0) if r["label_0"] != 0.5]


def test_backend_choice(tmp_path, monkeypatch):
    from fdiv_kernels.train import datasets_io

    shards = write_shards(tmp_path / "shards")
    assert choose_backend(shards) == "memory" and choose_backend(shards, "datasets") == "datasets"
    monkeypatch.setattr(datasets_io, "AUTO_BYTES", 100)  # past the size threshold: datasets
    assert choose_backend(shards) == "datasets"
    assert isinstance(open_preferences(shards, 8, cache_dir=tmp_path / "c"), ArrowPreferenceDataset)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "pairs.jsonl").write_text("")
    with pytest.raises(DatasetError, match="--data-backend datasets.*jsonl"):
        choose_backend(tmp_path / "j", "datasets")
    with pytest.raises(ValueError, match="--data-backend 'fast'"):
        choose_backend(shards, "fast")
    (shards / "x.arrow").write_bytes(b"")
    with pytest.raises(DatasetError, match="one kind of table"):
        choose_backend(shards)


def _edit(rows: dict, column: str, row: int, value) -> dict:
    rows = {k: list(v) for k, v in rows.items()}
    rows[column][row] = value
    return rows


@pytest.mark.parametrize(
    "table, message",
    [
        ({k: v for k, v in shard_rows(0, 3).items() if k != "jpg_1"}, r"bad\.parquet: missing column\(s\) \['jpg_1'\]"),
        ({**shard_rows(0, 3), "label_0": ["1", "0", "1"]}, r"bad\.parquet: column 'label_0' must hold numbers.*string"),
        (
            {**shard_rows(0, 3), "jpg_0": [1, 2, 3]},
            r"bad\.parquet: column 'jpg_0' must hold image bytes or paths.*int64",
        ),
        (
            _edit(shard_rows(0, 3), "label_0", 2, 0.7),
            r"bad\.parquet row 2: column 'label_0' must be 1, 0 or 0\.5; "
            r"got 0\.7 \(soft preference labels",
        ),
        (_edit(shard_rows(0, 3), "caption", 1, None), r"bad\.parquet row 1: column 'caption' must be a string"),
        (
            _edit(shard_rows(0, 3), "jpg_1", 0, b"not an image"),
            r"bad\.parquet row 0 \(image bytes\): not a readable image",
        ),
        (
            _edit(shard_rows(0, 3), "jpg_0", 0, None),
            r"bad\.parquet row 0: column 'jpg_0' must hold image bytes or a path",
        ),
    ],
)
def test_bad_tables_are_named_by_file_row_and_column(tmp_path, table, message):
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.table(table), folder / "bad.parquet")
    with pytest.raises(DatasetError, match=message):
        ArrowPreferenceDataset(folder, 8, cache_dir=tmp_path / "cache")


def test_missing_image_file_unreadable_shard_and_unchecked_images(tmp_path):
    paths = write_pairs(tmp_path / "paths", ["a", "b"], torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), [1.0, 0.0])
    (paths / "images" / "000001_0.png").unlink()
    with pytest.raises(
        DatasetError,
        match=r"pairs\.parquet row 1: column 'jpg_0' names .*000001_0\.png, which does "
        r"not exist",
    ):
        ArrowPreferenceDataset(paths, 8, cache_dir=tmp_path / "cache")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match=r"x\.parquet is not a readable parquet file"):
        ArrowPreferenceDataset(tmp_path / "broken", 8, cache_dir=tmp_path / "cache")
    (tmp_path / "arrow").mkdir()
    (tmp_path / "arrow" / "data.arrow").write_bytes(b"not arrow")
    with pytest.raises(DatasetError, match=r"data\.arrow is not a readable Arrow file"):
        open_preferences(tmp_path / "arrow", 8)
    # --no-check-images: a corrupt image is found when its pair is read, still named.
    folder = tmp_path / "corrupt"
    folder.mkdir()
    pq.write_table(pa.table(_edit(shard_rows(0, 2), "jpg_0", 1, b"junk")), folder / "s.parquet")
    pairs = ArrowPreferenceDataset(folder, 8, check_images=False, cache_dir=tmp_path / "cache")
    pairs[0]
    with pytest.raises(DatasetError, match=r"s\.parquet row 1 \(image bytes\): not a readable image"):
        pairs[1]


MEASURE = textwrap.dedent("""
    import gc, json, resource, sys, tracemalloc
    import pyarrow as pa, torch
    import datasets, datasets.packaged_modules.parquet.parquet  # imported before measuring, as in a run
    from fdiv_kernels.train.data import PreferenceDataset
    from fdiv_kernels.train.datasets_io import ArrowPreferenceDataset
    path, backend, cache = sys.argv[1:4]
    pool = pa.default_memory_pool()
    base_arrow = pool.max_memory()
    gc.collect()
    tracemalloc.start()
    def use(pairs):
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:256]
        for i in order[:64]:
            pairs[int(i)]
        pairs.content_digest(order)
        return len(pairs)
    if backend == "memory":
        n = use(PreferenceDataset(path, 8, check_images=True))
    else:
        n = use(ArrowPreferenceDataset(path, 8, check_images=True, cache_dir=cache))  # converts into the cache
    first = tracemalloc.get_traced_memory()[1] + pool.max_memory() - base_arrow
    gc.collect()  # the same collector state for every table size: its timing otherwise moves the peak by ~150 KB
    tracemalloc.reset_peak()
    if backend == "datasets":  # a later run: opens the cache
        use(ArrowPreferenceDataset(path, 8, check_images=True, cache_dir=cache))
    print(json.dumps({"pairs": n, "peak": first, "python_peak_cached": tracemalloc.get_traced_memory()[1],
                      "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


def _measure(path: Path, backend: str, cache: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), backend, str(cache)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_stays_flat_from_1k_to_10k_rows(tmp_path):
    """Peak memory (Python heap by tracemalloc + Arrow's memory pool) of opening a table, checking every image,
    reading 64 pairs and hashing 256 draws, at 1k and 10k rows of 8x8 PNGs in shards of 1k rows. The datasets
    reader stays flat: on the first open, which converts the shards into datasets' cache a row group at a time
    (its peak follows the largest shard, not the dataset), and on later opens of the cache. The in-memory reader
    grows with the table, which shows that the measurement sees the table."""
    images = [png(i) for i in range(20_000)]  # distinct 8x8 PNGs (about 220 bytes each)
    for n in (1_000, 10_000):
        folder = tmp_path / f"rows{n}"
        folder.mkdir()
        for start in range(0, n, 1_000):
            rows = range(start, start + 1_000)
            table = pa.table(
                {
                    "caption": [f"a photo number {i}" for i in rows],
                    "jpg_0": images[start : start + 1_000],
                    "jpg_1": images[10_000 + start : 11_000 + start],
                    "label_0": [float(i % 2) for i in rows],
                }
            )
            pq.write_table(table, folder / f"train-{start // 1_000:05d}.parquet", row_group_size=250)
    image_bytes = sum(map(len, images))  # the 10k-row table's image bytes
    results = {
        (n, b): _measure(tmp_path / f"rows{n}", b, tmp_path / "cache")
        for n in (1_000, 10_000)
        for b in ("datasets", "memory")
    }
    print(json.dumps({f"{n} rows, {b}": v for (n, b), v in results.items()}, indent=1))
    small, large = results[1_000, "datasets"], results[10_000, "datasets"]
    assert large["pairs"] == 10_000
    # Flat: a 9 bytes per pair index and 10 shards' bookkeeping on top of a fixed working set; the 9k more rows
    # hold about 4 MB of images.
    assert large["peak"] < small["peak"] + 0.1 * image_bytes, (small, large)
    assert large["python_peak_cached"] < small["python_peak_cached"] + 0.05 * image_bytes, (small, large)
    # The in-memory reader holds the table: it grows by more than the 9k rows' image bytes.
    assert results[10_000, "memory"]["peak"] > results[1_000, "memory"]["peak"] + 0.8 * image_bytes, results


def test_two_processes_from_the_ddp_config_with_the_datasets_reader_match_one_with_the_memory_reader(
    tmp_path, monkeypatch
):
    """``accelerate launch --config_file examples/accelerate/ddp.yaml`` (2 gloo processes on CPU) training from
    parquet shards through datasets gives the numbers of one process reading them into memory (within the bound
    that beta/2 times the measured error differences gives: tests/train_helpers.py), and DDP averages the
    gradients of both processes."""
    from train_helpers import (
        CAPTIONS,
        assert_gradients_synchronised,
        assert_runs_match,
        config,
        make_pipeline,
        read_steps,
        record_steps,
        run_recorded,
        train_argv,
    )

    from fdiv_kernels.train.loop import train

    pipeline = make_pipeline(tmp_path / "pipe")
    data = tmp_path / "shards"
    data.mkdir()
    for k in range(2):
        rows = range(6 * k, 6 * k + 6)
        pq.write_table(
            pa.table(
                {
                    "caption": [CAPTIONS[i % len(CAPTIONS)] for i in rows],
                    "jpg_0": [png(2 * i, 16) for i in rows],
                    "jpg_1": [png(2 * i + 1, 16) for i in rows],
                    "label_0": [float(i % 2) for i in rows],
                }
            ),
            data / f"train-{k:05d}.parquet",
        )
    common = train_argv({"pipeline": pipeline, "dataset": data}, None, "--learning-rate", "1e-3")
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "examples" / "accelerate" / "ddp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
    ]
    two = run_recorded(
        [*common, "--data-backend", "datasets", "--output", str(tmp_path / "two")],
        tmp_path,
        launch,
        tmp_path / "steps-two",
        HF_DATASETS_CACHE=str(tmp_path / "hf"),
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert list((tmp_path / "hf").rglob("*.arrow")), "the datasets reader was not used"
    record = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert (record["num_processes"], record["distributed_backend"], record["data_backend"]) == (2, "gloo", "datasets")
    assets = {"pipeline": pipeline, "dataset": data}
    record_steps(tmp_path / "steps-one", monkeypatch.setattr)
    train(config(assets, tmp_path / "one", max_steps=2, data_backend="memory"))
    steps_two = read_steps(tmp_path / "steps-two")
    assert_runs_match(tmp_path / "one", tmp_path / "two", read_steps(tmp_path / "steps-one"), steps_two)
    assert_gradients_synchronised(steps_two)


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {
        name: load_config_from_file(str(ROOT / "examples" / "accelerate" / f"{name}.yaml")).distributed_type
        for name in ("ddp", "deepspeed_zero2", "fsdp")
    }
    assert {k: str(v).split(".")[-1] for k, v in kinds.items()} == {
        "ddp": "MULTI_GPU",
        "deepspeed_zero2": "DEEPSPEED",
        "fsdp": "FSDP",
    }
