# Tests of the DSeq-JEPA objective (src/objectives/dseq.py) and its sequential prediction
# (src/models/predictor.py): step plans against a plain per-image reference, token dropping against masked
# attention over all tokens, predictor padding against unpadded rows, gradient paths of the chained mode,
# images without salient regions, end-to-end training of the variants and bit-for-bit resume.
# Dimensions: B images, R regions, K = R - 1 salient slots, S steps, N patches, M (image, step) pairs,
# L / T padded context / target length, D width, P prefix tokens (1 with [CLS]).

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import src.objectives.dseq as dseq
from src.config import parse_config
from src.helper import init_model
from src.masks.saliency import random_boxes, select_regions
from src.models.predictor import pack, plan_steps, predict_chained, predict_pairs
from src.objectives.dseq import DSeqJEPA, apply_curriculum, make_dseq_collator, order_slots, truncate_sequence
from src.train import main as train_main
from tests.helpers import read_csv, tiny_params, train_straight_and_resumed

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures('one_thread')]

CROP, PATCH = 32, 8
GRID = (CROP // PATCH, CROP // PATCH)     # 4 x 4 patches
N = GRID[0] * GRID[1]
DSEQ_STATS = ['lambda', 'salient_regions', 'region_size', 'random_boxes', 'steps']   # deterministic
DSEQ_COLUMNS = DSEQ_STATS + ['saliency_ms']




def tiny_models(use_cls_token, seed=0):
    torch.manual_seed(seed)
    encoder, predictor = init_model('cpu', patch_size=PATCH, model_name='vit_pico', crop_size=CROP, pred_depth=2,
                                    pred_emb_dim=16, use_cls_token=use_cls_token)
    return encoder.eval(), predictor.eval()


def ref_pack(mask, length):
    """A bool [N] set -> ids [length] (its positions ascending, then the other positions ascending as padding,
    so padding entries are real patches outside the set) and valid [length]."""
    inside = mask.nonzero().flatten()
    outside = (~mask).nonzero().flatten()
    ids = torch.cat([inside, outside])[:length]
    return ids, torch.arange(length) < len(inside)


def random_sets(sizes, g):
    """bool [len(sizes), N]: row m has sizes[m] random patches."""
    return torch.stack([torch.zeros(N, dtype=torch.bool).index_fill_(0, torch.randperm(N, generator=g)[:s], True)
                        for s in sizes])


# --------------------------------------------------------------------------------------------------------------
# 1. Curriculum and step plans against a per-image reference
# --------------------------------------------------------------------------------------------------------------

def random_salient_and_boxes(B, grid, num_regions, seed):
    """Salient slots [B, K, N] from select_regions on random smooth maps (some with no component), random boxes
    [B, K, N] and keep draws [B, K]."""
    g = torch.Generator().manual_seed(seed)
    K = num_regions - 1
    maps = F.interpolate(torch.randn(B, 1, 3, 3, generator=g), size=grid, mode='bicubic').flatten(1)
    maps[:B // 8] = 1.                                            # constant maps: no salient region at all
    salient = select_regions(maps, grid, num_regions, min_area=0.05)[:, :-1]
    salient = order_slots(salient, 'random', torch.rand(B, K, generator=g))
    boxes = random_boxes(B, K, grid, (0.1, 0.3), (0.75, 1.5), generator=g)
    keep = torch.rand(B, K, generator=g) < 0.6
    return salient, boxes, keep


def ref_curriculum(salient, boxes, keep, fill_first):
    """Per image: slot k is its salient region if kept, else its box; with fill_first an image with no salient
    region takes its first box as slot 1; each slot minus the earlier ones; last = the rest."""
    B, K, N_ = salient.shape
    regions = torch.zeros(B, K + 1, N_, dtype=torch.bool)
    use_box = torch.zeros(B, K, dtype=torch.bool)
    for b in range(B):
        taken = torch.zeros(N_, dtype=torch.bool)
        no_salient = not salient[b].any()
        for k in range(K):
            use_box[b, k] = (not keep[b, k]) or (fill_first and k == 0 and no_salient)
            chosen = boxes[b, k] if use_box[b, k] else salient[b, k]
            regions[b, k] = chosen & ~taken
            taken |= regions[b, k]
        regions[b, K] = ~taken
    return regions, use_box


@pytest.mark.parametrize('fill_first', [True, False])
def test_curriculum_equals_reference_and_regions_partition_the_image(fill_first):
    grid = (8, 8)
    salient, boxes, keep = random_salient_and_boxes(64, grid, num_regions=5, seed=1)
    assert (~salient.any(dim=2)).any() and salient.any(dim=2).any()       # empty and non-empty slots exist
    regions, use_box = apply_curriculum(salient, boxes, keep, fill_first)
    expected, expected_use_box = ref_curriculum(salient, boxes, keep, fill_first)
    assert torch.equal(regions, expected) and torch.equal(use_box, expected_use_box)
    assert torch.equal(regions.sum(dim=1), torch.ones(64, 64, dtype=torch.long))   # disjoint and covering
    # a kept, non-empty salient slot is that region minus what earlier slots took
    for b, k in keep.nonzero().tolist():
        if salient[b, k].any():
            earlier = regions[b, :k].any(dim=0)
            assert torch.equal(regions[b, k], salient[b, k] & ~earlier)
    no_salient = ~salient.any(dim=(1, 2))
    if fill_first:   # an image without salient regions still has a non-empty first region: its first box
        assert regions[:, 0].any(dim=1).all()
        assert torch.equal(regions[no_salient, 0], boxes[no_salient, 0])
    else:            # ... otherwise its kept slots stay empty
        rows = no_salient & keep[:, 0]
        assert rows.any() and not regions[rows, 0].any()


@pytest.mark.parametrize('prediction', ['sequential', 'flat', 'chained'])
def test_step_plans(prediction):
    grid = (8, 8)
    salient, boxes, keep = random_salient_and_boxes(32, grid, num_regions=6, seed=2)
    regions, _ = apply_curriculum(salient, boxes, keep)
    context, target = plan_steps(regions, prediction)
    B, R, N_ = regions.shape
    assert context.shape == target.shape == (B, R - 1, N_)
    for k in range(R - 1):
        assert torch.equal(target[:, k], regions[:, k + 1])                  # step k predicts R_{k+2} (0-based)
        if prediction == 'sequential':                                       # context = R_1 u ... u R_{k+1}
            union = torch.zeros(B, N_, dtype=torch.bool)
            for j in range(k + 1):
                union |= regions[:, j]
            assert torch.equal(context[:, k], union)
        else:                                                                # flat / chained: R_1 at every step
            assert torch.equal(context[:, k], regions[:, 0])
        assert not (context[:, k] & target[:, k]).any()                      # context and target are disjoint
    truncated = plan_steps(regions, prediction, max_steps=2)
    assert torch.equal(truncated[0], context[:, :2]) and torch.equal(truncated[1], target[:, :2])
    with pytest.raises(ValueError, match='prediction'):
        plan_steps(regions, 'parallel')


def test_pack_equals_reference():
    g = torch.Generator().manual_seed(0)
    masks = random_sets([0, 1, 7, 16, 3], g)
    ids, valid = pack(masks)
    assert ids.shape == valid.shape == (5, 16)
    for m in range(5):
        rids, rvalid = ref_pack(masks[m], 16)
        assert torch.equal(valid[m], rvalid) and torch.equal(ids[m][rvalid], rids[rvalid])
    empty_ids, empty_valid = pack(torch.zeros(0, N, dtype=torch.bool))     # no pair at all in the batch
    assert empty_ids.shape == empty_valid.shape == (0, 1)


# --------------------------------------------------------------------------------------------------------------
# 2. Token dropping equals masked attention over all tokens; no leak from outside the context
# --------------------------------------------------------------------------------------------------------------

CTX_SIZES = [1, 16, 5, 3, 9, 12]
IMAGE_INDEX = torch.tensor([0, 0, 1, 2, 2, 2])


def token_dropping_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(3, 3, CROP, CROP, generator=g)
    ctx = random_sets(CTX_SIZES, g)                                          # (M, N)
    L = max(CTX_SIZES)
    packed = [ref_pack(c, L) for c in ctx]
    ids = torch.stack([p[0] for p in packed])                                # (M, L)
    valid = torch.stack([p[1] for p in packed])
    return imgs, ctx, ids, valid


@pytest.mark.parametrize('use_cls_token', [True, False])
@pytest.mark.parametrize('packed', [False, True])
def test_token_dropping_equals_masked_attention(use_cls_token, packed):
    encoder, _ = tiny_models(use_cls_token)
    imgs, ctx, ids, valid = token_dropping_inputs()
    M, P = len(ctx), int(use_cls_token)
    num_valid = sum(CTX_SIZES) if packed else None      # packed: the per-token layers skip the padding
    with torch.no_grad():
        out = encoder(imgs, masks=[ids], image_index=IMAGE_INDEX, key_valid=valid, num_valid=num_valid)  # (M, L, D)
        # all P + N tokens of each pair's image; every token may attend to the context tokens (and [CLS]) only
        keys = torch.cat([torch.ones(M, P, dtype=torch.bool), ctx], dim=1)              # (M, P + N)
        attn_mask = keys[:, None, None, :].expand(M, 1, P + N, P + N)
        full = encoder.forward_features(imgs[IMAGE_INDEX], attn_mask=attn_mask)['x']    # (M, N, D)
    assert out.shape == (M, max(CTX_SIZES), encoder.embed_dim)
    for m in range(M):
        n = CTX_SIZES[m]
        assert torch.allclose(out[m, :n], full[m, ids[m, :n]], atol=1e-5, rtol=1e-4), m
        # and the same as that row alone, unpadded
        with torch.no_grad():
            alone = encoder(imgs[IMAGE_INDEX[m]:IMAGE_INDEX[m] + 1], masks=[ids[m:m + 1, :n]])
        assert torch.allclose(out[m, :n], alone[0], atol=1e-5, rtol=1e-4), m


def patch_pixels(mask):
    """bool [N] over patches -> bool [CROP, CROP] over pixels."""
    return mask.view(*GRID).repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1)


@pytest.mark.parametrize('use_cls_token', [True, False])
@pytest.mark.parametrize('packed', [False, True])
def test_pixels_outside_the_context_do_not_leak(use_cls_token, packed):
    encoder, _ = tiny_models(use_cls_token)
    imgs, ctx, ids, valid = token_dropping_inputs(seed=1)
    num_valid = sum(CTX_SIZES) if packed else None
    with torch.no_grad():
        out = encoder(imgs, masks=[ids], image_index=IMAGE_INDEX, key_valid=valid, num_valid=num_valid)
    g = torch.Generator().manual_seed(5)
    for m in range(len(ctx)):
        n = CTX_SIZES[m]
        changed = imgs.clone()
        outside = patch_pixels(~ctx[m])                                      # (CROP, CROP)
        changed[int(IMAGE_INDEX[m])][:, outside] += 3 * torch.randn(3, int(outside.sum()), generator=g)
        with torch.no_grad():
            out2 = encoder(changed, masks=[ids], image_index=IMAGE_INDEX, key_valid=valid, num_valid=num_valid)
        assert torch.allclose(out2[m, :n], out[m, :n], atol=1e-6, rtol=0), m
        if packed:                                 # padding is not computed (Packing): zeros
            assert (out2[m, n:] == 0).all()
        elif n < ids.shape[1]:   # the padding of row m holds patches outside its context: they did change
            assert not torch.allclose(out2[m, n:], out[m, n:], atol=1e-3)


# --------------------------------------------------------------------------------------------------------------
# 3. Predictor: a padded row predicts what the row alone predicts
# --------------------------------------------------------------------------------------------------------------

def test_predictor_padding_equals_unpadded_rows():
    _, predictor = tiny_models(False)
    g = torch.Generator().manual_seed(0)
    ctx_sizes, tgt_sizes = [3, 10, 1, 7], [5, 2, 9, 4]
    L, T = max(ctx_sizes), max(tgt_sizes)
    ctx_ids, ctx_valid, tgt_ids, tgt_valid = [], [], [], []
    for nc, nt in zip(ctx_sizes, tgt_sizes):
        perm = torch.randperm(N, generator=g)
        ctx = torch.zeros(N, dtype=torch.bool).index_fill_(0, perm[:nc], True)
        tgt = torch.zeros(N, dtype=torch.bool).index_fill_(0, perm[nc:nc + nt], True)
        for mask, length, ids_list, valid_list in ((ctx, L, ctx_ids, ctx_valid), (tgt, T, tgt_ids, tgt_valid)):
            ids, valid = ref_pack(mask, length)
            ids_list.append(ids)
            valid_list.append(valid)
    ctx_ids, ctx_valid = torch.stack(ctx_ids), torch.stack(ctx_valid)
    tgt_ids, tgt_valid = torch.stack(tgt_ids), torch.stack(tgt_valid)
    z = torch.randn(4, L, 32, generator=g)                                   # encoder outputs (D = 32)
    with torch.no_grad():
        preds = predictor(z, [ctx_ids], [tgt_ids], context_valid=ctx_valid, target_valid=tgt_valid)   # (4, T, D)
        z_junk = torch.where(ctx_valid.unsqueeze(-1), z, 100 * torch.randn(z.shape, generator=g))
        preds_junk = predictor(z_junk, [ctx_ids], [tgt_ids], context_valid=ctx_valid, target_valid=tgt_valid)
        # compact rows: each row's real tokens moved to its front, blocks on max(nc + nt) tokens only
        K = max(c + t for c, t in zip(ctx_sizes, tgt_sizes))
        assert K < L + T
        preds_compact = predictor(z_junk, [ctx_ids], [tgt_ids], context_valid=ctx_valid, target_valid=tgt_valid,
                                  compact_length=K)
        # packed: the per-token layers see only the real tokens (with and without compaction)
        real = sum(ctx_sizes) + sum(tgt_sizes)
        preds_packed = predictor(z_junk, [ctx_ids], [tgt_ids], context_valid=ctx_valid, target_valid=tgt_valid,
                                 num_valid=real)
        preds_both = predictor(z_junk, [ctx_ids], [tgt_ids], context_valid=ctx_valid, target_valid=tgt_valid,
                               compact_length=K, num_valid=real)
    assert preds.shape == preds_compact.shape == preds_packed.shape == preds_both.shape == (4, T, 32)
    for m, (nc, nt) in enumerate(zip(ctx_sizes, tgt_sizes)):
        with torch.no_grad():
            alone = predictor(z[m:m + 1, :nc], [ctx_ids[m:m + 1, :nc]], [tgt_ids[m:m + 1, :nt]])   # (1, nt, D)
        assert torch.allclose(preds[m, :nt], alone[0], atol=1e-5, rtol=1e-4), m
        assert torch.allclose(preds_junk[m, :nt], alone[0], atol=1e-5, rtol=1e-4), m   # padding content unused
        assert torch.allclose(preds_compact[m, :nt], alone[0], atol=1e-5, rtol=1e-4), m
        assert torch.allclose(preds_packed[m, :nt], alone[0], atol=1e-5, rtol=1e-4), m
        assert torch.allclose(preds_both[m, :nt], alone[0], atol=1e-5, rtol=1e-4), m


def test_packed_tokens_give_the_padded_gradients():
    """The packed path (per-token layers on the real tokens only) is the padded masked-attention path,
    backwards too: same loss, same parameter gradients, encoder and predictor (drop_path off, as in every shipped
    config)."""
    encoder, _ = tiny_models(True)
    imgs, ctx, ids, valid = token_dropping_inputs(seed=2)
    grads = []
    for num_valid in (None, sum(CTX_SIZES)):
        encoder.zero_grad()
        out = encoder(imgs, masks=[ids], image_index=IMAGE_INDEX, key_valid=valid, num_valid=num_valid)
        loss = (out.pow(2).sum(-1) * valid).sum()            # real tokens only
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in encoder.parameters() if p.grad is not None]))
    # the predictor on those encodings, with compaction: packed against padded
    _, predictor = tiny_models(True)
    z = out.detach()
    tgt_ids, tgt_valid = pack(~ctx, 4)                    # up to 4 target patches outside each context
    for num_valid in (None, sum(CTX_SIZES) + int(tgt_valid.sum())):
        predictor.zero_grad()
        preds = predictor(z, [ids], [tgt_ids], context_valid=valid, target_valid=tgt_valid,
                          compact_length=max(CTX_SIZES) + 4, num_valid=num_valid)
        loss = (preds.pow(2).sum(-1) * tgt_valid).sum()      # real targets only
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in predictor.parameters() if p.grad is not None]))
    for (loss_a, grads_a), (loss_b, grads_b) in (grads[:2], grads[2:]):
        assert torch.allclose(loss_a, loss_b, rtol=1e-5)
        assert len(grads_a) == len(grads_b) > 0
        for a, b in zip(grads_a, grads_b):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_packed_drop_path_drops_whole_rows():
    """Stochastic depth on packed tokens keeps or drops each padded row's tokens together."""
    from src.models.vision_transformer import Packing, drop_path
    valid = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, False, False]])
    packing = Packing(valid, 6)
    torch.manual_seed(0)
    dropped = [drop_path(torch.ones(6, 3), 0.5, True, packing) for _ in range(50)]
    for x in dropped:
        for row in range(3):
            values = x[packing.rows == row].unique()
            assert len(values) == 1 and values.item() in (0., 2.)        # all dropped or all kept (scaled 1/0.5)
    rows_kept = torch.stack([torch.stack([x[packing.rows == r][0, 0] > 0 for r in range(3)]) for x in dropped])
    assert 0 < rows_kept.float().mean() < 1                                 # both happen


