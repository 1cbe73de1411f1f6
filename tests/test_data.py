"""Data: Fashion-MNIST setup (offline files and errors), ImageFolder / ImageNet layouts, small images, bad files."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from src.config import parse_config
from src.datasets import make_dataset
from src.datasets import fashion_mnist as fm
from src.transforms import make_transforms

pytestmark = pytest.mark.timeout(120)


def write_idx_gz(path, array):
    """IDX file (big-endian magic: 0x0000 08 <ndim>, then the dims as int32), gzipped like Debian ships it."""
    header = struct.pack('>BBBB', 0, 0, 0x08, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def debian_dir(tmp_path):
    """A stand-in for /usr/share/datasets/fashion-mnist with 12 train and 4 test images."""
    d = tmp_path / 'debian'
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (('train', 12), ('t10k', 4)):
        write_idx_gz(d / f'{split}-images-idx3-ubyte.gz', rng.integers(0, 256, size=(n, 28, 28)))
        write_idx_gz(d / f'{split}-labels-idx1-ubyte.gz', np.arange(n) % 10)
    return d


def test_fashion_mnist_setup_from_debian_files(tmp_path, debian_dir):
    root = tmp_path / 'data'
    assert fm.prepare(str(root), debian_dir=str(debian_dir), download=False).startswith('decompressed')
    assert fm.prepare(str(root), debian_dir=str(debian_dir), download=False) == 'present'
    train = fm.FashionMNIST(str(root), train=True)
    test = fm.FashionMNIST(str(root), train=False)
    assert (len(train), len(test)) == (12, 4)
    img, label = train[3]
    assert img.mode == 'RGB' and img.size == (28, 28) and label == 3
    # pixels survive the round trip (grey replicated in the three channels)
    with gzip.open(debian_dir / 'train-images-idx3-ubyte.gz') as f:
        raw = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(12, 28, 28)
    assert np.array_equal(np.asarray(img)[..., 0], raw[3]) and np.array_equal(np.asarray(img)[..., 2], raw[3])


def test_missing_fashion_mnist_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match='python -m src.datasets.fashion_mnist --root'):
        fm.FashionMNIST(str(tmp_path / 'empty'))
    with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist'):
        fm.prepare(str(tmp_path / 'empty'), debian_dir=str(tmp_path / 'no-debian'), download=False)


def test_damaged_fashion_mnist_is_named_and_repaired_by_setup(tmp_path, debian_dir):
    """A truncated IDX file (a setup killed mid-copy, a full disk) is reported with its name and the command to
    run, and that command writes it again."""
    root = tmp_path / 'data'
    fm.prepare(str(root), debian_dir=str(debian_dir), download=False)
    images = os.path.join(fm.raw_folder(str(root)), 'train-images-idx3-ubyte')
    with open(images, 'r+b') as f:
        f.truncate(os.path.getsize(images) - 100)
    with pytest.raises(FileNotFoundError, match='train-images-idx3-ubyte: .*truncated.*python -m src.datasets'):
        fm.FashionMNIST(str(root))
    assert fm.prepare(str(root), debian_dir=str(debian_dir), download=False).startswith('decompressed')
    assert len(fm.FashionMNIST(str(root))) == 12


def test_setup_cli_reports_failure_with_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fm, 'DEBIAN_DIR', str(tmp_path / 'no-debian'))
    assert fm.main(['--root', str(tmp_path / 'x'), '--no-download']) == 1
    assert 'apt-get install -y dataset-fashion-mnist' in capsys.readouterr().err


def test_small_images_are_upsampled_to_the_crop():
    t = make_transforms(crop_size=32, crop_scale=(0.3, 1.0))
    torch.manual_seed(0)
    out = t(Image.new('RGB', (20, 20), (10, 200, 30)))
    assert out.shape == (3, 32, 32)


def make_tree(root, n_per_class=3, size=(20, 20)):
    for c in ('cat', 'dog'):
        os.makedirs(root / c, exist_ok=True)
        for i in range(n_per_class):
            Image.new('RGB', size, (i * 40, 100, 200)).save(root / c / f'{c}_{i}.png')


def test_image_folder_dataset_and_bad_image_is_named(tmp_path):
    make_tree(tmp_path / 'imgs')
    (tmp_path / 'imgs' / 'dog' / 'dog_broken.png').write_bytes(b'not a png')
    cfg = parse_config({'data': {'dataset': 'imagefolder', 'root_path': str(tmp_path), 'image_folder': 'imgs',
                                 'crop_size': 32}})
    ds = make_dataset(cfg.data, make_transforms(crop_size=32))
    assert len(ds) == 7 and ds.classes == ['cat', 'dog']
    broken = [i for i, (p, _) in enumerate(ds.samples) if p.endswith('dog_broken.png')][0]
    with pytest.raises(RuntimeError, match='dog_broken.png'):
        ds[broken]
    # through a worker process the error still reaches the main process, with the path, instead of hanging
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [broken]), num_workers=1, timeout=60)
    with pytest.raises(RuntimeError, match='dog_broken.png'):
        next(iter(loader))


def test_imagenet_layout_with_subset_file(tmp_path):
    make_tree(tmp_path / 'in1k' / 'train')
    subset = tmp_path / 'subset.txt'
    subset.write_text('cat_1.png\ndog_0.png\n')
    cfg = parse_config({'data': {'dataset': 'imagenet', 'root_path': str(tmp_path), 'image_folder': 'in1k',
                                 'subset_file': str(subset)}})
    ds = make_dataset(cfg.data, make_transforms(crop_size=32))
    assert len(ds) == 2
    assert [os.path.basename(p) for p, _ in ds.samples] == ['cat_1.png', 'dog_0.png']
    assert [t for _, t in ds.samples] == [0, 1]
    assert ds[1][0].shape == (3, 32, 32)


def test_limit_images_takes_the_first_images(tmp_path):
    make_tree(tmp_path / 'imgs', n_per_class=5)
    cfg = parse_config({'data': {'dataset': 'imagefolder', 'root_path': str(tmp_path), 'image_folder': 'imgs',
                                 'limit_images': 4}})
    assert len(make_dataset(cfg.data, None)) == 4


def test_loader_is_seeded_per_sample_whatever_the_workers():
    from src.datasets.loader import TrainLoader
    from src.datasets.synthetic import SyntheticImages
    ds = SyntheticImages(num_images=16, image_size=24, transform=make_transforms(crop_size=16))

    def first_epoch(workers, start_batch=0):
        loader = TrainLoader(ds, 4, torch.utils.data.default_collate, seed=3, num_workers=workers)
        return [b[0] for b in loader.epoch(1, start_batch)]

    a, b = first_epoch(0), first_epoch(2)
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b))
    # a mid-epoch restart sees the same remaining batches
    assert all(torch.equal(x, y) for x, y in zip(a[2:], first_epoch(0, start_batch=2)))
    # and the next epoch differs (new order and crops)
    loader = TrainLoader(ds, 4, torch.utils.data.default_collate, seed=3)
    assert not torch.equal(a[0], next(loader.epoch(2))[0])


def test_sampler_set_epoch_alone_changes_the_crops():
    """ijepa's loop only calls `sampler.set_epoch(epoch)` on what make_imagenet1k returns, then iterates the
    DataLoader: that must give the same batches as our loop's `epoch(e)`, new crops included."""
    from src.datasets.loader import TrainLoader
    from src.datasets.synthetic import SyntheticImages
    ds = SyntheticImages(num_images=16, image_size=24, transform=make_transforms(crop_size=16))

    def ours(epoch):
        return [b[0] for b in TrainLoader(ds, 4, torch.utils.data.default_collate, seed=3).epoch(epoch)]

    def ijepa_style(epoch):
        loader = TrainLoader(ds, 4, torch.utils.data.default_collate, seed=3)
        loader.sampler.set_epoch(epoch)
        return [b[0] for b in loader.loader]

    for epoch in (0, 1):
        assert all(torch.equal(x, y) for x, y in zip(ours(epoch), ijepa_style(epoch)))
    # and the crops do change with the epoch: image 0 seen in epochs 0 and 1 through the sampler alone
    loader = TrainLoader(ds, 4, torch.utils.data.default_collate, seed=3)
    crops = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        crops.append(loader.dataset[0][0])
    assert loader.dataset.epoch == 1 and not torch.equal(*crops)
