# DSeq-JEPA saliency and regions (He et al., arXiv 2511.17354, Sec. 3.2 and Alg. 1).
#
# Step side (on the training device, vectorised over the batch, no host synchronisation on CUDA):
#   cls_similarity_saliency  paper Eq. 1: patch features of block l . [CLS] / sqrt(D)
#   select_regions           paper Eq. 2-3: min-max normalise, 8-bit Otsu (OpenCV's rule), 8-connected
#                            components, area filter, rank by mean saliency, top N-1 + background
# Collator side (data-loader workers, see DSeqCollator): random boxes and Bernoulli draws of the curriculum.
#
# Dimensions: B batch, N patches (gh * gw, raster order), R regions (num_regions), D width.

import contextlib
import functools
import math
import time

import torch

from src.masks.multiblock import check_block_settings
from src.masks.utils import BatchCounter, seed_from

def cls_similarity_saliency(patch_features, cls_token):
    """Paper Eq. 1: score of each patch = <normalised patch feature, [CLS] parameter> / sqrt(D).

    patch_features: [B, N, D] (already normalised by the encoder's final LayerNorm)
    cls_token:      [1, 1, D] the encoder's learnable [CLS] token (the parameter, not its output)
    returns         [B, N] float32
    """
    D = patch_features.shape[-1]
    return (patch_features.float() @ cls_token.float().reshape(D, 1)).squeeze(-1) / math.sqrt(D)


def normalise_saliency(saliency):
    """Per-image min-max normalisation, s = (a - min) / (max - min + 1e-6): [B, N] float32 in [0, 1)."""
    saliency = saliency.float()
    lo = saliency.amin(dim=1, keepdim=True)
    hi = saliency.amax(dim=1, keepdim=True)
    return (saliency - lo).div_(hi - lo + 1e-6)


def bin_counts(index, size, dtype=torch.int32):
    """Per row, how many entries of index [B, N] fall in each bin 0..size-1: [B, size] of `dtype`."""
    B, N = index.shape
    ones = torch.ones(1, 1, dtype=dtype, device=index.device).expand(B, N)
    return torch.zeros(B, size, dtype=dtype, device=index.device).scatter_add_(1, index, ones)


def count_and_sum(index, values, size):
    """Per row, how many entries fall in each bin (int32 [B, size]) and the sum of their `values` (float64
    [B, size]), from index [B, N] (bins 0..size-1) and values [B, N]."""
    total = torch.zeros(index.shape[0], size, dtype=torch.float64, device=index.device)
    return bin_counts(index, size), total.scatter_add_(1, index, values.double())


def otsu_threshold(u):
    """Otsu threshold of each row of the 8-bit maps `u` [B, N] (values 0..255): [B] long; foreground is u > t.

    OpenCV's rule (THRESH_OTSU, reference C++ path): t maximises the between-class variance
    q1 * q2 * (mu1 - mu2)^2 over the thresholds that leave both classes non-empty; the first (smallest) t wins
    among equal maxima; 0 if no threshold separates anything. The variance is computed from integer counts,
    N^2 * sigma = (M * n1 - N * M1)^2 / (n1 * n2), with the numerator exact, so that mathematically equal variances
    compare equal (OpenCV's floating-point recurrence, and its IPP path, can break such exact ties either way).
    """
    N = u.shape[1]
    dtype = torch.int32 if 255 * N * N < 2 ** 31 else torch.int64           # M * n1 <= 255 * N^2 must fit
    count = bin_counts(u.long(), 256, dtype)                               # histogram
    n1 = count.cumsum(dim=1, dtype=dtype)                                  # pixels with u <= t
    m1 = count.mul_(torch.arange(256, dtype=dtype, device=u.device)).cumsum_(dim=1)   # and the sum of their levels
    diff = torch.mul(n1, m1[:, -1:]).sub_(m1, alpha=N).double()            # exact integers; 0 where a class is empty
    n1n2 = (N - n1).mul_(n1).clamp_min_(1).double()
    sigma = diff.square_().div_(n1n2).view(torch.int64)                   # N^2 * between-class variance
    # first maximum (0 if all are 0). sigma >= +0 and not NaN, and such doubles order as their bit patterns read as
    # int64. The maximum, then the first position equal to it: ~20% faster than argmax on one CPU thread (argmax's
    # per-element branch mispredicts on these rising-then-falling rows), the same on two
    top = sigma.amax(dim=1, keepdim=True)
    return torch.eq(sigma, top).view(torch.uint8).argmax(dim=1)


