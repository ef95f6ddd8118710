"""simcore.isc.data: image folders and lists, labels, corrupt files, per-sample seeded augmentation in workers."""
import os

import numpy as np
import pytest
import torch

import PIL.Image as PIL
from simcore.isc import augment as A  # noqa: E402
from simcore.isc import data as Dt  # noqa: E402


def write_photos(root, n, size=48, ext="jpg", sub=None, start=0):
    """``n`` crops of a real photograph written as image files (smooth regions and edges)."""
    import skimage.data as skdata
    im = skdata.astronaut()
    folder = os.path.join(root, sub) if sub else str(root)
    os.makedirs(folder, exist_ok=True)
    out = []
    for i in range(start, start + n):
        y, x = 20 + 37 * (i % 10), 30 + 29 * (i // 10 % 10)
        path = os.path.join(folder, f"img{i:03d}.{ext}")
        PIL.fromarray(im[y:y + 96, x:x + 96]).resize((size, size)).save(path)
        out.append(path)
    return out


def test_a_folder_is_listed_recursively_in_sorted_order(tmp_path):
    write_photos(tmp_path, 2, ext="jpg")
    write_photos(tmp_path, 1, ext="png", sub="b", start=5)
    write_photos(tmp_path, 1, ext="webp", sub="a", start=7)
    write_photos(tmp_path, 1, ext="bmp", sub="a", start=8)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    rel = [os.path.relpath(p, tmp_path).replace(os.sep, "/") for p in Dt.list_images(tmp_path)]
    assert rel == ["a/img007.webp", "a/img008.bmp", "b/img005.png", "img000.jpg", "img001.jpg"]


def test_a_file_list_and_its_relative_paths(tmp_path):
    paths = write_photos(tmp_path / "imgs", 3)
    (tmp_path / "list.txt").write_text("# training images\nimgs/img002.jpg\n\n" + os.path.abspath(paths[0]) + "\n")
    got = Dt.list_images(tmp_path / "list.txt")
    assert [os.path.basename(p) for p in got] == ["img002.jpg", "img000.jpg"]
    s = Dt.load_image_set(tmp_path / "list.txt")
    assert s.ids() == ["imgs/img002", "imgs/img000"] and s.labels == [0, 1]


def test_no_images_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(Dt.NoImagesError, match="no images"):
        Dt.list_images(tmp_path)
    with pytest.raises(Dt.NoImagesError, match="no such folder"):
        Dt.list_images(tmp_path / "missing")


def test_labels_per_image_and_per_folder(tmp_path):
    write_photos(tmp_path, 2, sub="cats")
    write_photos(tmp_path, 3, sub="dogs", start=2)
    s = Dt.load_image_set(tmp_path, labels="folder")
    assert s.class_names == ["cats", "dogs"] and s.labels == [0, 0, 1, 1, 1]
    s = Dt.load_image_set(tmp_path, labels="image")
    assert s.num_classes == 5 and s.labels == [0, 1, 2, 3, 4]
    assert s.ids() == ["cats/img000", "cats/img001", "dogs/img002", "dogs/img003", "dogs/img004"]
    write_photos(tmp_path, 1, start=9)              # an image in the root: no class in folder mode
    with pytest.raises(ValueError, match="sub-folder"):
        Dt.load_image_set(tmp_path, labels="folder")


def test_corrupt_files_are_skipped_with_a_warning_or_refused_when_strict(tmp_path):
    write_photos(tmp_path, 3)
    (tmp_path / "garbage.jpg").write_bytes(os.urandom(300))
    (tmp_path / "empty.png").write_bytes(b"")
    logged = []
    with pytest.warns(RuntimeWarning, match="skipped 2 unreadable"):
        s = Dt.load_image_set(tmp_path, log=logged.append)
    assert len(s.paths) == 3 and len(s.skipped) == 2 and "skipped 2" in logged[0]
    with pytest.raises(Dt.CorruptImageError, match="empty.png|garbage.jpg"):
        Dt.load_image_set(tmp_path, strict=True)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"nope")
    with pytest.warns(RuntimeWarning), pytest.raises(Dt.NoImagesError, match="none of the 1 image files"):
        Dt.load_image_set(only_bad)


def test_a_file_truncated_after_its_header_is_dropped_before_the_classes_are_fixed(tmp_path):
    paths = write_photos(tmp_path, 3, size=200)
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[: len(data) // 3])         # the header still reads fine
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        s = Dt.load_image_set(tmp_path)
    assert s.paths == [paths[0], paths[2]] and s.num_classes == 2 and s.skipped[0][0] == paths[1]
    with pytest.raises(Dt.CorruptImageError, match="truncated"):
        Dt.load_image_set(tmp_path, strict=True)
    # a file that breaks after the scan: a dropped sample (or, strict, an error)
    ds = Dt.ImageDataset([paths[1]], [0], 32)
    x, y, i, ok = ds[(0, -1)]
    assert not ok and x.shape == (3, 32, 32) and int(x.sum()) == 0
    with pytest.raises(Dt.CorruptImageError, match="cannot decode"):
        Dt.ImageDataset([paths[1]], [0], 32, strict=True)[(0, -1)]


def test_decode_resizes_the_whole_image_to_a_square(tmp_path):
    p = str(tmp_path / "wide.png")
    PIL.fromarray(np.full((30, 90, 3), 200, np.uint8)).save(p)
    x = Dt.decode_image(p, 24)
    assert x.dtype == torch.uint8 and x.shape == (3, 24, 24) and int(x.min()) == int(x.max()) == 200


def test_the_sampler_is_a_function_of_the_position():
    s = Dt.StageBatchSampler(range(10), 4, seed=3, stage=1, steps=7)
    full = list(s)
    assert len(full) == 7 and all(len(b) == 4 for b in full)
    for epoch in range(3):                           # 2 batches an epoch: 8 distinct items of 10
        items = [i for b in full[2 * epoch:2 * epoch + 2] for i, _ in b]
        assert len(set(items)) == 8
    s.configure(range(10), 4, seed=3, stage=1, start=4, steps=3)
    assert list(s) == full[4:]
    halves = [list(Dt.StageBatchSampler(range(10), 4, seed=3, stage=1, steps=7, rank=r, world_size=2))
              for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*halves)] == [sorted(b) for b in full]
    other = list(Dt.StageBatchSampler(range(10), 4, seed=3, stage=2, steps=7))
    assert other != full


