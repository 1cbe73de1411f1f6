import os

import torchvision


def load_image(path):
    """The image at `path` as an RGB PIL image (torchvision's default loader); an unreadable file raises an error
    that names it (PIL's own errors often do not, e.g. "image file is truncated")."""
    try:
        return torchvision.datasets.folder.default_loader(path)
    except Exception as e:
        raise RuntimeError(f'cannot read image {path}: {e}') from e


def missing_folder(root):
    """The error for an image folder `root` that does not exist (naming the keys to set), or None."""
    return None if os.path.isdir(root) else f'image folder not found: {root} (set data.root_path / data.image_folder)'


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision ImageFolder whose errors name the folder or the image at fault."""

    def __init__(self, root, transform=None):
        problem = missing_folder(root)
        if problem:
            raise FileNotFoundError(problem)
        super().__init__(root=root, transform=transform, loader=load_image)
