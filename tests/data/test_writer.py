"""The shard writers: what lands on disk, determinism, and the sources' bad inputs."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data import PreflightError, build_val_loader, read_index, write_imagefolder, write_synthetic
from pipeline.data.index import sha256_file
from tests.data.conftest import SIZE, data_cfg, split_keys
from tests.fixtures.shards import SYNTHETIC


def test_synthetic_shards_match_their_index(synthetic_shards):
    index = read_index(synthetic_shards)
    assert index.classes == ("disc-0", "square-1", "triangle-2", "diamond-3")
    train, val = index.split("train"), index.split("val")
    assert (train.samples, val.samples) == (360, 40) and sum(train.class_counts) == 360
    assert [s.samples for s in train.shards] == [50] * 7 + [10]  # shard_max_count=50
    for shard in train.shards + val.shards:
        path = synthetic_shards / shard.name
        assert path.stat().st_size == shard.bytes and sha256_file(path) == shard.sha256
        names = [m.name for m in tarfile.open(path).getmembers()]
        assert len(names) == 2 * shard.samples and {n.split(".", 1)[1] for n in names} == {"cls", "jpg"}
    assert not set(split_keys(synthetic_shards)) & set(split_keys(synthetic_shards, "val"))
    counts = np.zeros(4, dtype=int)
    for shard in train.shards:
        with tarfile.open(synthetic_shards / shard.name) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".cls"):
                    counts[int(tf.extractfile(m).read())] += 1
    assert counts.tolist() == list(train.class_counts)


def test_writer_is_deterministic_and_refuses_to_overwrite(tmp_path):
    a = write_synthetic(tmp_path / "a", n=60, classes=3, size=16, seed=7, shard_max_count=25)
    b = write_synthetic(tmp_path / "b", n=60, classes=3, size=16, seed=7, shard_max_count=25)
    assert [s.sha256 for s in a.split("train").shards] == [s.sha256 for s in b.split("train").shards]
    c = write_synthetic(tmp_path / "c", n=60, classes=3, size=16, seed=8, shard_max_count=25)
    assert [s.sha256 for s in a.split("train").shards] != [s.sha256 for s in c.split("train").shards]
    with pytest.raises(PreflightError, match="already holds a data set.*--overwrite"):
        write_synthetic(tmp_path / "a", n=10, classes=2, size=16)
    write_synthetic(tmp_path / "a", n=10, classes=2, size=16, val_frac=0.0, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["_info.json", "train-000000.tar"]


def test_digits_are_the_real_data_set(digits_shards):
    index = read_index(digits_shards)
    assert index.classes == tuple(str(d) for d in range(10))
    assert index.split("train").samples + index.split("val").samples == 1797
    assert index.image_size == (32, 32)
    total = np.add(index.split("train").class_counts, index.split("val").class_counts)
    assert total.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # scikit-learn's class sizes


def _tree(root, spec):
    for cls, n in spec.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            colour = (255, 0, 0) if cls == "red" else (0, 0, 255)
            ext = "png" if i % 2 else "jpg"
            Image.new("RGB", (20 + i, 24), colour).save(root / cls / f"{i}.{ext}")


def test_imagefolder_tree_keeps_bytes_and_labels(tmp_path):
    _tree(tmp_path / "src", {"blue": 6, "red": 4})
    index = write_imagefolder(tmp_path / "out", source=tmp_path / "src", val_frac=0.5, seed=1)
    assert index.classes == ("blue", "red") and index.image_format == "jpg+png"
    val = build_val_loader(data_cfg(tmp_path / "out", num_workers=0), rank=0, world_size=1, batch_size=8,
                           image_size=SIZE)  # fmt: skip
    images, labels = next(iter(val))
    ok = labels >= 0
    red = images[ok][:, 0].mean((1, 2)) > images[ok][:, 2].mean((1, 2))  # red channel brighter than blue
    assert ok.sum() == 5 and red.tolist() == (labels[ok] == 1).tolist()
    with tarfile.open(tmp_path / "out" / index.split("train").shards[0].name) as tf:
        meta = [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
    assert {m["class"] for m in meta} <= {"blue", "red"} and all(m["path"].startswith(str(tmp_path)) for m in meta)


def test_list_file_labels_and_its_errors(tmp_path):
    _tree(tmp_path / "src", {"blue": 2, "red": 2})
    good = tmp_path / "good.txt"
    good.write_text("# path,label\nsrc/blue/0.jpg,1\nsrc/blue/1.png,1\n\nsrc/red/0.jpg,0\nsrc/red/1.png,2\n")
    index = write_imagefolder(tmp_path / "out", source=good, val_frac=0.0)
    assert index.classes == ("0", "1", "2") and index.split("train").class_counts == (1, 2, 1)
    bad = tmp_path / "bad.txt"
    bad.write_text("src/blue/0.jpg,1\nsrc/red/0.jpg,cat\n")
    with pytest.raises(PreflightError, match=r"bad.txt:2: wrong label type 'cat'"):
        write_imagefolder(tmp_path / "o2", source=bad)
    bad.write_text("src/blue/0.jpg,1\nsrc/nope.jpg,0\n")
    with pytest.raises(PreflightError, match=r"bad.txt:2: .*nope.jpg is not an existing"):
        write_imagefolder(tmp_path / "o3", source=bad, strict=True)
    with pytest.raises(PreflightError, match="does not exist"):
        write_imagefolder(tmp_path / "o4", source=tmp_path / "missing")
    (tmp_path / "src" / "empty").mkdir()
    with pytest.raises(PreflightError, match="empty: class folder with no"):
        write_imagefolder(tmp_path / "o5", source=tmp_path / "src")
    (tmp_path / "src" / "empty").rmdir()
    (tmp_path / "src" / "red" / "2.jpg").write_bytes(b"not an image")
    with pytest.raises(PreflightError, match="2.jpg: PIL cannot identify an image in it"):
        write_imagefolder(tmp_path / "o6", source=tmp_path / "src", strict=True)


def test_synthetic_classes_are_separable_by_colour(synthetic_shards):
    # the class is in the image: the mean hue alone sorts samples into their classes
    val = build_val_loader(data_cfg(synthetic_shards, num_workers=0), rank=0, world_size=1, batch_size=40,
                           image_size=SIZE)  # fmt: skip
    images, labels = next(iter(val))
    means = images.mean((2, 3))  # (B, 3)
    centroids = [means[labels == c].mean(0) for c in range(SYNTHETIC["classes"])]
    nearest = [min(range(4), key=lambda c: float((m - centroids[c]).norm())) for m in means]
    assert np.mean(np.array(nearest) == labels.numpy()) > 0.9
