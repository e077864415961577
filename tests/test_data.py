import json

import numpy as np
import pytest
import torch
from PIL import Image

from fedmm.data import load_splits, partition, to_batch
from fedmm.data.manifest import ManifestError, load_manifest


@pytest.fixture(scope="module")
def splits():
    return load_splits("digits")


def test_bundled_splits_are_disjoint_labelled_and_shifted(splits):
    assert {k: len(v) for k, v in splits.items()} == {"public": 718, "clients": 810, "server": 269}
    for s in splits.values():
        row = s[0]
        assert np.asarray(row["image"]).shape == (32, 32, 3)
        assert row["caption"] and 0 <= row["label"] <= 9
    captions = set(splits["clients"]["caption"])
    assert len(captions) > 50  # varied wording, not one template
    # Domain shift: the public split is plain grey, client images are coloured.
    pub = np.asarray(splits["public"].with_format("numpy")[:100]["image"], dtype=float)
    cli = np.asarray(splits["clients"].with_format("numpy")[:100]["image"], dtype=float)
    assert np.abs(pub[..., 0] - pub[..., 1]).max() == 0
    assert np.abs(cli[..., 0] - cli[..., 1]).mean() > 5
    assert set(splits["public"]["group"]) == {0} and set(splits["clients"]["group"]) == {0, 1}


def _label_share(ds):
    counts = np.bincount(ds["label"], minlength=10)
    return counts.max() / counts.sum()


def test_dirichlet_skew_grows_as_alpha_shrinks(splits):
    clients = splits["clients"]

    def mean_max_share(kind, **kw):
        shares = []
        for i in range(10):
            train, test = partition(clients, kind, i, 10, test_fraction=0.2, **kw)
            shares.append(_label_share(train))
        return np.mean(shares)

    iid = mean_max_share("iid")
    a10 = mean_max_share("dirichlet", alpha=10.0)
    a01 = mean_max_share("dirichlet", alpha=0.1)
    assert iid < 0.3  # about 1/10 per class
    assert a01 > 0.5 > iid and a01 > a10


def test_pathological_gives_k_classes(splits):
    for i in range(10):
        train, test = partition(splits["clients"], "pathological", i, 10, classes_per_client=2)
        assert len(set(train["label"]) | set(test["label"])) <= 2


def test_partitions_cover_client_data_once_with_train_test_split(splits):
    ids = []
    for i in range(5):
        train, test = partition(splits["clients"], "iid", i, 5, test_fraction=0.25)
        assert abs(len(test) / (len(train) + len(test)) - 0.25) < 0.05
        ids += list(train["caption"]) + list(test["caption"])
    assert len(ids) == len(splits["clients"])


def test_more_partitions_than_samples_is_an_error(splits):
    small = splits["clients"].select(range(5))
    with pytest.raises(ValueError, match="num-partitions=6 exceeds the 5"):
        partition(small, "iid", 0, 6)


def _write_images(folder, n, size=12):
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_manifest_skips_missing_and_corrupt_images_and_counts_them(tmp_path):
    _write_images(tmp_path, 6)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"image": f"img{i}.png", "caption": f"a picture {i}", "label": "cat" if i % 2 else "dog", "client": f"site{i % 3}"} for i in range(6)]
    rows += [{"image": "gone.png", "caption": "missing"}, {"image": "broken.png", "caption": "corrupt"}]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    splits, report = load_manifest(manifest)
    assert report.rows == 8 and report.kept == 6 and len(report.skipped) == 2
    assert report.skipped[str(tmp_path / "gone.png")] == "missing"
    assert report.skipped[str(tmp_path / "broken.png")].startswith("unreadable")
    clients = splits["clients"]
    assert len(clients) == 6 and clients[0]["image"] == str(tmp_path / "img0.png")  # a path: decoded per batch
    assert clients.features["label"].names == ["cat", "dog"]
    train, test = partition(clients, "natural", 0, 3, test_fraction=0.5)
    assert len(train) + len(test) == 2


def test_manifest_csv_and_errors(tmp_path):
    _write_images(tmp_path, 2)
    csv = tmp_path / "m.csv"
    csv.write_text("image,caption,label\nimg0.png,a thing,0\nimg1.png,another,1\n")
    splits, report = load_manifest(csv)
    assert report.kept == 2 and splits["clients"]["label"] == [0, 1]
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,caption\nimg0.png,x\n")
    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['image'\]"):
        load_manifest(bad)


