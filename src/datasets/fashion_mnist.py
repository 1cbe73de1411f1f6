# Fashion-MNIST, the CPU demo data set, through torchvision (SPEC section 5).
#
# torchvision reads the four IDX files, decompressed, from ROOT/FashionMNIST/raw/. Offline they come from Debian's
# package `dataset-fashion-mnist` (gzipped in /usr/share/datasets/fashion-mnist/); online torchvision downloads them.
#   python -m src.datasets.fashion_mnist --root data      # prepares ROOT either way and checks it

import argparse
import gzip
import math
import os
import shutil
import struct
import sys

import torchvision

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')


def raw_folder(root):
    return os.path.join(root, 'FashionMNIST', 'raw')


def setup_command(root):
    return (f'python -m src.datasets.fashion_mnist --root {root}   '
            f'(offline, install the files first: apt-get install -y dataset-fashion-mnist)')


def idx_problem(path):
    """What is wrong with the IDX file `path` (missing, or not as long as its header says: truncated), or None.
    IDX: two zero bytes, 0x08 (unsigned bytes), the number of dimensions, the dimensions as big-endian int32s,
    then the data."""
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:3] != b'\x00\x00\x08':
                return 'not an IDX file of bytes'
            dims = struct.unpack(f'>{magic[3]}I', f.read(4 * magic[3]))
    except FileNotFoundError:
        return 'missing'
    except (OSError, struct.error) as e:
        return f'unreadable ({e})'
    expected = 4 + 4 * len(dims) + math.prod(dims)
    return None if size == expected else f'{size} bytes where its header says {expected} (truncated?)'


def missing_files(root):
    """Why ROOT/FashionMNIST/raw/ cannot be read (each bad file and what is wrong, and the command that repairs
    it), or None."""
    raw = raw_folder(root)
    problems = [f'{f}: {p}' for f in FILES if (p := idx_problem(os.path.join(raw, f)))]
    if not problems:
        return None
    if all(p.endswith('missing') for p in problems):
        return f'Fashion-MNIST not found in {raw}; run: {setup_command(root)}'
    return f'Fashion-MNIST in {raw} is damaged ({"; ".join(problems)}); run: {setup_command(root)}'


class FashionMNIST(torchvision.datasets.FashionMNIST):
    """28x28 grey images returned as RGB PIL images, so the usual 3-channel models and transforms apply."""

    def __init__(self, root, train=True, transform=None):
        problem = missing_files(root)
        if problem:
            raise FileNotFoundError(problem)
        super().__init__(root=root, train=train, transform=None, download=False)
        self.rgb_transform = transform

    def __getitem__(self, index):
        img, target = super().__getitem__(index)
        img = img.convert('RGB')
        if self.rgb_transform is not None:
            img = self.rgb_transform(img)
        return img, target


def prepare(root, debian_dir=None, download=True):
    """Make ROOT/FashionMNIST/raw/ hold the four decompressed files: from Debian's package, else by download.
    Files that are missing or damaged (see `idx_problem`) are written again."""
    debian_dir = debian_dir or DEBIAN_DIR
    raw = raw_folder(root)
    missing = [f for f in FILES if idx_problem(os.path.join(raw, f))]
    if not missing:
        return 'present'
    if all(os.path.isfile(os.path.join(debian_dir, f + '.gz')) for f in missing):
        os.makedirs(raw, exist_ok=True)
        for f in missing:
            tmp = os.path.join(raw, f + '.tmp')
            with gzip.open(os.path.join(debian_dir, f + '.gz'), 'rb') as src, open(tmp, 'wb') as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, os.path.join(raw, f))
        return f'decompressed from {debian_dir}'
    if not download:
        raise FileNotFoundError(f'Fashion-MNIST not found in {raw} or {debian_dir}; run: {setup_command(root)}')
    for f in missing:                     # torchvision downloads only what is absent: remove the damaged files
        if os.path.exists(os.path.join(raw, f)):
            os.remove(os.path.join(raw, f))
    try:
        torchvision.datasets.FashionMNIST(root=root, train=True, download=True)
        torchvision.datasets.FashionMNIST(root=root, train=False, download=True)
    except Exception as e:
        raise RuntimeError(f'could not download Fashion-MNIST ({e}); offline, run '
                           f'`apt-get install -y dataset-fashion-mnist` and retry') from e
    return 'downloaded by torchvision'


def main(argv=None):
    parser = argparse.ArgumentParser(description='Prepare Fashion-MNIST for the demo configs.')
    parser.add_argument('--root', default='data', help='data.root_path of the demo configs (default: data)')
    parser.add_argument('--no-download', action='store_true', help='only use the Debian package files')
    args = parser.parse_args(argv)
    try:
        how = prepare(args.root, download=not args.no_download)
        train, test = FashionMNIST(args.root, train=True), FashionMNIST(args.root, train=False)
    except (FileNotFoundError, RuntimeError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'Fashion-MNIST ready in {raw_folder(args.root)} ({how}): {len(train)} train, {len(test)} test images')
    return 0


if __name__ == '__main__':
    sys.exit(main())
