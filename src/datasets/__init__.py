import os

from torch.utils.data import Subset


def make_dataset(data, transform, training=True):
    """The pretraining dataset named by the `data` config section (see src/config.py DataConfig)."""
    if data.dataset == 'imagenet':
        from src.datasets.imagenet1k import ImageNet, ImageNetSubset
        dataset = ImageNet(root=data.root_path, image_folder=data.image_folder, transform=transform,
                           train=training)
        if data.subset_file is not None:
            dataset = ImageNetSubset(dataset, data.subset_file)
    elif data.dataset == 'imagefolder':
        from src.datasets.image_folder import ImageFolder
        dataset = ImageFolder(os.path.join(data.root_path, data.image_folder or ''), transform=transform)
    elif data.dataset == 'fashion_mnist':
        from src.datasets.fashion_mnist import FashionMNIST
        dataset = FashionMNIST(data.root_path or 'data', train=training, transform=transform)
    elif data.dataset == 'synthetic':
        from src.datasets.synthetic import SyntheticImages
        return SyntheticImages(num_images=data.limit_images or 256, image_size=data.crop_size, transform=transform)
    else:
        raise ValueError(f'unknown data.dataset {data.dataset!r}')
    if data.limit_images is not None and data.limit_images < len(dataset):
        dataset = Subset(dataset, range(data.limit_images))
    return dataset
