# Time DSeq-JEPA's region selection: our vectorised `select_regions` against the official repository's way
# (min-max normalisation in torch, one copy of the maps to the host, then per image: OpenCV Otsu threshold and
# connected components, a Python loop over the components with a boolean mask and a mean each), on the same
# saliency maps, in the same run.
#
#   python -m bench.regions [--batch-size 256] [--grid 14] [--repeats 20]
#
# Conditions are those of a training step, where select_regions runs between other torch work:
# - the two implementations alternate in blocks of --block consecutive calls on the same maps (steady state;
#   alternating single calls with the single-threaded OpenCV loop would also time the wake-up of torch's idle
#   worker threads on every call);
# - the process has freed one large tensor first. glibc then serves allocations of a few MB from its heap instead
#   of fresh pages (its mmap threshold adapts upwards), as it does in any training process after the first step;
#   without it each call here would also pay ~1,400 page faults.
#
# The speedup is the median over pairs of neighbouring blocks of (OpenCV's median / ours): each pair runs within a
# fraction of a second, so slow drift of the machine's speed cancels (faster swings on a shared machine do not:
# run it several times). Needs opencv-python-headless (a test/bench dependency only). The last line is
#   regions_ms=<median> opencv_ms=<median> speedup=<median over block pairs of opencv / ours>

import argparse
import importlib.util
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from src.masks.saliency import select_regions


def opencv_regions(saliency, grid_size, num_regions, min_area):
    """The official implementation's procedure (SkyShunsuke/DSeq-JEPA, src/frameworks/dseqjepa/attention.py),
    written from it: min-max normalisation in torch on the maps' device, one copy to the host, then per image an
    OpenCV Otsu threshold and 8-connected components and a Python loop over the components with a boolean mask
    and a mean each. Unlike the official code it returns bool masks, as select_regions does, not float ones."""
    import cv2
    gh, gw = grid_size
    lo = saliency.amin(dim=1, keepdim=True)
    hi = saliency.amax(dim=1, keepdim=True)
    maps = ((saliency - lo) / (hi - lo + 1e-6)).view(-1, gh, gw).detach().float().cpu().numpy()  # device -> host
    B, N = maps.shape[0], gh * gw
    per_image = []
    for b in range(B):
        s = maps[b]
        u = (s * 255).astype(np.uint8)
        _, binary = cv2.threshold(u, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        count, labels = cv2.connectedComponents(binary, connectivity=8)
        candidates = []
        for label in range(1, count):
            mask = labels == label
            if mask.sum() < min_area * N:
                continue
            candidates.append((s[mask].mean(), mask))
        candidates.sort(key=lambda c: c[0], reverse=True)
        regions = np.zeros((num_regions, N), dtype=bool)
        union = np.zeros((gh, gw), dtype=bool)
        for k, (_, mask) in enumerate(candidates[:num_regions - 1]):
            regions[k] = mask.flatten()
            union |= mask
        regions[-1] = ~union.flatten()
        per_image.append(torch.from_numpy(regions))                         # as the official code collects them
    return torch.stack(per_image).to(saliency.device)


def smooth_maps(B, grid_size, generator):
    """Saliency-like maps: bicubic-upsampled 3x3 noise plus a little pixel noise."""
    low = torch.randn(B, 1, 3, 3, generator=generator)
    maps = F.interpolate(low, size=grid_size, mode='bicubic', align_corners=False).reshape(B, -1)
    return maps + 0.05 * torch.randn(maps.shape, generator=generator)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Time select_regions against a per-image OpenCV loop.')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--grid', type=int, default=14, help='grid side (14 = 224 px / patch 16)')
    parser.add_argument('--num-regions', type=int, default=5)
    parser.add_argument('--min-area', type=float, default=0.15)
    parser.add_argument('--repeats', type=int, default=20, help='maps per implementation')
    parser.add_argument('--block', type=int, default=5, help='consecutive calls before switching implementation')
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args(argv)
    if importlib.util.find_spec('cv2') is None:
        print('error: bench.regions needs OpenCV: bash scripts/setup.sh --test (or pip install '
              'opencv-python-headless)', file=sys.stderr)
        return 1

    grid = (args.grid, args.grid)
    g = torch.Generator().manual_seed(0)
    maps = [smooth_maps(args.batch_size, grid, g).to(args.device) for _ in range(args.repeats)]
    run = {
        'ours': lambda m: select_regions(m, grid, args.num_regions, args.min_area),
        'opencv': lambda m: opencv_regions(m, grid, args.num_regions, args.min_area),
    }
    torch.empty(24 << 20, dtype=torch.uint8)   # allocated and freed: a training process's allocator (see the top)
    for f in run.values():                      # warm-up
        f(maps[0])
    blocks = []                                 # per block of maps: {name: [ms per call]}
    for start in range(0, len(maps), args.block):   # alternating blocks, same maps
        blocks.append({})
        for name, f in run.items():
            blocks[-1][name] = []
            for m in maps[start:start + args.block]:
                if args.device.startswith('cuda'):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                f(m)                                 # the result is dropped, as the step consumes it
                if args.device.startswith('cuda'):
                    torch.cuda.synchronize()
                blocks[-1][name].append((time.perf_counter() - t0) * 1000.)
    same = sum(int((run['ours'](m) == run['opencv'](m)).all(dim=(1, 2)).sum()) for m in maps)   # untimed
    times = {name: [ms for block in blocks for ms in block[name]] for name in run}
    med = {name: statistics.median(t) for name, t in times.items()}
    # the speedup compares each block with its neighbour in time, so that slow drift over the run (a shared
    # machine's speed can move by a third within a minute) cancels; the ratio of the medians is shown too
    ratios = [statistics.median(b['opencv']) / statistics.median(b['ours']) for b in blocks]
    speedup = statistics.median(ratios)
    total = args.batch_size * args.repeats
    print(f'select_regions: batch {args.batch_size}, grid {args.grid}x{args.grid}, {args.num_regions} regions, '
          f'min area {args.min_area}, {args.device}, {torch.get_num_threads()} threads, {args.repeats} repeats in '
          f'blocks of {args.block}')
    print(f'{"impl":<8}{"median ms":>12}{"min ms":>10}')
    for name, t in times.items():
        print(f'{name:<8}{med[name]:>12.2f}{min(t):>10.2f}')
    print(f'identical regions: {same} of {total} images (differences come from exact ties: between Otsu '
          f'thresholds, which OpenCV\'s IPP path breaks differently, or between the mean saliency of components, '
          f'which the official code compares in float32)')
    print(f'opencv / ours per pair of neighbouring blocks: median {speedup:.2f}, range {min(ratios):.2f}-'
          f'{max(ratios):.2f} over {len(ratios)} pairs; ratio of the medians {med["opencv"] / med["ours"]:.2f}')
    print(f'regions_ms={med["ours"]:.2f} opencv_ms={med["opencv"]:.2f} speedup={speedup:.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
