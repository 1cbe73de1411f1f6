# ImageNet as in ijepa: `root_path/image_folder/{train,val}/` in ImageFolder layout, with an optional subset file.

import os
from logging import getLogger

from src.datasets.image_folder import ImageFolder

logger = getLogger()


def split_folder(root, image_folder, train=True):
    """ijepa's ImageNet layout: root/image_folder/train/ (or val/)."""
    return os.path.join(root, image_folder, 'train/' if train else 'val/')


class ImageNet(ImageFolder):

    def __init__(self, root, image_folder='imagenet_full_size/061417/', transform=None, train=True,
                 copy_data=False, **kwargs):
        if copy_data:
            raise ValueError('meta.copy_data is not supported: extract ImageNet locally and set data.root_path')
        data_path = split_folder(root, image_folder, train)
        logger.info(f'data-path {data_path}')
        super().__init__(root=data_path, transform=transform)


class ImageNetSubset(object):
    """Restrict an ImageNet dataset to the images named in `subset_file` (one file name per line,
    e.g. `n01440764_10026.JPEG`; the class is the part before the first underscore), as in ijepa."""

    def __init__(self, dataset, subset_file):
        self.dataset = dataset
        self.subset_file = subset_file
        if not os.path.isfile(subset_file):
            raise FileNotFoundError(f'subset file not found: {subset_file} (data.subset_file)')
        root, class_to_idx = dataset.root, dataset.class_to_idx
        self.samples = []
        with open(subset_file, 'r') as rfile:
            for line in rfile:
                img = line.strip()
                if not img:
                    continue
                class_name = img.split('_')[0]
                if class_name not in class_to_idx:
                    raise ValueError(f'{subset_file}: class {class_name!r} of {img!r} is not a folder of {root}')
                self.samples.append((os.path.join(root, class_name, img), class_to_idx[class_name]))

    @property
    def classes(self):
        return self.dataset.classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = self.dataset.loader(path)                                     # load_image: errors name the file
        if self.dataset.transform is not None:
            img = self.dataset.transform(img)
        if self.dataset.target_transform is not None:
            target = self.dataset.target_transform(target)
        return img, target


def make_imagenet1k(
    transform,
    batch_size,
    collator=None,
    pin_mem=True,
    num_workers=8,
    world_size=1,
    rank=0,
    root_path=None,
    image_folder=None,
    training=True,
    copy_data=False,
    drop_last=True,
    subset_file=None,
    seed=0,
):
    """ijepa's entry point: returns (dataset, data_loader, dist_sampler)."""
    from src.datasets.loader import TrainLoader
    dataset = ImageNet(root=root_path, image_folder=image_folder, transform=transform, train=training,
                       copy_data=copy_data)
    if subset_file is not None:
        dataset = ImageNetSubset(dataset, subset_file)
    loader = TrainLoader(dataset, batch_size, collator, world_size=world_size, rank=rank, seed=seed,
                         num_workers=num_workers, pin_mem=pin_mem, drop_last=drop_last)
    return dataset, loader.loader, loader.sampler
