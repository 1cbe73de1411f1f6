# The paper's qualitative figures for a checkpoint and a batch of evaluation images, as PNG grids:
#
#   python -m evals.figures --checkpoint logs/demo_dseq/jepa-latest.pth.tar --fname configs/evals/fmnist_demo.yaml \
#       --num-images 8 --out logs/demo_dseq/figures
#
#   fig4_regions.png   (paper Figure 4) per image: the image, its saliency heat map, and the regions numbered in
#                      prediction order (empty ones skipped), as DSeq-JEPA's step builds them at the end of the
#                      curriculum (lambda = 1): the checkpoint's region generator, order, truncation and
#                      fill_first_region, with the step's random draws (seed 0) where it needs any. Grey: the rest
#                      of the image, the background (last) or, for the 'blocks' generator, the context (first)
#   fig5_clusters.png  (paper Figure 5) per image: the image and a k-means clustering (k = 4) of its patch
#                      features (the final normalised patch tokens of --which, default the eval config's
#                      pretrain.which)
#
# The saliency follows the checkpoint's dseq section (source, block, encoder, number of regions, area filter); an
# encoder without a [CLS] token (plain I-JEPA) falls back to column_mean saliency (mean attention received), and
# the uniform ablation (random_blocks, no saliency) is shown with the components generator.

import argparse
import dataclasses
import logging
import os
import sys

import torch

logger = logging.getLogger()

REGION_COLOURS = [(0.90, 0.10, 0.10), (0.10, 0.45, 0.90), (0.10, 0.70, 0.20), (0.95, 0.60, 0.05),
                  (0.60, 0.20, 0.80), (0.10, 0.75, 0.75), (0.85, 0.35, 0.60), (0.55, 0.55, 0.10)]   # grey is the rest


def dseq_settings(checkpoint, encoder):
    """The dseq and mask config sections of the checkpoint (defaults for I-JEPA runs) and the saliency block."""
    from src.config import DSeqConfig, MaskConfig, build_section
    from src.helper import torch_load
    from src.objectives.dseq import default_saliency_block
    stored = (torch_load(checkpoint, mmap=True).get('config') or {}) if checkpoint else {}
    cfg = build_section(DSeqConfig, stored.get('dseq', {}), 'dseq.')
    mask = build_section(MaskConfig, stored.get('mask', {}), 'mask.')
    if encoder.cls_token is None and cfg.saliency != 'column_mean':
        cfg = dataclasses.replace(cfg, saliency='column_mean')
    if cfg.regions == 'random_blocks':        # the uniform ablation has no saliency: show the paper's
        cfg = dataclasses.replace(cfg, regions='components')
    return cfg, mask, cfg.saliency_block or default_saliency_block(encoder.depth)


@torch.no_grad()
def regions_of(encoder, imgs, cfg, block, mask=None, saliency_encoder=None):
    """The step's regions at lambda = 1: (patch features of `encoder` [B, N, D], saliency [B, N], regions in
    prediction order bool [B, R', N] (R' = truncate_regions if set, else R), and which of them is the rest of the
    image [B, R'] (the background, or the 'blocks' generator's context). cfg, mask: the dseq and mask config
    sections; saliency_encoder: the encoder that scores the patches (default `encoder`)."""
    from src.config import MaskConfig
    from src.masks.saliency import DSeqCollator
    from src.objectives.dseq import make_regions, saliency_from, truncate_sequence
    mask = mask or MaskConfig()
    if saliency_encoder is None or saliency_encoder is encoder:
        features, saliency = saliency_from(encoder, imgs, cfg, block)
    else:                                       # features of one encoder, scores of the other
        features, (_, saliency) = encoder(imgs), saliency_from(saliency_encoder, imgs, cfg, block)
    p = encoder.patch_embed.patch_size
    grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)        # the input's grid (any resolution)
    B = imgs.shape[0]
    collator = DSeqCollator(grid, 1, cfg.num_regions, mask.pred_mask_scale, mask.aspect_ratio, lambda_start=1.,
                            lambda_end=1., curriculum=cfg.curriculum, regions=cfg.regions,
                            num_candidates=cfg.num_candidates if cfg.regions == 'blocks' else 0, seed=0)
    draws = {k: v.to(imgs.device) for k, v in collator([(torch.zeros(1), 0)] * B)[1].items()}
    regions, _, _ = make_regions(cfg, saliency, draws, grid)
    rest = regions[:, 0] if cfg.regions == 'blocks' else regions[:, -1]
    if cfg.truncate_regions:
        regions = truncate_sequence(regions, cfg.truncate_regions)
    is_rest = (regions == rest.unsqueeze(1)).all(dim=2) & regions.any(dim=2)
    return features, saliency, regions, is_rest


