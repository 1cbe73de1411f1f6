from logging import getLogger

import torch
import torchvision.transforms as transforms
from PIL import ImageFilter

logger = getLogger()


def make_transforms(
    crop_size=224,
    crop_scale=(0.3, 1.0),
    color_jitter=1.0,
    horizontal_flip=False,
    color_distortion=False,
    gaussian_blur=False,
    normalization=((0.485, 0.456, 0.406),
                   (0.229, 0.224, 0.225))
):
    """ijepa's pretraining transform: RandomResizedCrop (+ optional flip, colour distortion, blur), normalise.

    RandomResizedCrop resizes the crop it picks to `crop_size`, so images smaller than the crop (e.g. 28x28
    Fashion-MNIST with crop_size 32) are upsampled rather than rejected. All randomness uses the torch RNG,
    which the data pipeline seeds per sample for reproducible runs.
    """
    def get_color_distortion(s=1.0):
        color_jitter = transforms.ColorJitter(0.8*s, 0.8*s, 0.8*s, 0.2*s)
        return transforms.Compose([transforms.RandomApply([color_jitter], p=0.8),
                                   transforms.RandomGrayscale(p=0.2)])

    transform_list = [transforms.RandomResizedCrop(crop_size, scale=tuple(crop_scale))]
    if horizontal_flip:
        transform_list += [transforms.RandomHorizontalFlip()]
    if color_distortion:
        transform_list += [get_color_distortion(s=color_jitter)]
    if gaussian_blur:
        transform_list += [GaussianBlur(p=0.5)]
    transform_list += [transforms.ToTensor(),
                       transforms.Normalize(normalization[0], normalization[1])]
    return transforms.Compose(transform_list)


class GaussianBlur(object):
    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.):
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img):
        if torch.rand(1).item() >= self.prob:
            return img
        radius = self.radius_min + torch.rand(1).item() * (self.radius_max - self.radius_min)
        return img.filter(ImageFilter.GaussianBlur(radius=radius))