@pytest.mark.parametrize('k', [2, 3, 5])
def test_truncation_keeps_each_images_first_k_non_empty_regions(k):
    """Top-k truncation counts the regions an image has, not slots: the curriculum's regions (with empty slots
    where an image has few salient components) against a per-image reference."""
    salient, boxes, keep = random_salient_and_boxes(64, (8, 8), num_regions=5, seed=2)
    keep[:32] = True                                      # lambda 1 on half the batch: empty slots stay empty
    regions, _ = apply_curriculum(salient, boxes, keep)
    assert (~regions.any(dim=2)).any()                    # some slot is empty
    out = truncate_sequence(regions, k)
    assert out.shape == (64, k, regions.shape[2])
    for b in range(64):
        kept = [r for r in regions[b] if r.any()][:k]
        expected = torch.zeros(k, regions.shape[2], dtype=torch.bool)
        if kept:
            expected[:len(kept)] = torch.stack(kept)
        assert torch.equal(out[b], expected), b
    # an image with one salient region and the background keeps a prediction step at every k
    single = (regions.any(dim=2).sum(dim=1) == 2).nonzero().flatten()
    assert len(single) > 0
    context, target = plan_steps(out[single], 'sequential')
    assert (context.any(dim=2) & target.any(dim=2)).any(dim=1).all()


