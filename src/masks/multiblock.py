# I-JEPA multiblock masks (context and target blocks), reproducing facebookresearch/ijepa's MaskCollator.
#
# Given the same global torch RNG state and counter value, `MaskCollator` returns exactly ijepa's masks.
# Two of ijepa's defects are handled here:
#   * ijepa loops forever when a block can never keep more than `min_keep` patches; we reject such settings at
#     construction, and bound the retries at run time, with an error that names the config keys to change;
#   * ijepa draws block corners with an exclusive upper bound, so blocks never touch the last row/column; we keep
#     that by default (for reproduction) and `blocks_reach_edge=True` fixes it.
#
# Grid: H x W patches (H = input_h // patch_size). Masks are LongTensors of patch indices in raster order.

import math
from logging import getLogger

import torch

from src.masks.utils import BatchCounter, seed_from

logger = getLogger()

_TRIES_PER_CONSTRAINT = 20   # ijepa's timeout: failed tries before one constraint is dropped


class MaskSettingsError(ValueError):
    pass


def _block_sizes(height, width, scale, aspect_ratio, rand):
    """ijepa's block size for the uniform draw `rand` in [0, 1): scale and aspect move together."""
    min_s, max_s = scale
    max_keep = int(height * width * (min_s + rand * (max_s - min_s)))
    min_ar, max_ar = aspect_ratio
    aspect = min_ar + rand * (max_ar - min_ar)
    h = int(round(math.sqrt(max_keep * aspect)))
    w = int(round(math.sqrt(max_keep / aspect)))
    while h >= height:
        h -= 1
    while w >= width:
        w -= 1
    return h, w


_RAND_BITS = 24   # torch.rand's float32 draws are k * 2**-24, k = 0 .. 2**24 - 1


def _block_areas(height, width, scale, aspect_ratio, rand):
    """`_block_sizes`' h * w for an array of draws `rand` (numpy float64, the same arithmetic as Python floats)."""
    import numpy as np
    (min_s, max_s), (min_ar, max_ar) = scale, aspect_ratio
    keep = np.floor(height * width * (min_s + rand * (max_s - min_s)))
    aspect = min_ar + rand * (max_ar - min_ar)
    h = np.minimum(np.rint(np.sqrt(keep * aspect)), height - 1)       # rint: round half to even, as round()
    w = np.minimum(np.rint(np.sqrt(keep / aspect)), width - 1)
    return h * w


def smallest_block(height, width, scale, aspect_ratio):
    """The fewest patches of a block of this scale/aspect range, exactly: the minimum of `_block_sizes` over every
    value torch.rand can draw. The block size is a step function of the draw r. It changes only where the kept
    count int(H * W * scale(r)) crosses an integer m, and, while it is m, where sqrt(m * aspect(r)) or
    sqrt(m / aspect(r)) crosses k + 1/2. Every step holds a draw next to one of those points (or r = 0), so the
    draws a few either side of each point, enough to absorb the rounding of scale(r) and aspect(r), cover them
    all. Ranges so narrow that the rounding spans many draws, or grids with very many points, take all 2^24."""
    import numpy as np
    (min_s, max_s), (min_ar, max_ar) = scale, aspect_ratio
    top = 2 ** _RAND_BITS
    # how far rounding can move a point, in draws: a few ulps of scale(r) or aspect(r) over the range's width
    spread = 2 + int(top * 16 * np.finfo(np.float64).eps *
                     max([hi / (hi - lo) for lo, hi in (scale, aspect_ratio) if hi > lo], default=0))
    area = height * width
    m = np.arange(max(1, int(area * min_s)), int(area * max_s) + 1, dtype=np.float64)    # kept counts (0: none)
    points = [np.zeros(1)]
    if max_s > min_s:                        # the draws where int(area * scale(r)) becomes m, m + 1
        lo = np.clip((m / area - min_s) / (max_s - min_s), 0, 1)
        hi = np.clip(((m + 1) / area - min_s) / (max_s - min_s), 0, 1)
        points.append(lo)
    else:
        lo, hi = np.zeros_like(m), np.ones_like(m)
    if max_ar > min_ar and len(m):           # within each m's draws: aspect(r) = (k + 1/2)^2 / m or m / (k + 1/2)^2
        a_lo, a_hi = min_ar + lo * (max_ar - min_ar), min_ar + hi * (max_ar - min_ar)
        for first, last, to_aspect in ((np.sqrt(m * a_lo), np.sqrt(m * a_hi), lambda x: x ** 2 / m[:, None]),
                                        (np.sqrt(m / a_hi), np.sqrt(m / a_lo), lambda x: m[:, None] / x ** 2)):
            k = np.floor(first - .5) - 1                                # one spare k either side
            count = (np.floor(last - .5) + 2 - k).astype(np.int64)
            if len(m) * count.max() * (2 * spread + 1) > top // 4:
                return _smallest_over_all_draws(height, width, scale, aspect_ratio)
            half = k[:, None] + np.arange(count.max()) + .5
            a = to_aspect(half)[(np.arange(count.max()) < count[:, None]) & (half > 0)]
            points.append((a[(a >= min_ar) & (a <= max_ar)] - min_ar) / (max_ar - min_ar))
    points = np.concatenate(points)
    if len(points) * (2 * spread + 1) > top // 4:
        return _smallest_over_all_draws(height, width, scale, aspect_ratio)
    k = np.unique(np.clip(np.floor(points * top)[:, None] + np.arange(-spread, spread + 1), 0, top - 1))
    return int(_block_areas(height, width, scale, aspect_ratio, k / top).min())


