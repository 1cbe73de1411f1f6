# The DSeq-JEPA objective (He et al., arXiv 2511.17354): predict the target encoder's features of saliency-ordered
# regions one after the other, each from the regions before it.
#
# Per batch (paper Alg. 1):
#   encode_target   full-image target-encoder pass; its block-l output also gives the saliency (no extra pass)
#   make_regions    select_regions -> order -> curriculum (random boxes) -> disjoint regions + background
#   plan_steps      context / target of every step (src/models/predictor.py)
#   predict         token-dropping context passes and the predictor
#   loss            smooth-L1 against the LayerNorm'd target features of each target region
#
# Dimensions: B images, R regions, S = R - 1 steps, N patches, M kept (image, step) pairs, T target tokens, D width.

import math

import torch
import torch.nn.functional as F

from src.helper import unwrap
from src.utils.logging import Elapsed
from src.masks.saliency import DSeqCollator, cls_similarity_saliency, normalise_saliency, select_regions
from src.models.predictor import gather_tokens, plan_steps, predict_chained, predict_pairs
from src.utils.tensors import true_first


def default_saliency_block(depth):
    """Block whose output scores the patches: 10 of 12 for ViT-B (paper), the same fraction of other depths."""
    return max(1, round(depth * 10 / 12))


def make_dseq_collator(cfg, rank=0):
    d = cfg.dseq
    return DSeqCollator(
        input_size=cfg.data.crop_size, patch_size=cfg.mask.patch_size, num_regions=d.num_regions,
        box_scale=cfg.mask.pred_mask_scale, box_aspect_ratio=cfg.mask.aspect_ratio, lambda_start=d.lambda_start,
        lambda_end=d.lambda_end, curriculum=d.curriculum, regions=d.regions,
        num_candidates=d.num_candidates if d.regions == 'blocks' else 0, seed=cfg.meta.seed, rank=rank)


def order_slots(salient, order, noise):
    """Reorder the salient slots [B, K, N] (ranked by mean saliency) per `order`; empty slots go last."""
    B, K, N = salient.shape
    rank = torch.arange(K, device=salient.device, dtype=torch.float32).expand(B, K)
    if order == 'descending':
        key = rank
    elif order == 'ascending':
        key = -rank
    elif order == 'random':
        key = noise.float()
    elif order == 'spatial':     # raster order of each region's first patch
        key = torch.where(salient.any(dim=2), salient.float().argmax(dim=2).float(), float(N))
    else:
        raise ValueError(f'unknown order {order!r}')
    key = torch.where(salient.any(dim=2), key, torch.full_like(key, float('inf')))
    perm = torch.sort(key, dim=1, stable=True).indices                     # (B, K)
    return salient.gather(1, perm.unsqueeze(-1).expand(-1, -1, N))


def truncate_sequence(regions, k):
    """Top-k truncation (order ablation "truncating top-3"): each image's first k non-empty regions, in sequence
    order, [B, k, N]. Empty slots are not counted, so an image with fewer than k non-empty regions keeps them all,
    the background included; cutting slots instead would leave an image whose later salient slots are empty (one
    salient component: [R_1, empty, empty]) with no prediction step, late in the curriculum possibly most
    images."""
    ids = true_first(regions.any(dim=2), k)                                # (B, k) slots, non-empty first
    return regions.gather(1, ids.unsqueeze(-1).expand(-1, -1, regions.shape[2]))


def apply_curriculum(salient, boxes, keep, fill_first=True):
    """Paper Alg. 1: slot k keeps its salient region with probability lambda (`keep`), else takes a random box.
    With `fill_first`, an image left without a first region (no salient component) takes its first box there, so
    that it still has a context and trains (the official code gives such images no gradient). Each region then
    loses what earlier regions took, and the background (last region) is what is left: [B, K + 1, N], disjoint,
    covering the image. Empty regions stay empty (their steps are skipped)."""
    use_box = ~keep
    if fill_first:
        use_box = use_box.clone()
        use_box[:, 0] |= ~salient[:, 0].any(dim=1)
    chosen = torch.where(use_box.unsqueeze(-1), boxes, salient)            # (B, K, N)
    taken = torch.zeros_like(chosen[:, 0])
    regions = []
    for k in range(chosen.shape[1]):
        region = chosen[:, k] & ~taken
        regions.append(region)
        taken = taken | region
    regions.append(~taken)
    return torch.stack(regions, dim=1), use_box