# --------------------------------------------------------------------------------------------------------------
# 4. Chained prediction feeds the earlier predictions (with gradients); sequential steps are independent
# --------------------------------------------------------------------------------------------------------------

class RecordingPredictor:
    """Wraps the predictor and records each call's input tokens and output."""

    def __init__(self, predictor):
        self.predictor, self.inputs, self.outputs = predictor, [], []

    def __call__(self, x, *args, **kwargs):
        out = self.predictor(x, *args, **kwargs)
        self.inputs.append(x)
        self.outputs.append(out)
        return out


def four_regions(B=2, seed=0):
    """bool [B, 4, N]: a random partition of the 4 x 4 grid into 4 non-empty regions per image."""
    g = torch.Generator().manual_seed(seed)
    regions = torch.zeros(B, 4, N, dtype=torch.bool)
    for b in range(B):
        label = torch.cat([torch.arange(4), torch.randint(0, 4, (N - 4,), generator=g)])[torch.randperm(N, generator=g)]
        regions[b] = label.unsqueeze(0) == torch.arange(4).unsqueeze(1)
    return regions


def patch_0_in_a_padded_target():
    """bool [2, 4, N]: image 0's first target (R_2) holds patch 0 and is shorter than image 1's, so its packed row
    is padded."""
    label = torch.tensor([[1, 1, 2, 2, 2, 2, 3, 3] + [0] * 8,
                          [1, 1, 1, 1, 1, 1, 2, 3] + [0] * 8])
    return label.unsqueeze(1) == torch.arange(4).view(1, 4, 1)


