"""simcore.isc.training.sources: an image folder and a file list scan to the same items; a DataSource of
another format plugs into train() (here an in-memory one)."""
import json

import torch
from test_data import write_photos

from simcore.isc import train as T
from simcore.isc.training.sources import DataSource, ImageFolderSource, ImageListSource, TrainingData, source_for

TINY = dict(widths=(8, 16), dim=16, image_size=32, sample_rate=1.0, progress=False, lr=3e-3, views=1)


def test_a_folder_and_a_list_of_it(tmp_path):
    write_photos(tmp_path / "imgs", 3, sub="a", size=40)
    write_photos(tmp_path / "imgs", 2, sub="b", size=40, start=3)
    (tmp_path / "list.txt").write_text("".join(f"imgs/{d}/{f.name}\n" for d in ("a", "b")
                                               for f in sorted((tmp_path / "imgs" / d).iterdir())))
    folder, listed = source_for(tmp_path / "imgs"), source_for(tmp_path / "list.txt")
    assert type(folder) is ImageFolderSource and type(listed) is ImageListSource
    c = T.TrainConfig(images="", output="", labels="folder", image_size=32).normalised()
    d = folder.scan(c)
    assert (d.labels, d.num_classes, d.num_items, d.classes_are) == ([0, 0, 0, 1, 1], 2, 5, "one per sub-folder")
    c_image = T.TrainConfig(images="", output="", image_size=32).normalised()
    assert listed.scan(c_image).labels == folder.scan(c_image).labels == list(range(5))
    ds = folder.dataset(c, [7, 7, 7, 9, 9], augment=None)          # the trainer's labels, not the source's
    x, y, i, ok = ds[(3, -1)]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and int(y) == 9 and int(i) == 3 and bool(ok)


class Blobs(DataSource):
    """8 classes of coloured squares, 3 items each, made in memory: a format simcore does not read."""

    def scan(self, c, log=None):
        return TrainingData([k // 3 for k in range(24)], 8, classes_are="one per colour")

    def dataset(self, c, labels, augment):
        class Items(torch.utils.data.Dataset):
            def __len__(self):
                return len(labels)

            def __getitem__(self, item):
                index, seed = item
                g = torch.Generator().manual_seed(1000 * index + max(seed, 0) % 1000)
                x = torch.full((3, c.image_size, c.image_size), 30 * (index // 3), dtype=torch.uint8)
                x += torch.randint(0, 20, x.shape, generator=g, dtype=torch.uint8)
                return x, torch.tensor(labels[index]), index, True
        return Items()


def test_another_format_plugs_in(tmp_path):
    msgs = []
    r = T.train(T.TrainConfig(images="(in memory)", output=str(tmp_path), steps=3, batch_size=8, **TINY),
                log_fn=msgs.append, source=Blobs("(in memory)"))
    assert len(r.losses) == 3 and r.stages[0]["classes"] == 8
    assert msgs[0].startswith("24 images, 8 classes (one per colour)")
    start = json.loads(open(tmp_path / "log.jsonl").readline())
    assert start["images"] == 24 and start["classes"] == 8
