"""A finished task folder opens in the readers people use, as it is: pandas, pyarrow (file and dataset), polars,
DuckDB and Hugging Face `datasets` each see exactly the committed rows, every id once, and `datasets` decodes the
image column as images. Bookkeeping files never get in their way."""

import io

import pytest
from PIL import Image

from flashu_batch.app.demo import run_demo
from flashu_batch.jobs.output import read_output
from flashu_batch.jobs.storage import Storage


@pytest.fixture(scope="module")
def demo(ray_session, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("readers")
    run_demo(str(out), model=checkpoint)
    return out / "demo"


def committed_ids(root) -> list[str]:
    return sorted(read_output(Storage(), str(root)).column("id").to_pylist())


@pytest.mark.parametrize("task", ["t2i", "vqa"])
def test_every_reader_sees_the_committed_rows_once(demo, task):
    import duckdb
    import pandas
    import polars
    import pyarrow.dataset
    import pyarrow.parquet

    root = str(demo / task)
    expected = committed_ids(root)
    assert len(expected) == (6 if task == "t2i" else 4)
    seen = {
        "pandas": pandas.read_parquet(root)["id"].tolist(),
        "pyarrow.parquet": pyarrow.parquet.read_table(root).column("id").to_pylist(),
        "pyarrow.dataset": pyarrow.dataset.dataset(root).to_table().column("id").to_pylist(),
        "polars": polars.scan_parquet(root + "/**/*.parquet").collect()["id"].to_list(),
        "duckdb": [r[0] for r in duckdb.sql(f"select id from read_parquet('{root}/**/*.parquet')").fetchall()],
    }
    for reader, ids in seen.items():
        assert sorted(ids) == expected, reader


def test_datasets_loads_the_folder_and_decodes_images(demo):
    import datasets

    t2i = datasets.load_dataset(str(demo / "t2i"), split="train")
    assert len(t2i) == 6 and sorted(t2i["id"]) == committed_ids(demo / "t2i")
    assert isinstance(t2i.features["image"], datasets.Image)
    for row in t2i:
        if row["error"] is None:
            assert isinstance(row["image"], Image.Image) and row["image"].size == (row["width"], row["height"])
        else:
            assert row["image"] is None
    vqa = datasets.load_dataset(str(demo / "vqa"), split="train")
    assert sorted(vqa["id"]) == committed_ids(demo / "vqa")


def test_images_are_the_committed_pngs(demo):
    import pandas

    frame = pandas.read_parquet(str(demo / "t2i"))
    ok = frame[frame["error"].isna()]
    for image in ok["image"]:
        assert Image.open(io.BytesIO(image["bytes"])).format == "PNG"
