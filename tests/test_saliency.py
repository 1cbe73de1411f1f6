# Tests of DSeq-JEPA's saliency -> regions step and its collator (src/masks/saliency.py).
#
# The central test compares the vectorised `select_regions` with a plain per-image reference written below from
# SPEC section 4 step 2 (numpy and Python integers, a breadth-first flood fill), on a few thousand random maps;
# the reference's Otsu threshold and connected components are themselves checked against OpenCV.
# Grid glossary: gh x gw patches, N = gh * gw (raster order), B maps, R regions, K = R - 1 salient slots.

import math
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.masks.saliency import DSeqCollator, connected_components, otsu_threshold, random_boxes, select_regions

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures('one_thread')]



GRIDS = [(14, 14), (8, 8), (7, 9), (16, 16), (1, 20)]   # 16x16: labels no longer fit in uint8
NUM_REGIONS = [2, 3, 5, 7]
MIN_AREAS = [0., 0.02, 0.15, 0.3]


# --------------------------------------------------------------------------------------------------------------
# Reference, written from SPEC section 4 step 2 (one image at a time)
# --------------------------------------------------------------------------------------------------------------

def ref_quantise(a):
    """s = (a - min) / (max - min + 1e-6) in float32, u = floor(255 s) as uint8."""
    a = np.asarray(a, dtype=np.float32)
    s = (a - a.min()) / (a.max() - a.min() + np.float32(1e-6))
    u = np.floor(s * np.float32(255)).astype(np.uint8)
    return s.astype(np.float32), u


def ref_otsu_scores(u):
    """{t: (numerator, denominator)} of N^2 * between-class variance = (M n1 - N M1)^2 / (n1 n2), exact integers,
    for every t in 0..255 that leaves both classes (u <= t, u > t) non-empty."""
    levels = [int(v) for v in u.ravel()]
    N, M = len(levels), sum(levels)
    hist = [0] * 256
    for v in levels:
        hist[v] += 1
    scores, n1, M1 = {}, 0, 0
    for t in range(256):
        n1 += hist[t]
        M1 += t * hist[t]
        n2 = N - n1
        if n1 > 0 and n2 > 0:
            scores[t] = ((M * n1 - N * M1) ** 2, n1 * n2)
    return scores


def ref_otsu(u):
    """The smallest t among the exact maxima of the between-class variance; 0 if no t separates anything."""
    best = None
    for t, (num, den) in ref_otsu_scores(u).items():     # ascending t
        if best is None or num * best[2] > best[1] * den:   # strictly larger (cross-multiplied, exact)
            best = (t, num, den)
    return 0 if best is None else best[0]


def has_otsu_tie(u):
    """Two thresholds with different foregrounds reach the maximum exactly."""
    scores = ref_otsu_scores(u)
    if not scores:
        return False
    t = ref_otsu(u)
    num, den = scores[t]
    return any(n2 * den == num * d2 and ((u > t2) != (u > t)).any() for t2, (n2, d2) in scores.items())