def test_augmented_samples_do_not_depend_on_the_number_of_workers(tmp_path):
    s = Dt.load_image_set(tmp_path if write_photos(tmp_path, 6) else None)
    aug = A.RandomAugment(num_ops=(2, 3), weights={"overlay_image": 4.0, "picture_in_picture": 4.0})
    ds = Dt.ImageDataset(s.paths, s.labels, 32, aug)
    batches = {}
    for workers in (0, 2):
        sampler = Dt.StageBatchSampler(range(6), 4, seed=0, steps=3)
        loader = Dt.make_loader(ds, sampler, workers=workers)
        batches[workers] = [(x.clone(), y.clone(), ok.clone()) for x, y, _, ok in loader]
        assert loader.persistent_workers == (workers > 0)
    assert len(batches[0]) == len(batches[2]) == 3
    for (x0, y0, ok0), (x2, y2, ok2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2) and ok0.all() and ok2.all()
    clean = torch.stack([ds[(i, -1)][0] for i in batches[0][0][1].tolist()])
    assert x0.dtype == torch.uint8 and not torch.equal(batches[0][0][0], clean)   # copies, not the originals


def test_random_augment_combines_a_single_image_with_the_given_others():
    x = torch.rand(3, 24, 24)
    other = torch.zeros(3, 24, 24)
    calls = []

    def others():
        calls.append(1)
        return other

    pip = A.RandomAugment(["picture_in_picture"], num_ops=(1, 1), intensity=(0.9, 0.9))
    out = pip(x, generator=0, others=others)
    assert calls and (out == 0).float().mean() > 0.5      # mostly the (black) background
    calls.clear()
    A.RandomAugment(["hflip"], num_ops=(1, 1))(x, generator=0, others=others)
    assert not calls                                      # decoded only when a combining transform is drawn
    assert torch.equal(pip(x, generator=5), pip(x, generator=5))


def test_each_real_file_is_listed_once_through_link_cycles_and_second_paths(tmp_path):
    a = write_photos(tmp_path, 3, sub="a")
    write_photos(tmp_path, 2, sub="b", start=3)
    os.symlink(".", tmp_path / "loop")                      # a cycle: 5 images, not 5 per level
    os.symlink("a", tmp_path / "a_again")                   # a second way into a/
    os.symlink(a[0], tmp_path / "b" / "link_to_a0.jpg")     # a second path to one file
    with pytest.warns(Dt.DuplicateImageWarning, match="5 distinct image files"):
        s = Dt.load_image_set(tmp_path)
    assert s.ids() == ["a/img000", "a/img001", "a/img002", "b/img003", "b/img004"] and s.num_classes == 5
    with pytest.warns(Dt.DuplicateImageWarning):
        f = Dt.load_image_set(tmp_path, labels="folder")
    assert f.class_names == ["a", "b"] and f.labels == [0, 0, 0, 1, 1]
    listing = tmp_path / "list.txt"
    listing.write_text(f"a/img000.jpg\n{a[0]}\nloop/a/img000.jpg\na/img001.jpg\n")
    with pytest.warns(Dt.DuplicateImageWarning, match="skipped 2"):
        assert Dt.list_images(listing) == [str(tmp_path / "a/img000.jpg"), str(tmp_path / "a/img001.jpg")]


def test_decoding_applies_the_exif_orientation(tmp_path):
    # a horizontal ramp stored sideways with the tag "rotate 90 degrees clockwise to view" (6): seen upright,
    # the ramp runs down the rows; the same pixels without the tag run along the columns
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (64, 1, 3))
    im = PIL.fromarray(ramp)
    exif = im.getexif()
    exif[0x0112] = 6
    for ext in ("png", "jpg"):
        im.save(tmp_path / f"tagged.{ext}", exif=exif)
        im.save(tmp_path / f"plain.{ext}")
        tagged, plain = (Dt.decode_image(tmp_path / f"{n}.{ext}", 32)[0].float() for n in ("tagged", "plain"))
        assert plain[:, -1].mean() - plain[:, 0].mean() > 200          # left to right
        assert tagged[-1, :].mean() - tagged[0, :].mean() > 200        # top to bottom
        assert (tagged[:, -1] - tagged[:, 0]).abs().max() < 8


def test_an_image_above_the_decompression_bomb_limit_gives_one_simcore_warning(tmp_path, monkeypatch):
    paths = write_photos(tmp_path, 2, size=64)
    monkeypatch.setattr(PIL, "MAX_IMAGE_PIXELS", 64 * 64 - 1)       # above it, below twice it: decoded
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = Dt.load_image_set(tmp_path)
        x = Dt.decode_image(paths[0], 16)
    assert s.paths == paths and x.shape == (3, 16, 16)
    kinds = [type(w.message).__name__ for w in caught]
    assert kinds == ["LargeImageWarning"], kinds
    assert "1 more" in str(caught[0].message) and "64x64" in str(caught[0].message)