@pytest.mark.parametrize('static', [False, True], ids=['dynamic', 'static'])
@pytest.mark.parametrize('make_regions', [four_regions, patch_0_in_a_padded_target], ids=['random', 'patch_0'])
def test_chained_later_steps_see_earlier_predictions_with_gradient(make_regions, static):
    encoder, predictor = tiny_models(True)
    imgs = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(0))
    regions = make_regions()
    context, target = plan_steps(regions, 'chained')                         # (2, 3, N)
    rec = RecordingPredictor(predictor)
    preds, ids, valid, image_index = predict_chained(encoder, rec, imgs, context, target, static=static)
    B, S = 2, 3
    assert len(rec.outputs) == S and image_index.tolist() == [0, 1] * S
    L = N if static else int(regions[:, 0].sum(dim=1).max())
    # step k's input = the context encodings, then the predictions of steps < k at their positions (raster order)
    for k in range(1, S):
        for b in range(B):
            earlier = {}
            for j in range(k):
                n = int(target[b, j].sum())
                for i, pos in enumerate(ids[j * B + b, :n].tolist()):
                    earlier[pos] = rec.outputs[j][b, i]
            fed = rec.inputs[k][b, L:]
            expected = torch.stack([earlier[p] for p in sorted(earlier)])
            assert torch.equal(fed[:len(expected)], expected)
    # the loss of a later step has a gradient with respect to each earlier step's prediction
    for k in range(1, S):
        rows = slice(k * B, (k + 1) * B)
        later = (preds[rows] * valid[rows].unsqueeze(-1)).pow(2).sum()
        grads = torch.autograd.grad(later, rec.outputs[:k], retain_graph=True)
        assert all(gr.abs().sum() > 0 for gr in grads), k
    # the first chained step predicts what a flat step with the same context predicts
    flat = predict_pairs(encoder, predictor, imgs, *plan_steps(regions, 'flat'), static=static)[0]  # (image, step)
    for b in range(B):
        n = int(target[b, 0].sum())
        assert torch.allclose(preds[b, :n], flat[b * S, :n], atol=1e-5)