def ref_components(foreground):
    """8-connected components of a bool [gh, gw] map, by flood fill: list of sorted raster-index lists, in the
    raster order of their first patch."""
    gh, gw = foreground.shape
    seen = np.zeros_like(foreground)
    comps = []
    for i in range(gh):
        for j in range(gw):
            if not foreground[i, j] or seen[i, j]:
                continue
            seen[i, j] = True
            queue, comp = deque([(i, j)]), []
            while queue:
                y, x = queue.popleft()
                comp.append(y * gw + x)
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < gh and 0 <= xx < gw and foreground[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            queue.append((yy, xx))
            comps.append(sorted(comp))
    return comps


def ref_analyse(a, grid):
    """Everything up to the area filter: (s, components as (first patch, patch list, mean s in float64))."""
    gh, gw = grid
    s, u = ref_quantise(a)
    foreground = (u > ref_otsu(u)).reshape(gh, gw)
    comps = []
    for comp in ref_components(foreground):
        mean = float(np.sum(s[comp].astype(np.float64))) / len(comp)
        comps.append((comp[0], comp, mean))
    return s, comps


def ref_regions(comps, N, num_regions, min_area):
    """bool [R, N]: top R - 1 components by mean s (ties: first patch), then the complement of their union."""
    kept = [c for c in comps if len(c[1]) >= min_area * N]
    kept.sort(key=lambda c: (-c[2], c[0]))
    out = np.zeros((num_regions, N), dtype=bool)
    for k, (_, comp, _) in enumerate(kept[:num_regions - 1]):
        out[k, comp] = True
    out[-1] = ~out[:-1].any(axis=0)
    return out


# --------------------------------------------------------------------------------------------------------------
# Random maps: smooth, noisy and degenerate
# --------------------------------------------------------------------------------------------------------------

def random_maps(grid, seed, n_smooth=600, n_noisy=200, n_levels=150):
    """float32 [B, N] saliency maps of several kinds (fixed seed)."""
    gh, gw = grid
    g = torch.Generator().manual_seed(seed)
    maps = []
    for low in [(2, 2), (3, 3), (2, 4), (4, 3), (5, 5)]:              # bicubic-upsampled low-res noise + noise
        n = n_smooth // 5
        low_res = torch.randn(n, 1, *low, generator=g)
        up = F.interpolate(low_res, size=grid, mode='bicubic', align_corners=False).flatten(1)
        maps.append(up + 0.05 * torch.randn(up.shape, generator=g))
    maps.append(torch.randn(n_noisy, gh * gw, generator=g))             # iid normal
    # few distinct levels: many equal means, so the ranking's tie rule matters
    maps.append(torch.randint(0, 4, (n_levels, gh * gw), generator=g).float())
    # three levels 0, 1/2, 1 with a symmetric histogram: u = 0, 127, 254, and the two splits tie exactly (the
    # smallest threshold must win)
    k = torch.randint(1, gh * gw // 2, (20, 1), generator=g)
    order = torch.rand(20, gh * gw, generator=g).argsort(dim=1)
    maps.append(((order >= k).float() + (order >= gh * gw - k).float()) / 2)
    # degenerate maps
    maps.append(torch.full((1, gh * gw), 3.7))                           # constant
    maps.append(torch.zeros(1, gh * gw))
    two = (torch.rand(4, gh * gw, generator=g) < 0.3).float() * 2. - 5.  # two-valued
    maps.append(two)
    bright = torch.zeros(3, gh * gw)                                     # one bright patch
    bright[0, 0], bright[1, gh * gw // 2], bright[2, -1] = 1., 5., 1e-3
    maps.append(bright)
    return torch.cat(maps).float() * (1 + 9 * torch.rand(1, generator=g))  # any scale


@pytest.mark.parametrize('grid', GRIDS, ids=lambda g: f'{g[0]}x{g[1]}')
def test_select_regions_equals_reference(grid):
    maps = random_maps(grid, seed=sum(grid))
    B, N = maps.shape
    analysed = [ref_analyse(a, grid) for a in maps.numpy()]
    # the maps had components of every kind (none, one, several) and exact Otsu ties between distinct splits
    counts = [len(c) for _, c in analysed]
    assert min(counts) == 0 and max(counts) >= 7 and sum(n == 1 for n in counts) > 10
    assert sum(has_otsu_tie(ref_quantise(a)[1]) for a in maps.numpy()) >= 20
    for R in NUM_REGIONS:
        for min_area in MIN_AREAS:
            out = select_regions(maps, grid, R, min_area)
            assert out.dtype == torch.bool and out.shape == (B, R, N)
            expected = np.stack([ref_regions(comps, N, R, min_area) for _, comps in analysed])
            mismatch = (out.numpy() != expected).any(axis=(1, 2))
            assert not mismatch.any(), (
                f'R={R} min_area={min_area}: {int(mismatch.sum())} of {B} maps differ, first {mismatch.argmax()}')


def test_reference_is_anchored_to_opencv():
    """The reference's threshold and components are OpenCV's (THRESH_OTSU, connectedComponents 8-connected) on
    every map where the Otsu maximum picks one foreground (exact ties between distinct splits are skipped)."""
    cv2 = pytest.importorskip('cv2')
    cv2.ipp.setUseIPP(False)                 # the reference C++ path; IPP may break exact ties differently
    checked = skipped = 0
    for grid in GRIDS:
        gh, gw = grid
        for a in random_maps(grid, seed=100 + sum(grid), n_smooth=200, n_noisy=100, n_levels=50).numpy():
            s, u = ref_quantise(a)
            scores = ref_otsu_scores(u)
            t = ref_otsu(u)
            if scores:
                # another split (a threshold with a different foreground) that scores the same as t is a genuine
                # tie; a near-tie (1e-9 relative) OpenCV's float64 recurrence may resolve either way: skip both
                num, den = scores[t]
                rivals = [t2 for t2, (n2, d2) in scores.items()
                          if ((u > t2) != (u > t)).any() and n2 * den >= num * d2 * (1 - 1e-9)]
                if rivals:
                    skipped += 1
                    continue
            img = u.reshape(gh, gw)
            t_cv, binary = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            fg = binary > 0
            assert np.array_equal(fg, img > t), f'Otsu foreground differs (ours t={t}, OpenCV t={t_cv})'
            n_labels, labels = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)
            ours = ref_components(fg)
            theirs = [sorted(np.flatnonzero(labels.ravel() == k).tolist()) for k in range(1, n_labels)]
            assert sorted(ours) == sorted(theirs)
            checked += 1
    print(f"OpenCV cross-check: {checked} maps checked, {skipped} skipped (ties)")
    assert checked > 10 * skipped and checked > 500, (checked, skipped)


# --------------------------------------------------------------------------------------------------------------
# Invariants of the output
# --------------------------------------------------------------------------------------------------------------

def is_8_connected(patches, grid):
    gh, gw = grid
    fg = np.zeros(gh * gw, dtype=bool)
    fg[patches] = True
    return len(ref_components(fg.reshape(gh, gw))) == 1


@pytest.mark.parametrize('grid', GRIDS, ids=lambda g: f'{g[0]}x{g[1]}')
@pytest.mark.parametrize('num_regions,min_area', [(5, 0.15), (7, 0.), (3, 0.02), (2, 0.3)])
def test_select_regions_invariants(grid, num_regions, min_area):
    maps = random_maps(grid, seed=7 * sum(grid), n_smooth=100, n_noisy=40, n_levels=20)
    B, N = maps.shape
    out = select_regions(maps, grid, num_regions, min_area)
    assert out.dtype == torch.bool and out.shape == (B, num_regions, N)
    assert torch.equal(out.sum(dim=1), torch.ones(B, N, dtype=torch.long))       # disjoint and covering
    s = (maps - maps.amin(1, keepdim=True)) / (maps.amax(1, keepdim=True) - maps.amin(1, keepdim=True) + 1e-6)
    for b in range(B):
        means, seen_empty = [], False
        for k in range(num_regions - 1):
            patches = out[b, k].nonzero().flatten().tolist()
            if not patches:
                seen_empty = True
                continue
            assert not seen_empty, 'a non-empty salient region after an empty one'
            assert len(patches) >= min_area * N
            assert is_8_connected(patches, grid)
            means.append(s[b, patches].double().mean().item())
        assert all(m1 >= m2 - 1e-12 for m1, m2 in zip(means, means[1:])), means


def test_salient_regions_are_whole_components_of_the_brighter_part():
    """A planted bright square in a dim noisy map is region 1, exactly; a dimmer square is region 2."""
    g = torch.Generator().manual_seed(0)
    a = 0.05 * torch.rand(1, 14, 14, generator=g)
    a[0, 2:6, 3:8] += 1.0           # 20 patches
    a[0, 9:13, 9:13] += 0.8         # 16 patches
    out = select_regions(a.flatten(1), (14, 14), num_regions=4, min_area=0.05)
    first, second = torch.zeros(14, 14, dtype=torch.bool), torch.zeros(14, 14, dtype=torch.bool)
    first[2:6, 3:8] = True
    second[9:13, 9:13] = True
    assert torch.equal(out[0, 0], first.flatten()) and torch.equal(out[0, 1], second.flatten())
    assert not out[0, 2].any() and torch.equal(out[0, 3], ~(first | second).flatten())


def test_min_area_keeps_components_of_exactly_min_area_patches():
    """8x8 grid, min_area 1/8: an 8-patch component is kept (area >= min_area * N), a 7-patch one is dropped."""
    a = torch.zeros(2, 8, 8)
    a[:, 1:3, 1:5] = 1.                 # 8 patches
    a[:, 5:7, 2:6] = 0.9
    a[1, 6, 5] = 0.                     # 7 patches in image 1
    out = select_regions(a.flatten(1), (8, 8), num_regions=3, min_area=0.125)
    assert out[:, 0].sum(dim=1).tolist() == [8, 8]
    assert out[:, 1].sum(dim=1).tolist() == [8, 0]


# --------------------------------------------------------------------------------------------------------------
# Connected components: the fixed-round path (used off the CPU) gives the converged labels
# --------------------------------------------------------------------------------------------------------------

def snake(gh, gw):
    """A one-patch-wide path through every other row, alternating ends: the longest component on the grid."""
    fg = torch.zeros(gh, gw, dtype=torch.bool)
    for i in range(0, gh, 2):
        fg[i] = True
        if i + 2 < gh:
            fg[i + 1, gw - 1 if (i // 2) % 2 == 0 else 0] = True
    return fg.flatten()


def ref_first_patch_labels(fg, grid):
    """[N] long: the first raster index of each patch's component, N for background."""
    N = grid[0] * grid[1]
    labels = np.full(N, N)
    for comp in ref_components(fg.numpy().reshape(grid)):
        labels[comp] = comp[0]
    return torch.from_numpy(labels)


def ref_first_patch_radius(fg, grid):
    """The largest 8-connected path length from a component's first patch to one of its patches (breadth-first)."""
    gh, gw = grid
    fg = fg.numpy().reshape(grid)
    radius = 0
    for comp in ref_components(fg):
        dist = {comp[0]: 0}
        queue = deque([comp[0]])
        while queue:
            p = queue.popleft()
            y, x = divmod(p, gw)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (y + dy) * gw + x + dx
                    if 0 <= y + dy < gh and 0 <= x + dx < gw and fg[y + dy, x + dx] and q not in dist:
                        dist[q] = dist[p] + 1
                        queue.append(q)
        radius = max(radius, max(dist.values()))
    return radius


@pytest.mark.parametrize('grid', GRIDS, ids=lambda g: f'{g[0]}x{g[1]}')
def test_connected_components_fixed_rounds_equal_converged(grid):
    gh, gw = grid
    N = gh * gw
    g = torch.Generator().manual_seed(3)
    # the all-foreground map comes first: the batch's first pixel sits at the corner of the label buffer, which
    # rounds never rewrite, so both alternating buffers must start with it (checked at both round parities below)
    fg = torch.cat([torch.ones(1, N, dtype=torch.bool)]
                   + [torch.rand(60, N, generator=g) < p for p in (0.3, 0.5, 0.7)]
                   + [snake(gh, gw).unsqueeze(0), torch.zeros(1, N, dtype=torch.bool)])
    converged = connected_components(fg, grid)
    expected = torch.stack([ref_first_patch_labels(f, grid) for f in fg])
    assert torch.equal(converged, expected)
    # min-label propagation is final after exactly as many rounds as the longest path from a component's first
    # patch (the snake here), and one round fewer is not; N rounds (the count used off the CPU) suffice
    def reaches(r):
        return torch.equal(connected_components(fg, grid, max_rounds=r), converged)
    needed = max(ref_first_patch_radius(f, grid) for f in fg)
    assert needed >= (gh // 2) * (gw - 2)                   # the snake: far longer than the grid's side
    assert reaches(needed) and not reaches(needed - 1)
    for r in sorted({needed + 1, needed + 2, N, N + 1}):
        assert reaches(r), r


def test_snake_is_one_component():
    grid = (14, 14)
    fg = snake(*grid)
    assert fg.sum() == 7 * 14 + 6             # 7 full rows and the 6 turns between them
    for max_rounds in (None, 196):
        labels = connected_components(fg.unsqueeze(0), grid, max_rounds=max_rounds)[0]
        assert torch.equal(labels[fg], torch.zeros(int(fg.sum()), dtype=torch.long))
        assert torch.equal(labels[~fg], torch.full((int((~fg).sum()),), 196))
    # through select_regions: the snake (bright) against a dark background is region 1
    out = select_regions(fg.float().unsqueeze(0), grid, num_regions=3, min_area=0.15)
    assert torch.equal(out[0, 0], fg) and not out[0, 1].any() and torch.equal(out[0, 2], ~fg)


def test_diagonal_neighbours_connect():
    fg = torch.zeros(1, 4, 4, dtype=torch.bool)
    fg[0, 0, 0] = fg[0, 1, 1] = fg[0, 2, 2] = True     # a diagonal chain: one component
    fg[0, 0, 3] = True                                  # isolated
    labels = connected_components(fg.flatten(1), (4, 4))[0]
    assert labels[[0, 5, 10]].tolist() == [0, 0, 0] and labels[3] == 3 and (labels[~fg.flatten()] == 16).all()


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------

def test_grid_mismatch_raises():
    with pytest.raises(ValueError, match='grid'):
        select_regions(torch.rand(2, 16), (3, 5), num_regions=3, min_area=0.)


@pytest.mark.parametrize('num_regions', [1, 0])
def test_too_few_regions_raises(num_regions):
    with pytest.raises(ValueError, match='num_regions'):
        select_regions(torch.rand(2, 16), (4, 4), num_regions=num_regions, min_area=0.)


def test_empty_batch_gives_empty_regions():
    assert select_regions(torch.rand(0, 196), (14, 14), num_regions=5, min_area=0.15).shape == (0, 5, 196)


@pytest.mark.parametrize('grid, num_regions, min_area', [((14, 14), 5, 0.15), ((16, 16), 3, 0.), ((1, 20), 7, 0.02)])
def test_select_regions_off_the_cpu_reads_nothing_from_the_device(grid, num_regions, min_area):
    """Off the CPU, select_regions never synchronises with the host. On the meta device every read of a value
    fails (item, torch.equal, nonzero, tolist, ...), so running there exercises the non-CPU path and proves it
    reads none."""
    probe = torch.zeros(3, device='meta')
    for read in (lambda: probe.sum().item(), lambda: torch.equal(probe, probe), lambda: probe.nonzero()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()
    N = grid[0] * grid[1]
    out = select_regions(torch.randn(4, N, device='meta'), grid, num_regions, min_area)
    assert out.device.type == 'meta' and out.dtype == torch.bool and out.shape == (4, num_regions, N)


def test_component_rounds_run_on_one_thread_and_restore_the_count(monkeypatch):
    """On the CPU the rounds of a small label buffer run with one intra-op thread; the caller's thread count (3
    here, not this machine's default) is restored afterwards, also when a round raises. A buffer above the limit,
    and a buffer off the CPU, keep the caller's count."""
    from src.masks import saliency
    seen = []                                     # the thread count at each torch.minimum (two per round)
    real_minimum = torch.minimum

    def recording_minimum(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_minimum(*args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        if not saliency._thread_count_switch_is_cheap():
            pytest.skip('this build changes the thread count only at a cost: select_regions keeps it')
        monkeypatch.setattr(torch, 'minimum', recording_minimum)            # process-wide, undone at the end
        fg = torch.rand(4, 64, generator=torch.Generator().manual_seed(0)) < 0.5
        expected = torch.stack([ref_first_patch_labels(f, (8, 8)) for f in fg])
        assert torch.equal(connected_components(fg, (8, 8)), expected)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 3
        seen.clear()
        connected_components(fg.to('meta'), (8, 8))                       # off the CPU: no switch
        assert seen and set(seen) == {3}
        seen.clear()
        limit = saliency.SINGLE_THREAD_ENTRIES
        monkeypatch.setattr(saliency, 'SINGLE_THREAD_ENTRIES', 0)          # every buffer counts as large
        connected_components(fg, (8, 8))
        assert seen and set(seen) == {3}
        monkeypatch.setattr(saliency, 'SINGLE_THREAD_ENTRIES', limit)

        def failing_minimum(*args, **kwargs):
            raise RuntimeError('round failed')
        monkeypatch.setattr(torch, 'minimum', failing_minimum)
        with pytest.raises(RuntimeError, match='round failed'):
            connected_components(fg, (8, 8))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_regions_are_an_ordinary_tensor_for_the_caller():
    """select_regions computes in inference mode but hands back an ordinary tensor: the caller can modify it in
    place and use it in ops that autograd records (both fail on an inference tensor outside inference mode)."""
    grid = (6, 6)
    regions = select_regions(torch.randn(2, 36, generator=torch.Generator().manual_seed(0)), grid, 3, 0.)
    assert not regions.is_inference()
    x = torch.randn(2, 3, 36, requires_grad=True)
    (x * regions).sum().backward()                                       # regions saved for backward
    assert torch.equal(x.grad, regions.float())
    regions[:, 0] = False                                                  # in place


def test_more_regions_than_a_byte_counts():
    """Region numbers past 255 (num_regions 300 on noise: many small components) stay disjoint and covering."""
    grid = (24, 24)
    maps = torch.randn(3, 576, generator=torch.Generator().manual_seed(0))
    out = select_regions(maps, grid, num_regions=300, min_area=0.)
    assert out.shape == (3, 300, 576)
    assert torch.equal(out.sum(dim=1), torch.ones(3, 576, dtype=torch.long))
    for b in range(3):
        s, u = ref_quantise(maps[b].numpy())
        comps = ref_components((u > ref_otsu(u)).reshape(grid))
        assert int(out[b, :-1].any(dim=1).sum()) == min(len(comps), 299)


@pytest.mark.parametrize('grid', [(53, 53), (54, 54), (1, 300)], ids=['53x53', '54x54', '1x300'])
def test_otsu_on_large_grids_equals_reference(grid):
    """53x53 (N = 2809) is the largest grid whose products M * n1 <= 255 * N^2 fit in int32; 54x54 (N = 2916)
    takes the int64 path."""
    maps = random_maps(grid, seed=11, n_smooth=10, n_noisy=4, n_levels=4)
    bright = torch.ones(2, maps.shape[1])            # u = 254 but for one or two dark patches: M * N near 255 * N^2
    bright[0, 0] = bright[1, :2] = 0.
    maps = torch.cat([maps, bright])
    u = (torch.from_numpy(np.stack([ref_quantise(m)[1] for m in maps.numpy()])))
    assert torch.equal(otsu_threshold(u), torch.tensor([ref_otsu(row) for row in u.numpy()]))


# --------------------------------------------------------------------------------------------------------------
# DSeqCollator: seeded draws, curriculum lambda, keep probabilities, boxes
# --------------------------------------------------------------------------------------------------------------

def make_collator(**kw):
    args = dict(input_size=112, patch_size=8, num_regions=5, box_scale=(0.15, 0.2), box_aspect_ratio=(0.75, 1.5),
                lambda_start=0.3, lambda_end=0.3, total_steps=100, seed=0, rank=0)
    args.update(kw)
    return DSeqCollator(**args)


def batch_of(B):
    return [(torch.zeros(3, 4, 4), i) for i in range(B)]


def draw(collator, step, B=6):
    collator.set_step(step)
    return collator(batch_of(B))[1]


def test_collator_draws_depend_only_on_seed_rank_step():
    a, b = make_collator(), make_collator()
    torch.manual_seed(1)
    da = draw(a, 5)
    torch.manual_seed(2)
    torch.rand(100)
    db = draw(b, 5)
    for key in ('boxes', 'keep', 'order_noise', 'lambda'):
        assert torch.equal(da[key], db[key]), key
    (imgs, labels), _ = a(batch_of(6))                           # the batch itself is collated as usual
    assert imgs.shape == (6, 3, 4, 4) and labels.tolist() == list(range(6))
    for other in (draw(make_collator(), 6), draw(make_collator(rank=1), 5), draw(make_collator(seed=1), 5)):
        assert not torch.equal(da['boxes'], other['boxes'])
    # consecutive calls count the steps: the second batch after set_step(5) is step 6
    c = make_collator()
    c.set_step(5)
    c(batch_of(6))
    assert torch.equal(c(batch_of(6))[1]['boxes'], draw(make_collator(), 6)['boxes'])


def test_lambda_rises_linearly_over_total_steps():
    c = make_collator(lambda_start=0.1, lambda_end=0.9, total_steps=1)
    c.set_total_steps(200)
    for step, expected in [(0, 0.1), (50, 0.3), (100, 0.5), (150, 0.7), (200, 0.9), (350, 0.9)]:
        assert draw(c, step)['lambda'].item() == pytest.approx(expected, abs=1e-6)
    full = make_collator(lambda_start=0., lambda_end=1.)
    full.set_total_steps(10)
    assert [round(draw(full, s)['lambda'].item(), 6) for s in range(12)] == [min(1., s / 10) for s in range(12)]
    # a rising curriculum of unknown length refuses to draw (a default length would put the run at one end)
    with pytest.raises(RuntimeError, match='set_total_steps'):
        draw(make_collator(lambda_start=0., lambda_end=1., total_steps=None), 5)
    assert draw(make_collator(lambda_start=0.4, lambda_end=0.4, total_steps=None), 5)['lambda'].item() == \
        pytest.approx(0.4)


@pytest.mark.parametrize('lam', [0.3, 0.8])
def test_per_region_keep_frequency_is_lambda(lam):
    c = make_collator(lambda_start=lam, lambda_end=lam)
    keep = torch.cat([draw(c, s, B=25)['keep'] for s in range(50)])   # 50 x 25 x 4 = 5000 slots
    assert keep.shape == (1250, 4) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - lam) < 0.05
    assert not all(bool(k.all()) or bool((~k).all()) for k in keep.view(50, 25, 4))   # varies within a batch


def test_per_iteration_keep_is_constant_over_the_batch():
    c = make_collator(lambda_start=0.5, lambda_end=0.5, curriculum='per_iteration')
    keeps = [draw(c, s, B=8)['keep'] for s in range(60)]
    assert all(bool(k.all()) or bool((~k).all()) for k in keeps)
    frac = sum(bool(k.all()) for k in keeps) / len(keeps)
    assert 0.3 < frac < 0.7


def test_random_blocks_never_keep_saliency():
    c = make_collator(lambda_start=1., lambda_end=1., regions='random_blocks')
    assert not any(draw(c, s)['keep'].any() for s in range(10))
    assert draw(make_collator(lambda_start=1., lambda_end=1.), 0)['keep'].all()


def reachable_box_sizes(grid, scale, aspect_ratio, n=200_001):
    """(h, w) pairs of I-JEPA's block-size rule over a fine sweep of the single uniform draw r."""
    gh, gw = grid
    r = np.linspace(0., 1., n)
    area = np.floor(gh * gw * (scale[0] + r * (scale[1] - scale[0])))
    aspect = aspect_ratio[0] + r * (aspect_ratio[1] - aspect_ratio[0])
    h = np.clip(np.round(np.sqrt(area * aspect)), 1, gh)
    w = np.clip(np.round(np.sqrt(area / aspect)), 1, gw)
    return set(zip(h.astype(int).tolist(), w.astype(int).tolist()))


@pytest.mark.parametrize('grid,scale,aspect', [((14, 14), (0.15, 0.2), (0.75, 1.5)),
                                               ((7, 9), (0.1, 0.5), (0.5, 2.0)),
                                               ((4, 4), (0.15, 0.25), (0.75, 1.5))])
def test_boxes_are_rectangles_in_the_grid_with_ijepa_sizes(grid, scale, aspect):
    gh, gw = grid
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(200, 4, grid, scale, aspect, generator=g)     # (200, 4, N)
    assert boxes.shape == (200, 4, gh * gw) and boxes.dtype == torch.bool
    allowed = reachable_box_sizes(grid, scale, aspect)
    tops, bottoms, lefts, rights = set(), set(), set(), set()
    for box in boxes.view(-1, gh, gw):
        rows = box.any(dim=1).nonzero().flatten()
        cols = box.any(dim=0).nonzero().flatten()
        top, bottom, left, right = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
        assert box[top:bottom, left:right].all() and box.sum() == (bottom - top) * (right - left)  # a rectangle
        assert (bottom - top, right - left) in allowed
        # the area is the drawn scale x N up to rounding each side to an integer (|error| <= (h + w) / 2 + 3/4)
        h, w = bottom - top, right - left
        slack = (h + w) / 2 + 0.75
        assert math.floor(scale[0] * gh * gw) - slack <= h * w <= scale[1] * gh * gw + slack
        tops.add(top), bottoms.add(bottom), lefts.add(left), rights.add(right)
    assert 0 in tops and gh in bottoms and 0 in lefts and gw in rights            # boxes reach every edge
    # the collator's boxes follow the same rule
    c = make_collator(input_size=(gh * 8, gw * 8), box_scale=scale, box_aspect_ratio=aspect)
    for box in draw(c, 3, B=20)['boxes'].view(-1, gh, gw):
        rows, cols = box.any(dim=1).nonzero().flatten(), box.any(dim=0).nonzero().flatten()
        assert (len(rows), len(cols)) in allowed and box.sum() == len(rows) * len(cols)


@pytest.mark.parametrize('kw,key', [(dict(box_scale=(-0.2, 0.1)), 'pred_mask_scale'),
                                    (dict(box_scale=(0.5, 0.1)), 'pred_mask_scale'),
                                    (dict(box_aspect_ratio=(-1., 1.)), 'aspect_ratio'),
                                    (dict(input_size=8, patch_size=8), 'grid')])
def test_collator_rejects_box_settings_that_give_empty_boxes(kw, key):
    # a negative area or aspect makes a box's sides NaN, hence empty boxes; a 1x1 grid has no boxes to draw
    from src.masks.multiblock import MaskSettingsError
    with pytest.raises(MaskSettingsError, match=key):
        make_collator(**kw)