def gradcam_saliency(encoder, imgs, block):
    """Grad-CAM on a self-supervised ViT (our definition; the paper's Table 6 "Grad-CAM" gives no formula).

    A = the block-l patch features; y = sum over patches of the final layer's [CLS] similarity (Eq. 1 applied
    to the normalised output); weights alpha_d = mean over patches of dy/dA[:, d]; saliency = ReLU(A . alpha).
    Costs one extra backward through blocks l+1..L of the (frozen) encoder. Returns (final patch features,
    saliency [B, N]).
    """
    P = encoder.num_prefix_tokens
    with torch.no_grad():
        x = encoder.prepare_tokens(imgs)
        for blk in encoder.blocks[:block]:
            x = blk(x)
    with torch.enable_grad():
        a = x.detach().requires_grad_(True)                                 # (B, P + N, D)
        x = a
        for blk in encoder.blocks[block:]:
            x = blk(x)
        out = encoder.norm(x)[:, P:]                                        # (B, N, D)
        y = cls_similarity_saliency(out, encoder.cls_token).sum()
        grad, = torch.autograd.grad(y, a)
    alpha = grad[:, P:].mean(dim=1, keepdim=True)                           # (B, 1, D)
    saliency = torch.relu((a.detach()[:, P:] * alpha).sum(dim=-1))          # (B, N)
    return out.detach(), saliency


def select_blocks(saliency, candidates, k, iou_threshold=0.5):
    """The 'blocks' region generator: score each candidate block [B, M, N] by its mean normalised saliency and
    keep k of them by greedy non-maximum suppression at `iou_threshold`, best first: [B, k, N] (a row stays
    empty when fewer than k blocks survive)."""
    s = normalise_saliency(saliency)                                       # (B, N)
    boxes = candidates.float()                                              # (B, M, N)
    area = boxes.sum(dim=2)                                                 # (B, M)
    score = (boxes @ s.unsqueeze(-1)).squeeze(-1) / area.clamp_min(1)       # (B, M)
    inter = boxes @ boxes.transpose(1, 2)                                   # (B, M, M)
    iou = inter / (area.unsqueeze(2) + area.unsqueeze(1) - inter).clamp_min(1)
    alive = area > 0
    picks = []
    for _ in range(k):                                                      # k is small: loop over picks only
        masked = torch.where(alive, score, torch.full_like(score, -math.inf))
        best = masked.argmax(dim=1)                                         # (B,)
        ok = alive.gather(1, best.unsqueeze(1))                             # (B, 1)
        picks.append(candidates.gather(1, best.view(-1, 1, 1).expand(-1, 1, candidates.shape[2])) & ok.unsqueeze(-1))
        alive = alive & (iou.gather(1, best.view(-1, 1, 1).expand(-1, 1, iou.shape[2])).squeeze(1) <= iou_threshold)
        alive = alive.scatter(1, best.unsqueeze(1), False)
    return torch.cat(picks, dim=1)                                          # (B, k, N)


def saliency_from(encoder, imgs, cfg, block):
    """Run `encoder` on the full images once: (final patch features [B, N, D], saliency [B, N] or None).
    cfg: the dseq config section (saliency, saliency_layers, regions); block: the saliency block l."""
    if cfg.regions == 'random_blocks':           # no saliency needed (the encoder may have no [CLS] token)
        return encoder(imgs), None
    if cfg.saliency == 'gradcam':
        return gradcam_saliency(encoder, imgs, block)
    blocks = tuple(range(1, encoder.depth + 1)) if cfg.saliency_layers == 'all' else (encoder.depth,)
    if cfg.saliency == 'cls_similarity':       # paper Eq. 1
        out = encoder.forward_features(imgs, return_blocks=(block,))
        return out['x'], cls_similarity_saliency(encoder.norm(out['blocks'][block]), encoder.cls_token)
    if cfg.saliency == 'cls_attention':        # [CLS]-to-patch attention, mean over heads and blocks
        out = encoder.forward_features(imgs, return_cls_attn=blocks)
        return out['x'], torch.stack([out['cls_attn'][b] for b in blocks]).mean(dim=(0, 2))
    out = encoder.forward_features(imgs, return_attn_received=blocks)   # column_mean: attention received
    return out['x'], torch.stack([out['attn_received'][b] for b in blocks]).mean(dim=0)