# Below this many label entries the rounds of `_component_ids` run on one intra-op thread: each op then takes ~2 us
# and a second thread's wake-up costs more than it saves (B = 256 on a 14x14 grid, 57,615 entries: the labelling
# with 25 rounds took ~360 us on one thread against ~445 us on two; from ~150,000 entries two threads win)
SINGLE_THREAD_ENTRIES = 1 << 17


@functools.cache
def _thread_count_switch_is_cheap():
    """Whether setting torch's intra-op thread count back and forth costs next to nothing, as with the OpenMP
    backend of the usual CPU builds (~0.2 us a switch here). Other backends (the native one refuses a change once
    work has started) and builds where a switch is slow keep their count. Measured once per process."""
    if 'parallel backend: OpenMP' not in torch.__config__.parallel_info():
        return False
    threads = torch.get_num_threads()                                     # > 1: callers ask only then
    fastest = math.inf
    for _ in range(5):
        start = time.perf_counter()
        torch.set_num_threads(1)
        torch.set_num_threads(threads)
        fastest = min(fastest, time.perf_counter() - start)
    return fastest < 20e-6


@contextlib.contextmanager
def _one_intra_op_thread(enabled):
    """Run the body with torch's intra-op thread count at 1, then restore it (where switching is cheap). The count
    is process-wide: another thread that starts its first parallel op meanwhile keeps 1 thread (no such thread runs
    torch ops during a training step here: the pin-memory thread sets 1 itself and backward runs on the caller)."""
    threads = torch.get_num_threads()
    if not enabled or threads == 1 or not _thread_count_switch_is_cheap():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _component_ids(background, grid_size, max_rounds=None):
    """8-connected components of the pixels not in `background` [B, N] (bool) by min-label propagation: [B, N]
    long, for each foreground pixel the id of its component, the position (row * W + column, W = gw + 1) of the
    component's first patch in raster order, so ids increase in raster order; the background id (gh - 1) * W + gw,
    one more than the largest id, for background pixels.

    The batch lives in one flat buffer: a padding row, then per image gh pixel rows and one padding row, each
    row with one padding column, so a shift never crosses from one image or row into another and every operation
    is one contiguous vector op on a small integer type (uint8 for grids up to 15x15). Every foreground pixel starts
    with its own position and each round takes the minimum over its 3x3 neighbourhood (two shifted minimums along
    the row, two along the column); background pixels stay pinned to the background id and padding to the type's
    maximum, both larger than any id, so neither ever propagates. Rounds alternate between two buffers. A
    component is final after as many rounds as its geodesic radius from its first patch; on the CPU the loop stops
    as soon as a round changes nothing, elsewhere it runs N rounds, which suffice for any map, so it never
    synchronises with the host.
    """
    B, N = background.shape
    gh, gw = grid_size
    device = background.device
    W = gw + 1
    last = (gh - 1) * W + gw - 1                                           # largest position of a pixel
    if B == 0:
        return torch.zeros(0, N, dtype=torch.long, device=device)
    dtype = torch.uint8 if last < 255 else torch.int16 if last < 2 ** 15 - 1 else torch.int32
    top = torch.iinfo(dtype).max
    # buffers 0 and 1: labels (rounds alternate); buffer 2: the pins, 0 on foreground pixels, the background id on
    # background pixels, top on padding. Each holds L = (B * (gh + 1) + 1) * W entries, rounded up to whole 8-byte
    # words so that it can be compared as int64
    L = (B * (gh + 1) + 1) * W
    buffers = torch.full((3, -(-L // 8) * 8), top, dtype=dtype, device=device)
    images = buffers[:, W:L].view(3, B, gh + 1, W)
    bg = background.view(B, gh, gw)
    torch.mul(bg.view(torch.uint8) if dtype == torch.uint8 else bg.to(dtype), last + 1, out=images[2, :, :gh, :gw])
    position = torch.arange((gh + 1) * W, dtype=dtype, device=device).view(1, gh + 1, W)
    torch.maximum(position, images[2].expand(2, B, gh + 1, W), out=images[:2])
    flat = buffers[:, :L]
    inner = slice(W + 1, L - W - 1)                                        # positions that have all 8 neighbours
    row = torch.empty(L - 2, dtype=dtype, device=device)                   # row[i]: min of i .. i + 2
    up, middle, down = row[:-2 * W], row[W:-W], row[2 * W:]
    pinned = flat[2, inner]
    steps = [(f[:-2], f[1:-1], f[2:], flat[1 - i, inner]) for i, f in enumerate(flat[:2])]
    words = buffers[0].view(torch.int64), buffers[1].view(torch.int64)    # torch.equal is ~4x faster on int64
    on_cpu = device.type == 'cpu'
    check = on_cpu if max_rounds is None else False
    current = 0
    with _one_intra_op_thread(on_cpu and L < SINGLE_THREAD_ENTRIES):
        for r in range(N if max_rounds is None else max_rounds):
            left, centre, right, out = steps[current]
            # (in-place methods: about 0.5 us less call overhead per op than out=)
            torch.minimum(left, centre, out=row).clamp_max_(right)
            torch.minimum(up, middle, out=out).clamp_max_(down).clamp_min_(pinned)    # 3x3 minimum, then the pins
            current = 1 - current
            if check and r % 2 and torch.equal(*words):
                break
    return images[current, :, :gh, :gw].long().view(B, N)


def connected_components(foreground, grid_size, max_rounds=None):
    """8-connected components of each image's foreground [B, N] (bool, raster order): [B, N] long, the raster
    index of the pixel's component's first patch, or N for background. See `_component_ids`."""
    ids = _component_ids(~foreground, grid_size, max_rounds)
    return ids.sub_(ids // (grid_size[1] + 1))                            # row * W + col -> row * gw + col


def select_regions(saliency, grid_size, num_regions, min_area):
    """DSeq-JEPA's ordered regions from raw patch scores (paper Sec. 3.2; SPEC section 4 step 2).

    saliency:    float [B, N], N = grid_size[0] * grid_size[1], raster order
    num_regions: R; the R - 1 most salient components, then the background
    min_area:    components with fewer than min_area * N patches are dropped (paper alpha = 0.15)
    returns      bool [B, R, N]: regions[b, k, p] is True if patch p belongs to region k of image b. Regions
                 1..R-1 are the kept components ranked by mean normalised saliency (descending; ties by the
                 raster order of their first patch), empty where an image has fewer; region R is the
                 complement of their union. Regions are disjoint and cover the image.
    """
    B, N = saliency.shape
    gh, gw = grid_size
    if gh * gw != N:
        raise ValueError(f'saliency has {N} patches, grid {gh}x{gw} has {gh * gw}')
    if num_regions < 2:
        raise ValueError(f'num_regions must be at least 2, got {num_regions}')
    region = _region_numbers(saliency, grid_size, num_regions, min_area)   # (B, N) in 0..R-1
    # numbers[0, k, p] = k, materialised: broadcasting it along N instead is ~5x slower on the CPU. The comparison
    # runs outside inference mode, so that callers get an ordinary tensor
    numbers = torch.arange(num_regions, dtype=region.dtype, device=region.device).view(1, -1, 1).expand(1, -1, N)
    return region.unsqueeze(1) == numbers.contiguous()                     # (B, R, N)


@torch.inference_mode()
def _region_numbers(saliency, grid_size, num_regions, min_area):
    """select_regions' region number of every patch: [B, N] (uint8, or long if num_regions > 256), k for the k-th
    ranked component, num_regions - 1 for the background. Runs in inference mode: its ~150 small ops then skip
    autograd's dispatch, ~5% of the time on the CPU (nothing here needs gradients)."""
    B, N = saliency.shape
    gh, gw = grid_size
    s = normalise_saliency(saliency)                                       # (B, N) in [0, 1)
    u = s.mul(255).to(torch.uint8)                                         # floor, as OpenCV's 8-bit map
    # background: u <= t, with t materialised along N (comparing with a broadcast t is ~2x slower on the CPU)
    threshold = otsu_threshold(u).to(torch.uint8).unsqueeze(1).expand(B, N).contiguous()
    labels = _component_ids(u <= threshold, grid_size)
    ids = (gh - 1) * (gw + 1) + gw                                         # ids 0 .. ids - 1; background: ids
    # -- per-component area and summed saliency, indexed by id (the background's slot, ids, is emptied)
    area, total = count_and_sum(labels, s, ids + 1)
    area[:, ids] = 0
    # -- the candidates: at most `most` components can pass the area filter, so the `most` largest contain them
    # all. Their mean saliency ranks them (the filtered ones last); ties keep raster order of the first patch
    K = num_regions - 1
    min_count = max(1, math.ceil(min_area * N))                            # area >= min_area * N, in patches
    most = N // min_count
    candidates = area.topk(most, dim=1, sorted=False).indices.sort(dim=1).values     # (B, most), raster order
    count = area.gather(1, candidates)
    score = torch.where(count >= min_count, total.gather(1, candidates) / count, -math.inf)
    score, best = torch.sort(score, dim=1, descending=True, stable=True)
    order = candidates.gather(1, best[:, :K])                              # (B, min(K, most)) ids, ranked
    valid = score[:, :K] > -math.inf
    # -- region number of every component (K = background), looked up by each pixel's id
    number = torch.uint8 if num_regions <= 256 else torch.long
    rank = torch.arange(order.shape[1], dtype=number, device=s.device).expand_as(order)
    table = torch.full((B, ids + 1), K, device=s.device, dtype=number)
    table.scatter_(1, torch.where(valid, order, ids), torch.where(valid, rank, K))
    return table.gather(1, labels)                                         # (B, N) in 0..K


# --------------------------------------------------------------------------------------------------------------
# Collator side: the random draws of DSeq-JEPA's curriculum, made in the data-loader workers
# --------------------------------------------------------------------------------------------------------------

def random_boxes(B, K, grid_size, scale, aspect_ratio, generator=None):
    """K random boxes per image as bool masks [B, K, N], sized like I-JEPA's target blocks (one uniform draw sets
    both scale and aspect ratio) and placed uniformly (touching any edge)."""
    gh, gw = grid_size
    r = torch.rand(B, K, generator=generator)
    area = (gh * gw * (scale[0] + r * (scale[1] - scale[0]))).floor()
    aspect = aspect_ratio[0] + r * (aspect_ratio[1] - aspect_ratio[0])
    h = (area * aspect).sqrt().round().clamp(1, gh)                        # (B, K)
    w = (area / aspect).sqrt().round().clamp(1, gw)
    top = (torch.rand(B, K, generator=generator) * (gh - h + 1)).floor()
    left = (torch.rand(B, K, generator=generator) * (gw - w + 1)).floor()
    rows = torch.arange(gh).view(1, 1, gh)
    cols = torch.arange(gw).view(1, 1, gw)
    in_rows = (rows >= top.unsqueeze(-1)) & (rows < (top + h).unsqueeze(-1))   # (B, K, gh)
    in_cols = (cols >= left.unsqueeze(-1)) & (cols < (left + w).unsqueeze(-1))  # (B, K, gw)
    return (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)).flatten(2)          # (B, K, N)


class DSeqCollator(BatchCounter):
    """Collate a batch and draw what DSeq-JEPA's step needs besides the images (paper Alg. 1):

    boxes       bool [B, R-1, N]  one random box per salient-region slot (the curriculum's replacement)
    keep        bool [B, R-1]     True: the slot keeps its salient region (Bernoulli(lambda), per region or once
                                  per batch); always False for the 'random_blocks' generator
    order_noise float [B, R-1]    random keys for order: random
    candidates  bool [B, M, N]    with num_candidates = M > 0: candidate blocks for the 'blocks' generator
    lambda      float []          the curriculum's lambda at this step: lambda_start -> lambda_end linearly
    Draws come from a generator seeded by (seed, rank, step), so they do not depend on workers or restarts.
    Returns (collated_batch, draws).
    """

    def __init__(self, input_size, patch_size, num_regions, box_scale, box_aspect_ratio, lambda_start=0.,
                 lambda_end=1., curriculum='per_region', regions='components', num_candidates=0, total_steps=None,
                 seed=0, rank=0):
        super().__init__(deterministic=True)
        size = input_size if isinstance(input_size, (tuple, list)) else (input_size, input_size)
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        # the random boxes are sized like I-JEPA's target blocks, from the same keys (make_dseq_collator)
        check_block_settings(self.grid_size, patch_size, box_aspect_ratio, pred_mask_scale=box_scale)
        self.num_regions = num_regions
        self.box_scale, self.box_aspect_ratio = tuple(box_scale), tuple(box_aspect_ratio)
        self.lambda_start, self.lambda_end = lambda_start, lambda_end
        self.curriculum = curriculum
        self.regions = regions
        self.num_candidates = num_candidates
        self.total_steps = total_steps
        self.seed, self.rank = seed, rank

    def set_total_steps(self, total_steps):
        """The step at which lambda reaches lambda_end (the training loop sets it once it knows the epochs)."""
        self.total_steps = max(1, int(total_steps))

    def lambda_at(self, step):
        if self.lambda_start == self.lambda_end:
            return self.lambda_end
        if self.total_steps is None:       # a default would silently put the whole run at one end of the curriculum
            raise RuntimeError('DSeqCollator: the curriculum needs its length: pass total_steps or call '
                               'set_total_steps before drawing')
        return self.lambda_start + (self.lambda_end - self.lambda_start) * min(1., step / self.total_steps)

    def __call__(self, batch):
        B, K = len(batch), self.num_regions - 1
        collated = torch.utils.data.default_collate(batch)
        step = self.next_batch_step()
        g = torch.Generator().manual_seed(seed_from(self.seed, self.rank, step, 1))
        lam = self.lambda_at(step)
        boxes = random_boxes(B, K, self.grid_size, self.box_scale, self.box_aspect_ratio, generator=g)
        if self.regions == 'random_blocks':
            keep = torch.zeros(B, K, dtype=torch.bool)
        elif self.curriculum == 'per_iteration':
            keep = (torch.rand(1, 1, generator=g) < lam).expand(B, K).clone()
        else:
            keep = torch.rand(B, K, generator=g) < lam
        draws = {'boxes': boxes, 'keep': keep, 'order_noise': torch.rand(B, K, generator=g),
                 'lambda': torch.tensor(lam)}
        if self.num_candidates:      # the 'blocks' generator scores these on the device
            draws['candidates'] = random_boxes(B, self.num_candidates, self.grid_size, self.box_scale,
                                               self.box_aspect_ratio, generator=g)
        return collated, draws
