"""DSeq-JEPA variants: column_mean attention, Grad-CAM saliency, the 'blocks' generator (NMS), end to end."""
import math

import pytest
import torch
import torch.nn.functional as F

from src.helper import init_model
from src.objectives.dseq import gradcam_saliency, select_blocks
from src.train import main as train_main
from tests.helpers import read_csv, tiny_params

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures('one_thread')]


def tiny_encoder(cls=True):
    torch.manual_seed(0)
    encoder, _ = init_model('cpu', patch_size=8, model_name='vit_pico', crop_size=32, pred_depth=1,
                            pred_emb_dim=16, use_cls_token=cls)
    return encoder.eval()


def explicit_attention(blk, x):
    """softmax(q k^T * scale) of one block on input x (before norm1), all heads: [B, h, T, T]."""
    B, T, C = x.shape
    h = blk.attn.num_heads
    qkv = blk.attn.qkv(blk.norm1(x)).reshape(B, T, 3, h, C // h).permute(2, 0, 3, 1, 4)
    return ((qkv[0] @ qkv[1].transpose(-2, -1)) * blk.attn.scale).softmax(dim=-1)


@pytest.mark.parametrize('cls', [True, False])
def test_attention_received_is_the_column_mean_of_the_attention(cls):
    encoder = tiny_encoder(cls)
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = encoder.forward_features(imgs, return_attn_received=(1, 2))
        x = encoder.prepare_tokens(imgs)
        expected = {}
        for i, blk in enumerate(encoder.blocks, start=1):
            expected[i] = explicit_attention(blk, x).mean(dim=(1, 2))[:, encoder.num_prefix_tokens:]
            x = blk(x)
    for i in (1, 2):
        assert torch.allclose(out['attn_received'][i], expected[i], atol=1e-6)
    # chunking over queries does not change it
    with torch.no_grad():
        x = encoder.prepare_tokens(imgs)
        small = encoder.blocks[0].attn.attention_received(encoder.blocks[0].norm1(x), chunk=3)
    assert torch.allclose(small[:, encoder.num_prefix_tokens:], expected[1], atol=1e-6)


def test_gradcam_matches_a_hooked_reference():
    encoder = tiny_encoder(True)
    imgs = torch.randn(2, 3, 32, 32)
    out, saliency = gradcam_saliency(encoder, imgs, block=1)
    # reference: keep block 1's output through a hook and differentiate the final [CLS] similarity
    store = {}

    def hook(_, __, output):
        output.retain_grad()
        store['a'] = output
    handle = encoder.blocks[0].register_forward_hook(hook)
    with torch.enable_grad():
        final = encoder(imgs)                                   # (B, N, D), normalised
        y = (final @ encoder.cls_token.reshape(-1, 1)).sum() / math.sqrt(final.shape[-1])
        y.backward()
    handle.remove()
    a, grad = store['a'][:, 1:], store['a'].grad[:, 1:]
    expected = torch.relu((a * grad.mean(dim=1, keepdim=True)).sum(-1))
    assert torch.allclose(saliency, expected.detach(), atol=1e-6)
    assert torch.allclose(out, final.detach(), atol=1e-6)
    assert (saliency >= 0).all() and saliency.shape == (2, 16)


def reference_nms(s, candidates, k, thr):
    """Per image: score = mean normalised saliency in the box; greedy NMS, best first."""
    out = torch.zeros(candidates.shape[0], k, candidates.shape[2], dtype=torch.bool)
    for b in range(candidates.shape[0]):
        ss = (s[b] - s[b].min()) / (s[b].max() - s[b].min() + 1e-6)
        boxes = [c for c in candidates[b]]
        scores = [float(ss[c].mean()) if c.any() else -math.inf for c in boxes]
        alive = [bool(c.any()) for c in boxes]
        for j in range(k):
            best = max((i for i in range(len(boxes)) if alive[i]), key=lambda i: (scores[i], -i), default=None)
            if best is None:
                break
            out[b, j] = boxes[best]
            for i in range(len(boxes)):
                inter = (boxes[i] & boxes[best]).sum().item()
                union = (boxes[i] | boxes[best]).sum().item()
                if inter / max(union, 1) > thr:
                    alive[i] = False
            alive[best] = False
    return out


def test_select_blocks_is_greedy_nms_on_mean_saliency():
    from src.masks.saliency import random_boxes
    g = torch.Generator().manual_seed(0)
    for thr in (0.2, 0.5):
        candidates = random_boxes(16, 12, (8, 8), (0.1, 0.3), (0.75, 1.5), generator=g)
        s = torch.randn(16, 64, generator=g)
        assert torch.equal(select_blocks(s, candidates, 4, thr), reference_nms(s, candidates, 4, thr))


@pytest.mark.parametrize('variant', [
    {'dseq.saliency': 'column_mean', 'meta.use_cls_token': False},
    {'dseq.saliency': 'column_mean', 'dseq.saliency_layers': 'all'},
    {'dseq.saliency': 'gradcam'},
    {'dseq.saliency_encoder': 'context'},
    {'dseq.regions': 'blocks', 'dseq.num_candidates': 8},
], ids=['column_mean_no_cls', 'column_mean_all', 'gradcam', 'context_encoder', 'blocks'])
def test_variant_trains(tmp_path, variant):
    params = tiny_params(tmp_path, **{'meta.method': 'dseq', 'meta.use_cls_token': True, 'dseq.lambda_start': 1.0,
                                      'optimization.max_steps': 3, 'logging.log_freq': 1, **variant})
    params['data']['crop_size'] = 64                 # an 8x8 grid
    out = train_main(params)
    assert out['step'] == 3 and math.isfinite(out['loss'])
    header, rows = read_csv(tmp_path / 'jepa_r0.csv')
    assert header[8:] == ['lambda', 'salient_regions', 'region_size', 'random_boxes', 'steps', 'saliency_ms']
    assert all(float(r['steps']) > 0 for r in rows)


def test_blocks_regions_put_the_context_first():
    from src.config import parse_config
    from src.objectives.dseq import DSeqJEPA
    from src.masks.saliency import random_boxes
    cfg = parse_config({'meta': {'method': 'dseq', 'use_cls_token': True, 'model_name': 'vit_pico'},
                        'data': {'dataset': 'synthetic', 'crop_size': 64}, 'mask': {'patch_size': 8},
                        'dseq': {'regions': 'blocks'}})
    encoder = tiny_encoder(True)
    obj = DSeqJEPA(cfg, encoder, None, encoder)
    obj.grid_size = (8, 8)
    g = torch.Generator().manual_seed(1)
    draws = {'candidates': random_boxes(4, 16, (8, 8), (0.1, 0.2), (0.75, 1.5), generator=g),
             'boxes': random_boxes(4, 4, (8, 8), (0.1, 0.2), (0.75, 1.5), generator=g),
             'keep': torch.ones(4, 4, dtype=torch.bool), 'order_noise': torch.rand(4, 4, generator=g)}
    regions, _, salient = obj.make_regions(torch.randn(4, 64, generator=g), draws)
    assert regions.shape == (4, 5, 64)
    assert (regions.sum(dim=1) == 1).all()                                   # disjoint and covering
    assert torch.equal(regions[:, 0], ~salient.any(dim=1))                   # context = outside the blocks
    assert F.one_hot(regions.float().argmax(dim=1), 5).bool().permute(0, 2, 1).equal(regions)


def test_length_buckets_partition_and_bound_the_padding():
    from src.models.predictor import length_buckets
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (300,), generator=g).tolist()
    for max_buckets in (1, 2, 4):
        groups = length_buckets(lengths, max_buckets)
        assert 1 <= len(groups) <= max_buckets
        assert sorted(i for grp in groups for i in grp) == list(range(len(lengths)))
        for grp in groups[:-1]:                      # every closed group keeps its padding under 25%
            assert min(lengths[i] for i in grp) >= 0.75 * max(lengths[i] for i in grp)
    assert length_buckets([5, 5, 5], 4) == [[0, 1, 2]]