@pytest.mark.parametrize('static', [False, True], ids=['dynamic', 'static'])
def test_chained_image_without_context_never_attends_to_nothing(static):
    """An image whose R_1 is empty: the encoder still gets one key per row (a fully masked attention row is NaN on
    some kernels), its predictions are finite, and none of them counts in the loss."""
    encoder, predictor = tiny_models(True)
    imgs = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(0))
    label = torch.tensor([[1, 1, 2, 2, 2, 2, 3, 3] + [0] * 8, [1] * 8 + [2] * 4 + [3] * 4])   # image 1: no R_1
    regions = label.unsqueeze(1) == torch.arange(4).view(1, 4, 1)
    key_rows = []

    def recording_encoder(*args, key_valid=None, **kwargs):
        key_rows.append(key_valid.any(dim=1))
        return encoder(*args, key_valid=key_valid, **kwargs)
    preds, _, valid, image_index = predict_chained(recording_encoder, predictor, imgs,
                                                   *plan_steps(regions, 'chained'), static=static)
    assert all(rows.all() for rows in key_rows)
    assert torch.isfinite(preds).all()
    assert not valid[image_index == 1].any() and valid[image_index == 0].any()


def test_chained_later_prediction_changes_with_the_earlier_one():
    encoder, predictor = tiny_models(True)
    imgs = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(0))
    context, target = plan_steps(four_regions(), 'chained')

    def perturbed(*args, **kwargs):   # shifts the first step's prediction only
        out = predictor(*args, **kwargs)
        perturbed.calls += 1
        return out + 10. if perturbed.calls == 1 else out
    perturbed.calls = 0
    with torch.no_grad():
        base, _, valid, _ = predict_chained(encoder, predictor, imgs, context, target)   # rows (step, image)
        moved = predict_chained(encoder, perturbed, imgs, context, target)[0]
    change = (moved - base).abs().amax(dim=2) * valid                       # (S * B, T), 0 on padding
    assert torch.allclose(change[:2][valid[:2]], torch.full((int(valid[:2].sum()),), 10.))
    assert change[2:].amax(dim=1).min() > 1e-5       # every image's steps 2 and 3 moved (0 if they did not see it)