def test_manifest_rows_without_captions_train_on_class_prompts(tmp_path):
    """Missing modality: a labelled image with no caption gets its class prompt; no caption and no label is skipped."""
    _write_images(tmp_path, 4)
    csv = tmp_path / "m.csv"
    csv.write_text("image,caption,label\nimg0.png,a red cat,cat\nimg1.png,,dog\nimg2.png,,\nimg3.png,a dog,dog\n")
    splits, report = load_manifest(csv)
    assert report.kept == 3 and report.prompted == 1
    assert report.skipped == {str(tmp_path / "img2.png"): "no caption and no label"}
    assert splits["clients"]["caption"] == ["a red cat", "a photo of dog.", "a dog"]
    labels_only = tmp_path / "labels.jsonl"
    labels_only.write_text("\n".join(json.dumps({"image": f"img{i}.png", "label": i % 2}) for i in range(4)))
    splits, report = load_manifest(labels_only)
    assert report.prompted == 4 and splits["clients"]["caption"][1] == "a photo of 1."


def test_manifest_groups_take_names_like_labels(tmp_path):
    _write_images(tmp_path, 4)
    groups = ["female", "light skin tone", "female", "male"]
    rows = [{"image": f"img{i}.png", "caption": f"a photo {i}", "label": "cat", "group": g} for i, g in enumerate(groups)]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    splits, _ = load_manifest(manifest)
    from fedmm.data import group_names

    names = group_names(splits["clients"])
    assert names == ["female", "light skin tone", "male"]
    assert [names[g] for g in splits["clients"]["group"]] == groups


def test_manifest_mixed_string_and_integer_labels_are_all_names(tmp_path):
    _write_images(tmp_path, 3)
    rows = [{"image": f"img{i}.png", "label": v} for i, v in enumerate(["cat", 3, "dog"])]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    splits, _ = load_manifest(manifest)
    names = splits["clients"].features["label"].names
    assert names == ["3", "cat", "dog"]
    assert [names[i] for i in splits["clients"]["label"]] == ["cat", "3", "dog"]


def test_csv_integer_labels_with_blanks_stay_integers(tmp_path):
    _write_images(tmp_path, 4)
    lines = ["image,caption,label,group"] + ["img0.png,a,3,1", "img1.png,b,,", "img2.png,c,0,0", "img3.png,d,1,"]
    manifest = tmp_path / "data.csv"
    manifest.write_text("\n".join(lines) + "\n")
    splits, _ = load_manifest(manifest)
    clients = splits["clients"]
    assert clients.features["label"].names == ["0", "1", "2", "3"]  # not '3.0'
    assert clients["label"] == [3, -1, 0, 1] and clients["group"] == [1, 0, 0, 0]