def test_bucketed_prediction_equals_one_padded_batch():
    from src.models.predictor import plan_steps, predict_pairs
    from src.objectives.dseq import apply_curriculum
    from src.masks.saliency import random_boxes
    torch.manual_seed(0)
    encoder, predictor = init_model('cpu', patch_size=8, model_name='vit_pico', crop_size=64, pred_depth=2,
                                    pred_emb_dim=16, use_cls_token=True)
    g = torch.Generator().manual_seed(2)
    boxes = random_boxes(6, 4, (8, 8), (0.1, 0.3), (0.75, 1.5), generator=g)
    regions, _ = apply_curriculum(torch.zeros_like(boxes), boxes, torch.zeros(6, 4, dtype=torch.bool))
    context, target = plan_steps(regions, 'sequential')
    imgs = torch.randn(6, 3, 64, 64, generator=g)
    from src.models.predictor import length_buckets
    kept = context.any(2) & target.any(2)
    lengths = (context.sum(2) + target.sum(2))[kept].tolist()
    assert len(length_buckets(lengths, 4)) > 1                               # the test really splits
    with torch.no_grad():
        one = predict_pairs(encoder, predictor, imgs, context, target, max_buckets=1)
        many = predict_pairs(encoder, predictor, imgs, context, target, max_buckets=4)
    assert torch.equal(one[3], many[3])                                      # same pairs, same order
    for r in range(len(one[3])):
        n = int(one[2][r].sum())
        assert int(many[2][r].sum()) == n and torch.equal(one[1][r, :n], many[1][r, :n])
        assert torch.allclose(one[0][r, :n], many[0][r, :n], atol=1e-5)