def test_sequential_step_depends_only_on_its_own_context_and_target():
    """Each sequential step's prediction equals the prediction with every other step removed: it does not see
    earlier predictions (only real tokens of the earlier regions)."""
    encoder, predictor = tiny_models(True)
    imgs = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(0))
    context, target = plan_steps(four_regions(seed=3), 'sequential')
    with torch.no_grad():
        preds, ids, valid, image_index = predict_pairs(encoder, predictor, imgs, context, target)
        for k in range(3):
            only = torch.zeros_like(target)
            only[:, k] = target[:, k]
            p_k, ids_k, valid_k, index_k = predict_pairs(encoder, predictor, imgs, context, only)
            rows = torch.arange(2) * 3 + k          # pairs are image-major: (image, step)
            assert torch.equal(index_k, image_index[rows])
            for r, row in enumerate(rows.tolist()):
                n = int(valid_k[r].sum())
                assert torch.equal(ids_k[r, :n], ids[row, :n])
                assert torch.allclose(p_k[r, :n], preds[row, :n], atol=1e-5), (k, r)


# --------------------------------------------------------------------------------------------------------------
# 5. Images without any salient region
# --------------------------------------------------------------------------------------------------------------

def dseq_setup(tmp_path, B, **overrides):
    """A DSeqJEPA objective on the tiny model and one batch of B images drawn at lambda = 1 (every slot keeps its
    salient region)."""
    params = tiny_params(tmp_path, **{'meta.method': 'dseq', 'meta.use_cls_token': True, 'dseq.lambda_start': 1.,
                                      'dseq.lambda_end': 1., **overrides})
    cfg = parse_config(params)
    encoder, predictor = tiny_models(True)
    encoder.train()
    target_encoder = copy.deepcopy(encoder)
    objective = DSeqJEPA(cfg, encoder, predictor, target_encoder)
    g = torch.Generator().manual_seed(0)
    batch = make_dseq_collator(cfg)([(torch.randn(3, CROP, CROP, generator=g), 0) for _ in range(B)])
    assert batch[1]['keep'].all()
    return objective, batch, encoder


def constant_then_planted(B):
    """Image 0: constant saliency (no component); the others: one bright 2 x 2 block (one component)."""
    rows = torch.zeros(B, *GRID)
    rows[1:, 1:3, 1:3] = 1.
    return rows.flatten(1)


@pytest.mark.parametrize('prediction', ['sequential', 'flat', 'chained'])
def test_image_without_salient_region_still_trains_with_fill_first_region(tmp_path, monkeypatch, prediction):
    saliency = constant_then_planted(1)
    monkeypatch.setattr(dseq, 'cls_similarity_saliency', lambda feats, cls: saliency)
    objective, batch, encoder = dseq_setup(tmp_path, 1, **{'dseq.prediction': prediction})
    loss, stats = objective(batch, 0)
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert stats['salient_regions'] == 0 and stats['steps'] >= 1
    loss.backward()
    assert sum(p.grad.abs().sum() for p in encoder.parameters() if p.grad is not None) > 0
    assert encoder.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('prediction', ['sequential', 'flat', 'chained'])
def test_without_fill_first_region_such_an_image_gives_no_loss(tmp_path, monkeypatch, prediction):
    """fill_first_region: false (the official code's behaviour): an image with no salient region has an empty
    R_1, hence no context and no step. A batch of only such images gives loss 0 (and no crash); in a mixed batch,
    the image gets no gradient while the others do."""
    saliency = constant_then_planted(1)
    monkeypatch.setattr(dseq, 'cls_similarity_saliency', lambda feats, cls: saliency)
    objective, batch, encoder = dseq_setup(tmp_path, 1, **{'dseq.prediction': prediction,
                                                                     'dseq.fill_first_region': False})
    loss, stats = objective(batch, 0)
    assert loss.item() == 0. and stats['steps'] == 0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in encoder.parameters())
    # mixed batch: image 0 without salient regions, image 1 with one; gradients with respect to the pixels
    for fill_first in (False, True):
        saliency = constant_then_planted(2)
        monkeypatch.setattr(dseq, 'cls_similarity_saliency', lambda feats, cls: saliency)
        objective, batch, encoder = dseq_setup(tmp_path, 2, **{'dseq.prediction': prediction,
                                                                         'dseq.fill_first_region': fill_first})
        (imgs, labels), draws = batch
        imgs = imgs.clone().requires_grad_(True)
        loss, _ = objective(((imgs, labels), draws), 0)
        assert math.isfinite(loss.item()) and loss.item() > 0
        grad = torch.autograd.grad(loss, imgs)[0]
        assert grad[1].abs().sum() > 0
        assert (grad[0].abs().sum() > 0) == fill_first, fill_first