def make_regions(cfg, saliency, draws, grid_size):
    """Ordered disjoint regions [B, R, N], the slots that took a random box [B, R-1] and the salient slots
    before the curriculum [B, R-1, N]. cfg: the dseq config section; draws: DSeqCollator's."""
    if cfg.regions == 'components':
        salient = select_regions(saliency, grid_size, cfg.num_regions, cfg.min_region_area)[:, :-1]
        salient = order_slots(salient, cfg.order, draws['order_noise'])
    elif cfg.regions == 'blocks':
        salient = select_blocks(saliency, draws['candidates'], cfg.num_regions - 1, cfg.nms_iou)
        salient = order_slots(salient, cfg.order, draws['order_noise'])
        regions, use_box = apply_curriculum(salient, draws['boxes'], draws['keep'], fill_first=False)
        # the blocks are the targets; the context is everything outside them (it comes first)
        regions = torch.cat([regions[:, -1:], regions[:, :-1]], dim=1)
        return regions, use_box, salient
    else:   # random_blocks: the uniform ablation, every slot is a random box
        salient = torch.zeros_like(draws['boxes'])
    return apply_curriculum(salient, draws['boxes'], draws['keep'], cfg.fill_first_region) + (salient,)


class DSeqJEPA:
    """Loss of one batch, with the statistics logged after ijepa's CSV columns."""

    name = 'dseq'
    csv_columns = ('lambda', 'salient_regions', 'region_size', 'random_boxes', 'steps', 'saliency_ms')

    def __init__(self, cfg, encoder, predictor, target_encoder):
        self.cfg = cfg.dseq
        self.encoder = encoder
        self.predictor = predictor
        self.target_encoder = target_encoder
        self.grid_size = unwrap(target_encoder).grid_size
        self.saliency_block = self.cfg.saliency_block or default_saliency_block(unwrap(target_encoder).depth)

    @staticmethod
    def make_collator(cfg, rank=0):
        return make_dseq_collator(cfg, rank)

    def saliency_from(self, encoder, imgs):
        """Run `encoder` on the full images once: (final patch features [B, N, D], saliency [B, N] or None)."""
        return saliency_from(encoder, imgs, self.cfg, self.saliency_block)

    def encode_target(self, imgs):
        """LayerNorm'd target features [B, N, D] and patch saliency [B, N]: from the target encoder's own pass
        (default, free), or from an extra no-grad pass of the context encoder (saliency_encoder: context)."""
        x, saliency = self.saliency_from(self.target_encoder, imgs)
        if self.cfg.saliency_encoder == 'context' and saliency is not None:
            _, saliency = self.saliency_from(unwrap(self.encoder), imgs)
        return F.layer_norm(x, (x.size(-1),)), saliency

    def make_regions(self, saliency, draws):
        return make_regions(self.cfg, saliency, draws, self.grid_size)

    def loss_fn(self, preds, targets, valid, batch_size):
        """Smooth-L1 per target token, reduced per region (mean per step, summed over steps, mean over images)
        or pooled over all target tokens."""
        per_token = F.smooth_l1_loss(preds, targets, reduction='none', beta=self.cfg.loss_beta).mean(dim=-1)
        per_token = per_token * valid                                       # (M, T)
        if self.cfg.loss_reduction == 'pooled':
            return per_token.sum() / valid.sum().clamp_min(1)
        per_step = per_token.sum(dim=1) / valid.sum(dim=1).clamp_min(1)     # (M,)
        return per_step.sum() / batch_size

    def __call__(self, batch, step):
        (imgs, _), draws = batch
        with torch.no_grad():
            h, saliency = self.encode_target(imgs)
            timer = Elapsed(imgs.device)                                    # region selection (+ curriculum)
            regions, use_box, salient = self.make_regions(saliency, draws)
            timer.stop()
            if self.cfg.truncate_regions:     # top-k truncation: the first k non-empty regions only
                regions = truncate_sequence(regions, self.cfg.truncate_regions)
            context_mask, target_mask = plan_steps(regions, self.cfg.prediction)
        predict = predict_chained if self.cfg.prediction == 'chained' else predict_pairs
        preds, tgt_ids, tgt_valid, image_index = predict(self.encoder, self.predictor, imgs, context_mask,
                                                         target_mask, static=self.cfg.static_shapes)
        targets = gather_tokens(h[image_index], tgt_ids)                    # (M, T, D)
        loss = self.loss_fn(preds, targets, tgt_valid, batch_size=len(imgs))
        nonempty = regions.any(dim=2)
        stats = {
            'mask-A': context_mask.sum(dim=2).float().mean(),              # mean context size of a step
            'mask-B': target_mask.sum(dim=2).float().mean(),               # mean target size of a step
            'lambda': draws['lambda'],
            'salient_regions': salient.any(dim=2).float().sum(dim=1).mean(),   # before the curriculum
            'region_size': (regions.sum(dim=2).float() / regions.shape[2] * nonempty).sum() / nonempty.sum(),
            'random_boxes': use_box.float().mean(),
            'steps': (context_mask.any(dim=2) & target_mask.any(dim=2)).float().sum(dim=1).mean(),
            'saliency_ms': timer,
        }
        return loss, {k: v.detach() if torch.is_tensor(v) else v for k, v in stats.items()}