def _smallest_over_all_draws(height, width, scale, aspect_ratio, chunk=2 ** 21):
    """smallest_block by brute force, in chunks (0.2-0.4 s)."""
    import numpy as np
    top = 2 ** _RAND_BITS
    return int(min(_block_areas(height, width, scale, aspect_ratio, np.arange(i, i + chunk) / top).min()
                   for i in range(0, top, chunk)))


def check_block_settings(grid_size, patch_size, aspect_ratio, **scales):
    """Raise MaskSettingsError unless blocks can be drawn on this grid: at least 2x2 patches, each scale range
    (keyword = its key under mask:) within (0, 1] and the aspect range positive. Returns the grid's description."""
    where = f'(grid {grid_size[0]}x{grid_size[1]} = data.crop_size // mask.patch_size with patch_size={patch_size})'
    if min(grid_size) < 2:
        raise MaskSettingsError(f'the patch grid is too small for block masks {where}: '
                                'increase data.crop_size or decrease mask.patch_size')
    for key, scale in scales.items():
        if len(scale) != 2 or not 0. < scale[0] <= scale[1] <= 1.:
            raise MaskSettingsError(f'mask.{key} must be [min, max] with 0 < min <= max <= 1, got {list(scale)}')
    if len(aspect_ratio) != 2 or not 0. < aspect_ratio[0] <= aspect_ratio[1]:
        raise MaskSettingsError(f'mask.aspect_ratio must be [min, max] with 0 < min <= max, got {list(aspect_ratio)}')
    return where


