# Evaluation datasets: a registry name -> (train split, test split) builder. Every dataset yields (image, label)
# with integer labels (0..C-1, except clevr_count whose label is the object count itself, 3..10); images go through
# the deterministic evaluation transform (resize, centre crop, normalise). torchvision's classes read their standard
# on-disk formats; nothing is downloaded here (Flowers102 without torchvision's md5 check of its .mat files).

import os

import torch
import torchvision
import torchvision.transforms as transforms
from torch.utils.data import Dataset, Subset

from src.datasets.image_folder import load_image

FASHION_MNIST_TOPS = (0, 2, 4, 6)        # T-shirt/top, Pullover, Coat, Shirt: the confusable upper-body classes


def to_rgb(img):
    return img.convert('RGB')


def eval_transform(resolution, normalization):
    """Resize the short side to `resolution`, centre-crop a square, normalise (RGB)."""
    return transforms.Compose([
        to_rgb,
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        transforms.Normalize(*normalization)])


class Relabelled(Dataset):
    """The items of `dataset` whose label is in `classes`, relabelled 0..len(classes)-1 in that order."""

    def __init__(self, dataset, labels, classes):
        self.dataset = dataset
        index = {c: i for i, c in enumerate(classes)}
        self.indices = [i for i, y in enumerate(labels) if int(y) in index]
        self.targets = [index[int(labels[i])] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img, _ = self.dataset[self.indices[i]]
        return img, self.targets[i]


class CUB200(Dataset):
    """CUB-200-2011 in its standard folder: images.txt, image_class_labels.txt (1-based classes),
    train_test_split.txt (1 = train) and images/."""

    def __init__(self, root, train=True, transform=None):
        def table(name):
            path = os.path.join(root, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f'CUB-200-2011: {path} not found (expected the CUB_200_2011 folder with '
                                        'images.txt, image_class_labels.txt, train_test_split.txt, images/)')
            with open(path) as f:
                return dict(line.split() for line in f if line.strip())
        images, labels, split = table('images.txt'), table('image_class_labels.txt'), table('train_test_split.txt')
        keep = [i for i in images if (split[i] == '1') == train]
        self.samples = [(os.path.join(root, 'images', images[i]), int(labels[i]) - 1) for i in keep]
        self.targets = [y for _, y in self.samples]
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = load_image(path)
        return (self.transform(img) if self.transform else img), label


class Flowers102(torchvision.datasets.Flowers102):
    """torchvision's Flowers102 reader (ROOT/flowers-102/: jpg/, imagelabels.mat, setid.mat), checking that the
    files exist instead of their md5 sums, so that a re-packed copy of the data set also loads."""

    def _check_integrity(self):
        return self._images_folder.is_dir() and all(
            (self._base_folder / self._file_dict[key][0]).is_file() for key in ('label', 'setid'))


def _fashion_mnist(data, train, transform):
    from src.datasets.fashion_mnist import FashionMNIST
    dataset = FashionMNIST(data.root_path or 'data', train=train, transform=transform)
    if data.subset == 'tops':
        return Relabelled(dataset, dataset.targets, FASHION_MNIST_TOPS)
    if data.subset is not None:
        raise ValueError(f"data.subset={data.subset!r}: fashion_mnist knows only 'tops'")
    return dataset


class SplitFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder split whose labels follow the train split's class folders, so that a val split missing a
    class keeps the train split's numbering (an extra class in val is an error)."""

    def __init__(self, root, train_root, transform=None):
        self.train_root = train_root
        super().__init__(root, transform=transform, loader=load_image)

    def find_classes(self, directory):
        classes, class_to_idx = super().find_classes(self.train_root)
        extra = sorted(set(super().find_classes(directory)[0]) - set(classes))
        if extra:
            raise ValueError(f'{directory} has classes that {self.train_root} lacks: {extra[:5]}')
        return classes, {c: i for c, i in class_to_idx.items() if os.path.isdir(os.path.join(directory, c))}


def _folder_splits(data, train, what):
    roots = [os.path.join(data.root_path, split) for split in ('train', 'val')]
    for root in roots:
        if not os.path.isdir(root):
            raise FileNotFoundError(f'{root} not found: {what} needs ROOT/train/ and ROOT/val/ with one folder per '
                                    'class')
    return roots[0] if train else roots[1], roots[0]


def _image_folder(data, train, transform, what='an ImageFolder evaluation set'):
    root, train_root = _folder_splits(data, train, what)
    return SplitFolder(root, train_root, transform=transform)


def _imagenet(data, train, transform):
    return _image_folder(data, train, transform, what='ImageNet')


def _torchvision(name, train_split, test_split, cls=None, **kwargs):
    def build(data, train, transform):
        reader = cls or getattr(torchvision.datasets, name)
        split = train_split if train else test_split
        key = 'version' if name == 'INaturalist' else 'split'
        try:
            return reader(data.root_path, **{key: split}, transform=transform, download=False, **kwargs)
        except RuntimeError:            # torchvision: "Dataset not found or corrupted. You can use download=True"
            raise FileNotFoundError(f'{name} ({split}) not found or incomplete under {data.root_path} (torchvision\'s '
                                    'on-disk layout of the data set; nothing is downloaded)') from None
    return build


DATASETS = {
    'fashion_mnist': _fashion_mnist,
    'imagefolder': _image_folder,
    'imagenet': _imagenet,
    'cub200': lambda data, train, transform: CUB200(data.root_path, train=train, transform=transform),
    'stanford_cars': _torchvision('StanfordCars', 'train', 'test'),
    'inaturalist2021': _torchvision('INaturalist', '2021_train', '2021_valid', target_type='full'),
    'flowers102': _torchvision('Flowers102', 'train', 'test', cls=Flowers102),
    'fgvc_aircraft': _torchvision('FGVCAircraft', 'trainval', 'test'),
    'oxford_pets': _torchvision('OxfordIIITPet', 'trainval', 'test', target_types='category'),
    'clevr_count': _torchvision('CLEVRClassification', 'train', 'val'),
}


def make_eval_datasets(data, resolution, normalization):
    """(train, test) datasets of the `data` config section, with the evaluation transform."""
    transform = eval_transform(resolution, normalization)
    if data.dataset not in DATASETS:
        raise ValueError(f'unknown data.dataset {data.dataset!r}; choose one of {list(DATASETS)}')
    splits = []
    for train, limit in ((True, data.limit_train), (False, data.limit_test)):
        dataset = DATASETS[data.dataset](data, train, transform)
        if limit is not None and limit < len(dataset):      # evenly spaced items: every class of a sorted folder
            dataset = Subset(dataset, [i * len(dataset) // limit for i in range(limit)])
        splits.append(dataset)
    return tuple(splits)


def num_classes(labels):
    return int(torch.as_tensor(labels).max()) + 1