def kmeans(x, k=4, iters=30, seed=0):
    """Per-row k-means of x [B, N, D] (k-means++ seeding, Euclidean): cluster index [B, N]."""
    g = torch.Generator().manual_seed(seed)
    B, N, D = x.shape
    x = x.float()
    centres = x[torch.arange(B), torch.randint(0, N, (B,), generator=g)].unsqueeze(1)      # (B, 1, D)
    for _ in range(1, k):
        d = torch.cdist(x, centres).amin(dim=2) ** 2                                          # (B, N)
        pick = torch.multinomial(d + 1e-12, 1, generator=g).squeeze(1)
        centres = torch.cat([centres, x[torch.arange(B), pick].unsqueeze(1)], dim=1)
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(dim=2)                                        # (B, N)
        onehot = torch.nn.functional.one_hot(assign, k).float()                               # (B, N, k)
        counts = onehot.sum(dim=1).unsqueeze(-1)                                              # (B, k, 1)
        new = onehot.transpose(1, 2) @ x / counts.clamp_min(1)
        centres = torch.where(counts > 0, new, centres)
    return torch.cdist(x, centres).argmin(dim=2)


def unnormalise(imgs, normalization):
    mean = torch.tensor(normalization[0]).view(1, 3, 1, 1)
    std = torch.tensor(normalization[1]).view(1, 3, 1, 1)
    return (imgs.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def figure4(imgs, saliency, regions, is_rest, grid, patch_size, normalization, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    B, R, N = regions.shape
    gh, gw = grid
    pictures = unnormalise(imgs, normalization)
    p = patch_size                               # the grid covers gh * p x gw * p pixels (the rest is never seen)
    fig, axes = plt.subplots(B, 3, figsize=(6.6, 2.2 * B), squeeze=False)
    for b in range(B):
        axes[b, 0].imshow(pictures[b])
        axes[b, 1].imshow(saliency[b].view(gh, gw).float().numpy(), cmap='inferno')
        overlay = np.zeros((gh, gw, 4))          # patches in no region (cut by truncation) stay clear
        number = 0                               # regions numbered in prediction order, empty ones skipped (no step)
        for k in range(R):
            mask = regions[b, k].view(gh, gw)
            if not mask.any():
                continue
            number += 1
            grey = bool(is_rest[b, k])
            colour = (0.85, 0.85, 0.85) if grey else REGION_COLOURS[k % len(REGION_COLOURS)]
            overlay[mask.numpy()] = colour + (0.55,)
            ys, xs = mask.nonzero(as_tuple=True)
            # the number sits on the region's patch closest to its centroid (inside the region)
            cy, cx = ys.float().mean(), xs.float().mean()
            i = ((ys - cy) ** 2 + (xs - cx) ** 2).argmin()
            axes[b, 2].text(int(xs[i]), int(ys[i]), str(number), ha='center', va='center', fontsize=10,
                            fontweight='bold', color='black' if grey else 'white')
        axes[b, 2].imshow(pictures[b][:gh * p, :gw * p], extent=(-0.5, gw - 0.5, gh - 0.5, -0.5))
        axes[b, 2].imshow(overlay)
        for ax in axes[b]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], ('image', 'saliency', 'regions in prediction order')):
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure5(imgs, clusters, grid, normalization, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    B = len(imgs)
    pictures = unnormalise(imgs, normalization)
    cols = min(B, 8)
    rows = (B + cols - 1) // cols
    fig, axes = plt.subplots(2 * rows, cols, figsize=(1.6 * cols, 3.2 * rows), squeeze=False)
    for b in range(B):
        r, c = 2 * (b // cols), b % cols
        axes[r, c].imshow(pictures[b])
        axes[r + 1, c].imshow(clusters[b].view(*grid).numpy(), cmap='tab10', vmin=0, vmax=9)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if (i // (2 * cols)) * cols + i % cols >= B:       # the last row's unused places
            ax.axis('off')
    axes[0, 0].set_title('image', fontsize=9)
    axes[1, 0].set_title('k-means, k=4', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_figures(checkpoint, fname, out, num_images=8, which=None, device='cpu', start=0):
    """Write fig4_regions.png and fig5_clusters.png for test images start .. start + num_images - 1; returns their
    paths. which: the encoder of Figure 5's features (default: the eval config's pretrain.which)."""
    from evals.config import load_eval_config
    from evals.data import make_eval_datasets
    from src.helper import load_encoder
    if num_images < 1 or start < 0:
        raise ValueError(f'--num-images must be at least 1 and --start at least 0, got {num_images} and {start}')
    cfg = load_eval_config(fname, {'pretrain.checkpoint': checkpoint})
    which = which or cfg.pretrain.which

    def load(which):
        return load_encoder(checkpoint, which=which, device=device, model_name=cfg.pretrain.model_name,
                            patch_size=cfg.pretrain.patch_size, crop_size=cfg.pretrain.crop_size)
    encoder, info = load(which)
    resolution = cfg.data.resolution or info['crop_size']
    normalization = cfg.data.normalization or info['normalization']
    data = dataclasses.replace(cfg.data, limit_train=1, limit_test=None)   # items are read lazily
    _, test = make_eval_datasets(data, resolution, normalization)
    if start >= len(test):
        raise ValueError(f'--start {start}: the test set has {len(test)} images')
    imgs = torch.stack([test[i][0] for i in range(start, min(len(test), start + num_images))])
    dseq, mask, block = dseq_settings(checkpoint, encoder)
    # the step scores the patches with the target encoder, or the context encoder (dseq.saliency_encoder)
    scorer = 'encoder' if dseq.saliency_encoder == 'context' else 'target_encoder'
    try:
        scoring = encoder if scorer == info['which'] else load(scorer)[0]
    except KeyError:                      # a checkpoint holding one encoder: it scores too
        scoring = encoder
    features, saliency, regions, is_rest = regions_of(encoder, imgs.to(device), dseq, block, mask, scoring)
    p = encoder.patch_embed.patch_size
    grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
    os.makedirs(out, exist_ok=True)
    paths = (os.path.join(out, 'fig4_regions.png'), os.path.join(out, 'fig5_clusters.png'))
    figure4(imgs, saliency.cpu(), regions.cpu(), is_rest.cpu(), grid, p, normalization, paths[0])
    figure5(imgs, kmeans(features.cpu(), k=4), grid, normalization, paths[1])
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="The paper's Figures 4 (ordered regions) and 5 (patch clusters).")
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--fname', required=True, help='evaluation config: which data and preprocessing')
    parser.add_argument('--num-images', type=int, default=8)
    parser.add_argument('--start', type=int, default=0, help='index of the first test image')
    parser.add_argument('--which', default=None, choices=('target_encoder', 'encoder'),
                        help="Figure 5's encoder (default: the eval config's pretrain.which)")
    parser.add_argument('--out', required=True)
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO)
    from src.config import ConfigError
    try:
        paths = make_figures(args.checkpoint, args.fname, args.out, args.num_images, args.which, args.device,
                             args.start)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f'error: {e}')
    print('wrote ' + ' and '.join(paths))
    return 0


if __name__ == '__main__':
    sys.exit(main())
