# The I-JEPA objective (Assran et al., CVPR 2023): predict the target encoder's features of the target blocks
# from the context block.
#
# Dimensions: B batch, N patches, D width, K_ctx / K_tgt kept context / target tokens,
#             nenc / npred context / target blocks per image.

import torch
import torch.nn.functional as F

from src.masks.multiblock import MaskCollator
from src.masks.utils import apply_masks
from src.utils.tensors import repeat_interleave_batch


def make_multiblock_collator(cfg, rank=0):
    m = cfg.mask
    return MaskCollator(
        input_size=cfg.data.crop_size, patch_size=m.patch_size, enc_mask_scale=m.enc_mask_scale,
        pred_mask_scale=m.pred_mask_scale, aspect_ratio=m.aspect_ratio, nenc=m.num_enc_masks,
        npred=m.num_pred_masks, min_keep=m.min_keep, allow_overlap=m.allow_overlap,
        seed=cfg.meta.seed, rank=rank, blocks_reach_edge=m.blocks_reach_edge)


class IJEPA:
    """Loss of one batch. Only uses ijepa's module API (encoder(x, masks), predictor(z, masks_x, masks)),
    so ijepa's own modules can be driven by the same loop (bench/step.py does)."""

    name = 'ijepa'
    csv_columns = ()          # extra per-step statistics logged after ijepa's columns

    def __init__(self, cfg, encoder, predictor, target_encoder):
        self.encoder = encoder
        self.predictor = predictor
        self.target_encoder = target_encoder
        self.smooth_l1_beta = 1.0

    @staticmethod
    def make_collator(cfg, rank=0):
        return make_multiblock_collator(cfg, rank)

    def forward_target(self, imgs, masks_pred, nenc):
        """LayerNorm'd (no affine) full-image target features at the target blocks: [npred*nenc*B, K_tgt, D]."""
        h = self.target_encoder(imgs)                                 # (B, N, D)
        h = F.layer_norm(h, (h.size(-1),))
        h = apply_masks(h, masks_pred)                                # (npred*B, K_tgt, D)
        return repeat_interleave_batch(h, len(imgs), repeat=nenc)     # (npred*nenc*B, K_tgt, D)

    def forward_context(self, imgs, masks_enc, masks_pred):
        z = self.encoder(imgs, masks_enc)                             # (nenc*B, K_ctx, D)
        return self.predictor(z, masks_enc, masks_pred)               # (npred*nenc*B, K_tgt, D)

    def __call__(self, batch, step):
        """batch = ((imgs, labels), masks_enc, masks_pred) on the device. Returns (loss, stats)."""
        (imgs, _), masks_enc, masks_pred = batch
        with torch.no_grad():
            h = self.forward_target(imgs, masks_pred, nenc=len(masks_enc))
        z = self.forward_context(imgs, masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, h, beta=self.smooth_l1_beta)
        stats = {'mask-A': masks_enc[0].shape[1], 'mask-B': masks_pred[0].shape[1]}
        return loss, stats