# --------------------------------------------------------------------------------------------------------------
# 6. Static shapes (dseq.static_shapes): the same loss and gradients, and nothing read from the device
# --------------------------------------------------------------------------------------------------------------

def static_setup(tmp_path, monkeypatch, prediction, static):
    """The objective and one batch of 4 (lambda 0.5, fill_first_region off, so some images have empty regions or
    no context and some of their steps are skipped)."""
    saliency = constant_then_planted(4)
    monkeypatch.setattr(dseq, 'cls_similarity_saliency', lambda feats, cls: saliency)
    params = tiny_params(tmp_path, **{'meta.method': 'dseq', 'meta.use_cls_token': True,
                                      'dseq.prediction': prediction, 'dseq.fill_first_region': False,
                                      'dseq.static_shapes': static, 'dseq.lambda_start': 0.5,
                                      'dseq.lambda_end': 0.5})
    cfg = parse_config(params)
    encoder, predictor = tiny_models(True)
    encoder.train()
    objective = DSeqJEPA(cfg, encoder, predictor, copy.deepcopy(encoder))
    g = torch.Generator().manual_seed(0)
    batch = make_dseq_collator(cfg)([(torch.randn(3, CROP, CROP, generator=g), 0) for _ in range(4)])
    return objective, batch


def step_with_backward(objective, batch):
    loss, stats = objective(batch, 0)
    loss.backward()
    return loss.detach(), stats


def gradients(objective):
    return {f'{prefix}.{n}': q.grad.clone() for prefix, m in (('encoder', objective.encoder),
                                                              ('predictor', objective.predictor))
            for n, q in m.named_parameters() if q.grad is not None}