def _stripes(path, size=96):
    """Vertical one-pixel stripes: detail a 32 px stage cannot carry at 96 px."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, ::2] = 255
    Image.fromarray(pixels).save(path)


def _column_contrast(images: torch.Tensor) -> float:
    return float((images[..., :, 1:] - images[..., :, :-1]).abs().mean())


def test_a_manifest_image_reaches_the_model_at_its_own_resolution(tmp_path):
    """No fixed 32 px stage: a 96 px model sees the file's 96 px stripes, through open_clip's preprocessing."""
    _stripes(tmp_path / "stripes.png")
    (tmp_path / "m.csv").write_text("image,caption\nstripes.png,stripes\nstripes.png,stripes again\n")
    splits, _ = load_manifest(tmp_path / "m.csv")
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # pixels 0/1 -> -1/+1
    batch = to_batch(splits["clients"], lambda texts: torch.zeros(len(texts), 4, dtype=torch.long), mean, std, 96)
    images = batch.subset(torch.arange(2)).images
    assert images.shape == (2, 3, 96, 96)
    assert _column_contrast(images) > 1.9  # every neighbouring column pair differs by ~2
    from fedmm.data.images import model_transform

    with Image.open(tmp_path / "stripes.png") as im:
        assert torch.equal(images[0], model_transform(96, mean, std)(im.convert("RGB")))
    # what a 32 px stage (the old path) made of the same file: the stripes are gone, so the check above can fail
    with Image.open(tmp_path / "stripes.png") as im:
        thumb = torch.as_tensor(np.asarray(im.convert("RGB").resize((32, 32), Image.BICUBIC)), dtype=torch.float32)
    up = torch.nn.functional.interpolate(thumb.permute(2, 0, 1)[None] / 255.0, size=(96, 96), mode="bilinear")
    assert _column_contrast((up - 0.5) / 0.5) < 0.5


def test_run_class_list_fixes_label_ids_and_refuses_labels_outside_it(tmp_path):
    _write_images(tmp_path, 3)
    (tmp_path / "m.csv").write_text("image,caption,label,group\nimg0.png,a,dog,north\nimg1.png,b,cat,south\n"
                                    "img2.png,c,bird,north\n")
    splits, _ = load_manifest(tmp_path / "m.csv", classes=("cat", "dog", "bird"), groups=("south", "north"))
    clients = splits["clients"]
    assert clients.features["label"].names == ["cat", "dog", "bird"]
    assert clients["label"] == [1, 0, 2] and clients["group"] == [1, 0, 1]  # ids by the run's lists
    (tmp_path / "ids.csv").write_text("image,caption,label\nimg0.png,a,2\nimg1.png,b,0\n")
    assert load_manifest(tmp_path / "ids.csv", classes=("cat", "dog", "bird"))[0]["clients"]["label"] == [2, 0]
    (tmp_path / "bad.csv").write_text("image,caption,label\nimg0.png,a,dog\nimg1.png,b,zebra\nimg2.png,c,7\n")
    with pytest.raises(ManifestError, match=r"column 'label' holds '7', 'zebra', not in the run's 'classes'"):
        load_manifest(tmp_path / "bad.csv", classes=("cat", "dog", "bird"))


def test_exported_site_folders_hold_what_the_partitions_do(tmp_path):
    """``fedmm data export``: a site given its folder trains and tests on exactly partition i's pairs."""
    from fedmm.config import Settings
    from fedmm.data import client_rows, client_split, site_rows, site_split
    from fedmm.data.sites import export_sites, inspect_manifest

    settings = Settings.from_run_config({"model": "fedmm-tiny-vit", "partitioner": "iid"})
    written = export_sites(settings, tmp_path, 3)
    classes = (tmp_path / "run" / "classes.txt").read_text().split()
    site = Settings.from_run_config({**settings.to_run_config(), "classes": ",".join(classes),
                                     "server-dataset": str(tmp_path / "server" / "manifest.jsonl")})
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    tokens = lambda texts: torch.zeros(len(texts), 2, dtype=torch.long)  # noqa: E731
    for i in range(3):
        expected = client_split(settings, client_rows(settings), i, 3)
        got = site_split(site, site_rows(site, str(tmp_path / f"site-{i}" / "manifest.jsonl")))
        assert written[f"site-{i}"] == len(expected[0]) + len(expected[1])
        for want, have in zip(expected, got):
            assert have["caption"] == want["caption"] and have["label"] == want["label"]
            assert have["group"] == want["group"] and have["toxic"] == want["toxic"]
            n = torch.arange(min(8, len(want)))
            files, arrays = (to_batch(d, tokens, mean, std, 32).subset(n).images for d in (have, want))
            assert torch.equal(files, arrays)
            # one memory layout on both paths, channels-last: the default model's CPU step is ~20-30% slower on
            # NCHW batches (docs/benchmarks-log.md, "Site-local data at the simulation's pace")
            assert files.is_contiguous(memory_format=torch.channels_last)
            assert arrays.is_contiguous(memory_format=torch.channels_last)
    found = inspect_manifest(tmp_path / "site-0" / "manifest.jsonl", tuple(classes), decode=True)
    assert found["kept"] == written["site-0"] and not found["skipped"] and found["classes"] == classes
    from fedmm.data import server_split

    assert len(server_split(site)) == written["server"] == len(load_splits("digits")["server"])


def test_fedmm_data_inspect_names_what_it_skips(tmp_path, capsys):
    from fedmm.cli import main

    _write_images(tmp_path, 3, size=64)
    whole = (tmp_path / "img2.png").read_bytes()
    (tmp_path / "img2.png").write_bytes(whole[: len(whole) // 2])  # a header that opens, pixels that do not
    (tmp_path / "m.csv").write_text("image,caption,label,client\nimg0.png,a,cat,s1\nimg1.png,b,dog,s2\n"
                                    "img2.png,c,dog,s2\ngone.png,d,cat,s1\n")
    assert main(["data", "inspect", str(tmp_path / "m.csv"), "--decode", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["rows"] == 4 and found["kept"] == 2
    assert found["skipped"] == {str(tmp_path / "gone.png"): "missing",
                                str(tmp_path / "img2.png"): found["skipped"][str(tmp_path / "img2.png")]}
    assert found["skipped"][str(tmp_path / "img2.png")].startswith("does not decode")
    assert found["per-client"] == {"s1": 1, "s2": 1} and found["per-class"] == {"cat": 1, "dog": 1}
