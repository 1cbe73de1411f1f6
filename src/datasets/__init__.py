import os

from torch.utils.data import Subset


def missing_data(data, training=True):
    """Why the pretraining data named by the `data` config section is not there, checked cheaply (no listing of
    the images), as a message naming the keys and what to do; None if nothing is missing."""
    from src.datasets.image_folder import missing_folder
    if data.dataset == 'fashion_mnist':
        from src.datasets.fashion_mnist import missing_files
        return missing_files(data.root_path or 'data')
    if data.dataset == 'imagenet':
        from src.datasets.imagenet1k import split_folder
        path = split_folder(data.root_path or '', data.image_folder or '', training)
    elif data.dataset == 'imagefolder':
        path = os.path.join(data.root_path or '', data.image_folder or '')
    else:
        return None
    problem = missing_folder(path)
    if problem:
        return problem
    if data.dataset == 'imagenet' and data.subset_file is not None and not os.path.isfile(data.subset_file):
        return f'subset file not found: {data.subset_file} (data.subset_file)'
    return None


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