@pytest.mark.parametrize('static', [False, True], ids=['dynamic', 'static'])
@pytest.mark.parametrize('prediction', ['sequential', 'flat', 'chained'])
def test_step_backward_is_deterministic_on_the_cpu(tmp_path, monkeypatch, prediction, static):
    """The step's graph has no advanced-indexing node (`x[index_tensor]` on a tensor that needs gradients): its
    backward accumulates in a nondeterministic order on the CPU, which made two runs of the DSeq-JEPA demo end with
    weights 1e-7 apart. index_select, gather and index_copy have deterministic backwards there."""
    objective, batch = static_setup(tmp_path, monkeypatch, prediction, static)
    loss, _ = objective(batch, 0)
    nodes, stack, seen = [], [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    assert 'IndexSelectBackward0' in nodes or 'GatherBackward0' in nodes      # the walk reaches the indexing
    assert 'IndexBackward0' not in nodes and 'IndexPutBackward0' not in nodes


@pytest.mark.parametrize('prediction', ['sequential', 'flat', 'chained'])
def test_static_shapes_give_the_same_loss_and_gradients(tmp_path, monkeypatch, prediction):
    dynamic, batch = static_setup(tmp_path, monkeypatch, prediction, static=False)
    static, _ = static_setup(tmp_path, monkeypatch, prediction, static=True)
    loss, stats = step_with_backward(dynamic, batch)
    loss_s, _ = step_with_backward(static, batch)
    assert stats['steps'].item() < 5 - 1 and loss > 0      # the batch exercises skipped pairs
    assert torch.allclose(loss_s, loss, rtol=1e-5, atol=1e-7)
    grads, grads_s = gradients(dynamic), gradients(static)
    assert grads.keys() == grads_s.keys() and len(grads) > 0
    for name in grads:
        assert torch.allclose(grads_s[name], grads[name], rtol=1e-4, atol=1e-6), name


def refuse_host_reads(m):
    def refuse(*args, **kwargs):
        raise AssertionError('host synchronisation in the step')
    for name in ('item', 'tolist', '__bool__', '__int__', '__float__', '__index__', 'nonzero', 'cpu', 'numpy'):
        m.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize('prediction', ['sequential', 'flat', 'chained'])
def test_static_shapes_read_nothing_from_the_device(tmp_path, monkeypatch, prediction):
    """With static_shapes, the step (regions, curriculum, steps, encoder, predictor, loss, backward) never turns
    a tensor into a Python value. (On the CPU, connected_components stops early through torch.equal; off the CPU
    it runs its fixed number of rounds instead.)"""
    objective, batch = static_setup(tmp_path, monkeypatch, prediction, static=True)
    with monkeypatch.context() as m:
        refuse_host_reads(m)
        loss, _ = step_with_backward(objective, batch)
    assert torch.isfinite(loss).item() and loss.item() > 0
    objective, batch = static_setup(tmp_path, monkeypatch, prediction, static=False)
    with pytest.raises(AssertionError, match='host synchronisation'):   # the default path reads the sizes
        with monkeypatch.context() as m:
            refuse_host_reads(m)
            step_with_backward(objective, batch)


# --------------------------------------------------------------------------------------------------------------
# 7. End to end: every variant trains a few steps and logs the DSeq columns
# --------------------------------------------------------------------------------------------------------------

VARIANTS = {
    'default': {},
    'flat': {'dseq.prediction': 'flat'},
    'chained': {'dseq.prediction': 'chained', 'dseq.lambda_start': 1.},
    'ascending': {'dseq.order': 'ascending', 'dseq.lambda_start': 1.},
    'random_order': {'dseq.order': 'random', 'dseq.lambda_start': 1.},
    'spatial': {'dseq.order': 'spatial', 'dseq.lambda_start': 1., 'dseq.truncate_regions': 3},
    'random_blocks': {'dseq.regions': 'random_blocks'},
    'random_blocks_no_cls': {'dseq.regions': 'random_blocks', 'meta.use_cls_token': False},
    'cls_attention_all': {'dseq.saliency': 'cls_attention', 'dseq.saliency_layers': 'all', 'dseq.lambda_start': 1.,
                          'dseq.num_regions': 3},
    'per_iteration_pooled': {'dseq.curriculum': 'per_iteration', 'dseq.loss_reduction': 'pooled',
                             'dseq.lambda_start': 0.5, 'dseq.lambda_end': 0.5, 'dseq.fill_first_region': False},
    'grid_8x8': {'data.crop_size': 64, 'mask.pred_mask_scale': [0.1, 0.2], 'dseq.lambda_start': 1.,
                 'dseq.num_regions': 7, 'dseq.min_region_area': 0.05},
}


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_variant_trains_and_logs_dseq_columns(tmp_path, variant):
    params = tiny_params(tmp_path, **{'meta.method': 'dseq', 'meta.use_cls_token': True,
                                      'optimization.max_steps': 3, 'data.limit_images': 24, **VARIANTS[variant]})
    out = train_main(params)
    assert out['step'] == 3 and math.isfinite(out['loss'])
    header, rows = read_csv(tmp_path / 'jepa_r0.csv')
    assert header[:6] == ['epoch', 'itr', 'loss', 'mask-A', 'mask-B', 'time (ms)']
    assert header[6:] == ['lr', 'wd'] + DSEQ_COLUMNS
    assert [int(r['itr']) for r in rows] == [0, 1, 2]
    for r in rows:
        assert all(math.isfinite(float(r[c])) for c in ['loss'] + DSEQ_COLUMNS)
        assert 0. <= float(r['random_boxes']) <= 1. and float(r['steps']) >= 0.
    cfg = parse_config(params).dseq
    total = 2 * 3                              # epochs x (24 images / batch 8): lambda reaches lambda_end there
    expected = [cfg.lambda_start + (cfg.lambda_end - cfg.lambda_start) * s / total for s in range(3)]
    assert [float(r['lambda']) for r in rows] == pytest.approx(expected, abs=1e-5)
    if cfg.regions == 'random_blocks':
        assert all(float(r['salient_regions']) == 0 and float(r['random_boxes']) == 1 for r in rows)
    if cfg.lambda_start == 1.:                 # every slot keeps its salient region, except fill-ins of R_1
        assert all(float(r['random_boxes']) <= 1 / (cfg.num_regions - 1) + 1e-6 for r in rows)


# --------------------------------------------------------------------------------------------------------------
# 7. Resume: N steps straight == N/2 steps, stop, resume, N/2 steps (lambda is a function of the step)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('num_workers', [0, 2])
def test_dseq_resume_is_bit_for_bit(tmp_path, num_workers):
    """Also with data-loader workers: the collator's draws follow the global step, not the worker."""
    def params(folder, steps):
        return tiny_params(folder, **{'meta.method': 'dseq', 'meta.use_cls_token': True, 'data.limit_images': 32,
                                      'data.num_workers': num_workers, 'optimization.max_steps': steps})
    rows_a, rows_b = train_straight_and_resumed(train_main, params, tmp_path, steps=6, split_at=3)
    assert len(rows_a) == len(rows_b) == 6
    for column in ['loss'] + DSEQ_STATS:
        assert [r[column] for r in rows_a] == [r[column] for r in rows_b], column
    # lambda follows the global step (2 epochs x 4 batches), in the resumed run and with workers
    assert [float(r['lambda']) for r in rows_b] == pytest.approx([s / 8 for s in range(6)], abs=1e-5)
