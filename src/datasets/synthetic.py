import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_pil_image


class SyntheticImages(Dataset):
    """Deterministic random RGB images (for smoke tests and benchmarks that should not read a disk).

    Image i is smooth noise drawn from a generator seeded by i, so every run and worker sees the same pixels.
    """

    def __init__(self, num_images=256, image_size=32, transform=None, num_classes=10):
        self.num_images = num_images
        self.image_size = image_size
        self.transform = transform
        self.num_classes = num_classes

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        low = torch.rand(3, 4, 4, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=self.image_size, mode='bilinear',
                                              align_corners=False)[0]
        img = (img + 0.1 * torch.rand(img.shape, generator=g)).clamp(0, 1)
        img = to_pil_image(img)
        if self.transform is not None:
            img = self.transform(img)
        return img, index % self.num_classes
