import os

import torchvision


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision ImageFolder whose errors name the folder or the image at fault."""

    def __init__(self, root, transform=None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f'image folder not found: {root} (set data.root_path / data.image_folder)')
        super().__init__(root=root, transform=transform)

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except Exception as e:
            raise RuntimeError(f'cannot read image {path}: {e}') from e
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target