class MaskCollator(BatchCounter):
    """Collate a batch and sample I-JEPA's context (`enc`) and target (`pred`) blocks for it.

    Returns `(collated_batch, masks_enc, masks_pred)`: `masks_enc` is a list of `nenc` LongTensors [B, K_enc],
    `masks_pred` a list of `npred` LongTensors [B, K_pred], holding the kept patch indices (context: visible to
    the context encoder; target: to be predicted). Every mask of a batch is cut to the batch's shortest.

    Keyword arguments beyond ijepa's:
      seed:  None (ijepa) places blocks with the process-global torch RNG; an int places them with a generator
             seeded from (seed, rank, step), and numbers batches deterministically across workers
             (see `BatchCounter`), which makes a run reproducible and resumable whatever num_workers is.
      rank:  this process's rank (only used with `seed`).
      blocks_reach_edge: draw block corners from [0, H - h] inclusive (ijepa: [0, H - h), never the last row).
    """

    def __init__(
        self,
        input_size=(224, 224),
        patch_size=16,
        enc_mask_scale=(0.2, 0.8),
        pred_mask_scale=(0.2, 0.8),
        aspect_ratio=(0.3, 3.0),
        nenc=1,
        npred=2,
        min_keep=4,
        allow_overlap=False,
        seed=None,
        rank=0,
        blocks_reach_edge=False,
    ):
        super().__init__(deterministic=seed is not None)
        if not isinstance(input_size, (tuple, list)):
            input_size = (input_size, ) * 2
        self.patch_size = patch_size
        self.height, self.width = input_size[0] // patch_size, input_size[1] // patch_size
        self.enc_mask_scale = tuple(enc_mask_scale)
        self.pred_mask_scale = tuple(pred_mask_scale)
        self.aspect_ratio = tuple(aspect_ratio)
        self.nenc = nenc
        self.npred = npred
        self.min_keep = min_keep  # a mask must keep more than this many patches
        self.allow_overlap = allow_overlap  # whether context blocks may overlap target blocks
        self.seed = seed
        self.rank = rank
        self.blocks_reach_edge = blocks_reach_edge
        self._check_settings()

    def _check_settings(self):
        """Reject settings for which ijepa's sampler would loop forever (SPEC section 3)."""
        where = check_block_settings((self.height, self.width), self.patch_size, self.aspect_ratio,
                                     pred_mask_scale=self.pred_mask_scale, enc_mask_scale=self.enc_mask_scale)
        if self.nenc < 1 or self.npred < 1:
            raise MaskSettingsError('mask.num_enc_masks and mask.num_pred_masks must be at least 1')
        if self.min_keep < 0:
            raise MaskSettingsError(f'mask.min_keep must be >= 0, got {self.min_keep}')
        for key, scale, aspect in (('mask.pred_mask_scale', self.pred_mask_scale, self.aspect_ratio),
                                   ('mask.enc_mask_scale', self.enc_mask_scale, (1., 1.))):
            fewest = smallest_block(self.height, self.width, scale, aspect)
            if fewest <= self.min_keep:
                raise MaskSettingsError(
                    f'a block drawn from {key}={list(scale)} can have as few as {fewest} patches {where}, '
                    f'which never satisfies mask.min_keep={self.min_keep} (a mask must keep more than min_keep '
                    f'patches): lower mask.min_keep, raise {key}, or use a larger grid (data.crop_size)')

    def _sample_block_size(self, generator, scale, aspect_ratio_scale):
        rand = torch.rand(1, generator=generator).item()
        return _block_sizes(self.height, self.width, scale, aspect_ratio_scale, rand)

    def _sample_block_mask(self, b_size, acceptable_regions=None, generator=None):
        """One block of size `b_size`, restricted to `acceptable_regions`.

        After every 20 misses in a row one constraint is dropped: only the first len - tries regions are applied,
        so the newest is dropped first (ijepa's code; its comments and SPEC section 3 say "oldest").

        Returns (ids [K] of the kept patches in raster order, complement [H, W] int32 of the block: 1 outside).
        """
        h, w = b_size
        edge = 1 if self.blocks_reach_edge else 0
        regions = acceptable_regions or []
        tries = 0            # number of constraints dropped so far
        timeout = _TRIES_PER_CONSTRAINT
        while True:
            top = torch.randint(0, self.height - h + edge, (1,), generator=generator)
            left = torch.randint(0, self.width - w + edge, (1,), generator=generator)
            mask = torch.zeros((self.height, self.width), dtype=torch.int32)
            mask[top:top+h, left:left+w] = 1
            for region in regions[:max(len(regions) - tries, 0)]:
                mask *= region
            ids = torch.nonzero(mask.flatten()).squeeze(1)
            if len(ids) > self.min_keep:
                break
            timeout -= 1
            if timeout == 0:
                tries += 1
                timeout = _TRIES_PER_CONSTRAINT
                if tries > len(regions):   # unconstrained and still too small: cannot happen after _check_settings
                    raise MaskSettingsError(
                        f'no {h}x{w} block keeps more than mask.min_keep={self.min_keep} patches; '
                        'lower mask.min_keep or raise mask.pred_mask_scale / mask.enc_mask_scale')
                logger.warning(f'Mask generator says: "Valid mask not found, decreasing acceptable-regions [{tries}]"')
        complement = torch.ones((self.height, self.width), dtype=torch.int32)
        complement[top:top+h, left:left+w] = 0
        return ids, complement

    def __call__(self, batch):
        """1. block sizes for the batch from the counter-seeded generator; 2. per image, target then context
        blocks placed with the global RNG (or the (seed, rank, step) generator); 3. cut to the shortest mask."""
        B = len(batch)
        collated_batch = torch.utils.data.default_collate(batch)

        step = self.next_batch_step()
        g = torch.Generator()
        g.manual_seed(step)
        p_size = self._sample_block_size(g, self.pred_mask_scale, self.aspect_ratio)
        e_size = self._sample_block_size(g, self.enc_mask_scale, (1., 1.))
        placement = None
        if self.seed is not None:
            placement = torch.Generator()
            placement.manual_seed(seed_from(self.seed, self.rank, step))

        masks_pred, masks_enc = [], []       # [B][npred] and [B][nenc] id tensors
        for _ in range(B):
            pred, complements = [], []
            for _ in range(self.npred):
                ids, complement = self._sample_block_mask(p_size, generator=placement)
                pred.append(ids)
                complements.append(complement)
            masks_pred.append(pred)
            acceptable_regions = None if self.allow_overlap else complements
            masks_enc.append([self._sample_block_mask(e_size, acceptable_regions, generator=placement)[0]
                              for _ in range(self.nenc)])

        return collated_batch, _collate_ids(masks_enc), _collate_ids(masks_pred)


def _collate_ids(per_image):
    """[B][M] id tensors of varying length -> list of M LongTensors [B, K], K the shortest in the batch."""
    keep = min(len(ids) for image in per_image for ids in image)
    return [torch.stack([image[j][:keep] for image in per_image]) for j in range(len(per_image[0]))]
