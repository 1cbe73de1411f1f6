# Tests of the ViT encoder and I-JEPA predictor (src/models/vision_transformer.py), checkpoint loading
# (src/helper.py) and the tensor helpers they use.
#
# The equivalence tests compare our modules with a plain reference written below from SPEC section 3, with
# ijepa's parameter names (SPEC section 2), so that state dicts move between the two with strict loading.
# Dimensions: B batch, N patches, K kept tokens, D encoder width, Dp predictor width, h heads.

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import src.models.vision_transformer as vit
from src.helper import init_model, init_opt, load_checkpoint
from src.masks.utils import apply_masks
from src.utils.tensors import repeat_interleave_batch

pytestmark = pytest.mark.timeout(120)

CROP, PATCH = 32, 8
GRID = CROP // PATCH            # 4 x 4 patches
N = GRID * GRID
PICO = dict(embed_dim=32, depth=2, num_heads=2)
PRED_DEPTH, PRED_DIM = 2, 16


# --------------------------------------------------------------------------------------------------------------
# Reference implementation
# --------------------------------------------------------------------------------------------------------------

def ref_sincos_table(dim, grid_h, grid_w):
    """MAE 2-D sin-cos table in float64, raster order: first half of channels = column, second half = row."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angles = np.outer(pos.astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    idx = np.arange(grid_h * grid_w)
    rows, cols = idx // grid_w, idx % grid_w
    return torch.from_numpy(np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1))


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        hd = D // self.heads
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, hd).permute(2, 0, 3, 1, 4)   # (B, h, T, hd) each
        attn = torch.softmax(q @ k.transpose(-2, -1) * hd ** -0.5, dim=-1)                  # (B, h, T, T)
        out = (attn @ v).transpose(1, 2).reshape(B, T, D)
        return self.proj(out), attn


class RefMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        y, attn = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x)), attn


class RefEncoder(nn.Module):
    def __init__(self, grid=(GRID, GRID), patch=PATCH, dim=32, depth=2, heads=2, cls_token=False):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(ref_sincos_table(dim, *grid).float()[None], requires_grad=False)
        if cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([RefBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def run(self, x, masks=None, pos_embed=None):
        """Returns (final patch tokens, final [CLS] or None, raw outputs of each block, attention of each block)."""
        pos = self.pos_embed if pos_embed is None else pos_embed
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + pos            # (B, N, D)
        if masks is not None:
            t = torch.stack([t[b, m[b]] for m in masks for b in range(len(t))])    # (len(masks)*B, K, D)
        P = 1 if hasattr(self, 'cls_token') else 0
        if P:
            t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1)
        outs, attns = [], []
        for blk in self.blocks:
            t, a = blk(t)
            outs.append(t[:, P:])
            attns.append(a)
        t = self.norm(t)
        return t[:, P:], (t[:, 0] if P else None), outs, attns

    def forward(self, x, masks=None):
        return self.run(x, masks)[0]


class RefPredictor(nn.Module):
    def __init__(self, grid=(GRID, GRID), dim=32, pred_dim=PRED_DIM, depth=PRED_DEPTH, heads=2):
        super().__init__()
        self.predictor_embed = nn.Linear(dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.predictor_pos_embed = nn.Parameter(ref_sincos_table(pred_dim, *grid).float()[None],
                                                requires_grad=False)
        self.predictor_blocks = nn.ModuleList([RefBlock(pred_dim, heads) for _ in range(depth)])
        self.predictor_norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(pred_dim, dim)

    def forward(self, z, masks_x, masks):
        pos = self.predictor_pos_embed[0]                                         # (N, Dp)
        B = len(z) // len(masks_x)
        seqs = []
        for tgt in masks:                       # block-major: target block, then context block, then image
            for i, ctx in enumerate(masks_x):
                for b in range(B):
                    context = self.predictor_embed(z[i * B + b]) + pos[ctx[b]]    # (K_ctx, Dp)
                    queries = self.mask_token[0] + pos[tgt[b]]                    # (K_tgt, Dp)
                    seqs.append(torch.cat([context, queries]))
        t = torch.stack(seqs)
        for blk in self.predictor_blocks:
            t = blk(t)[0]
        return self.predictor_proj(self.predictor_norm(t[:, masks_x[0].shape[1]:]))


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------

def randomise_(module, seed):
    """Give every trainable parameter non-trivial values (init has zero biases and unit LayerNorm weights, which
    would hide a missing bias or affine term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def random_masks(num, B, K, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.stack([torch.randperm(n, generator=g)[:K].sort().values for _ in range(B)]) for _ in range(num)]


def build_pico(**kwargs):
    encoder, predictor = init_model(torch.device('cpu'), patch_size=PATCH, model_name='vit_pico', crop_size=CROP,
                                    pred_depth=PRED_DEPTH, pred_emb_dim=PRED_DIM, **kwargs)
    return encoder, predictor


def close(a, b, atol=1e-5):
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# 1. Equivalence with the reference (both directions of weight transfer)
# --------------------------------------------------------------------------------------------------------------

def test_parameter_names_are_ijepas():
    encoder, predictor = build_pico()
    enc_names = set(encoder.state_dict())
    expected = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'pos_embed', 'norm.weight', 'norm.bias'}
    for i in range(PICO['depth']):
        for part in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
            expected |= {f'blocks.{i}.{part}.weight', f'blocks.{i}.{part}.bias'}
    assert enc_names == expected
    pred_names = set(predictor.state_dict())
    expected = {'predictor_embed.weight', 'predictor_embed.bias', 'mask_token', 'predictor_pos_embed',
                'predictor_norm.weight', 'predictor_norm.bias', 'predictor_proj.weight', 'predictor_proj.bias'}
    for i in range(PRED_DEPTH):
        for part in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
            expected |= {f'predictor_blocks.{i}.{part}.weight', f'predictor_blocks.{i}.{part}.bias'}
    assert pred_names == expected


def test_pos_embed_is_sincos_table():
    encoder, predictor = build_pico()
    assert encoder.pos_embed.shape == (1, N, 32) and not encoder.pos_embed.requires_grad
    assert torch.allclose(encoder.pos_embed[0].double(), ref_sincos_table(32, GRID, GRID), atol=1e-6)
    assert torch.allclose(predictor.predictor_pos_embed[0].double(), ref_sincos_table(PRED_DIM, GRID, GRID),
                          atol=1e-6)
    # non-square grid: columns in the first half, rows in the second
    enc = vit.vit_pico(img_size=[48, 32], patch_size=PATCH)
    assert enc.pos_embed.shape == (1, 6 * 4, 32)
    assert torch.allclose(enc.pos_embed[0].double(), ref_sincos_table(32, 6, 4), atol=1e-6)
    assert not torch.allclose(enc.pos_embed[0].double(), ref_sincos_table(32, 4, 6), atol=1e-3)


def _check_outputs(encoder, predictor, ref_enc, ref_pred, seed=0):
    torch.manual_seed(seed)
    B = 2
    x = torch.randn(B, 3, CROP, CROP)
    with torch.no_grad():
        assert close(encoder(x), ref_enc(x))
        two = random_masks(2, B, 7, seed=seed)
        assert close(encoder(x, two), ref_enc(x, two))
        assert close(encoder(x, two[0]), ref_enc(x, two[:1]))       # a single tensor is one mask
        for nenc, npred in ((1, 3), (2, 2)):
            masks_x = random_masks(nenc, B, 9, seed=seed + 1)
            masks = random_masks(npred, B, 4, seed=seed + 2)
            z = encoder(x, masks_x)                                 # (nenc*B, 9, D)
            out = predictor(z, masks_x, masks)
            assert out.shape == (npred * nenc * B, 4, 32)
            assert close(out, ref_pred(z, masks_x, masks))


def test_ours_equals_reference_with_our_weights():
    torch.manual_seed(0)
    encoder, predictor = build_pico()
    randomise_(encoder, 1)
    randomise_(predictor, 2)
    ref_enc, ref_pred = RefEncoder(), RefPredictor()
    ref_enc.load_state_dict(encoder.state_dict(), strict=True)
    ref_pred.load_state_dict(predictor.state_dict(), strict=True)
    _check_outputs(encoder.eval(), predictor.eval(), ref_enc, ref_pred)


def test_ijepa_checkpoint_with_module_prefix_loads_through_load_checkpoint(tmp_path):
    torch.manual_seed(0)
    ref_enc, ref_pred, ref_target = RefEncoder(), RefPredictor(), RefEncoder()
    for i, m in enumerate((ref_enc, ref_pred, ref_target)):
        randomise_(m, 10 + i)

    # an optimizer state laid out as ijepa's: AdamW over four groups (weights of encoder, predictor, then
    # biases / 1-D parameters of each), after one step so that it holds per-parameter state
    def groups(enc, pred):
        def pick(model, decay):
            return [p for n, p in model.named_parameters() if (('bias' not in n) and p.ndim != 1) == decay]
        return [{'params': pick(enc, True)}, {'params': pick(pred, True)},
                {'params': pick(enc, False), 'WD_exclude': True, 'weight_decay': 0},
                {'params': pick(pred, False), 'WD_exclude': True, 'weight_decay': 0}]
    ref_opt = torch.optim.AdamW(groups(ref_enc, ref_pred), lr=1e-3)
    x = torch.randn(2, 3, CROP, CROP)
    masks_x, masks = random_masks(1, 2, 9), random_masks(2, 2, 4, seed=1)
    ref_pred(ref_enc(x, masks_x), masks_x, masks).pow(2).mean().backward()
    ref_opt.step()

    def ddp(sd):
        return {f'module.{k}': v for k, v in sd.items()}
    path = tmp_path / 'jepa-latest.pth.tar'
    torch.save({'encoder': ddp(ref_enc.state_dict()), 'predictor': ddp(ref_pred.state_dict()),
                'target_encoder': ddp(ref_target.state_dict()), 'opt': ref_opt.state_dict(), 'scaler': None,
                'epoch': 7, 'loss': 0.5, 'batch_size': 2, 'world_size': 1, 'lr': 1e-3}, path)

    encoder, predictor = build_pico()
    target_encoder = copy.deepcopy(encoder)
    opt, scaler, _, _ = init_opt(encoder, predictor, iterations_per_epoch=10, start_lr=1e-4, ref_lr=1e-3, warmup=1,
                                 num_epochs=2)
    encoder, predictor, target_encoder, opt, scaler, epoch = load_checkpoint(
        torch.device('cpu'), str(path), encoder, predictor, target_encoder, opt, scaler)
    assert epoch == 7
    _check_outputs(encoder.eval(), predictor.eval(), ref_enc, ref_pred)
    with torch.no_grad():
        assert close(target_encoder(x), ref_target(x))
        assert not close(target_encoder(x), ref_enc(x))
    # the optimizer state lands on the parameters of the same names
    ref_params = {**{f'e.{n}': p for n, p in ref_enc.named_parameters()},
                  **{f'p.{n}': p for n, p in ref_pred.named_parameters()}}
    ours = {**{f'e.{n}': p for n, p in encoder.named_parameters()},
            **{f'p.{n}': p for n, p in predictor.named_parameters()}}
    with_state = 0
    for name, p in ours.items():
        ref_state = ref_opt.state.get(ref_params[name], {})
        state = opt.state.get(p, {})
        assert set(state) == set(ref_state), name
        if 'exp_avg' in state:
            with_state += 1
            assert torch.equal(state['exp_avg'], ref_state['exp_avg']), name
    assert with_state == sum(p.requires_grad for p in ours.values())


# --------------------------------------------------------------------------------------------------------------
# 2. Size registry
# --------------------------------------------------------------------------------------------------------------

SMALL = [name for name, size in vit.VIT_SIZES.items() if size['embed_dim'] <= 192]
LARGE = [name for name in vit.VIT_SIZES if name not in SMALL]
# (width, depth, heads, MLP hidden width) from SPEC section 3, plus our test size
EXPECTED_SIZES = {'vit_pico': (32, 2, 2, 128), 'vit_tiny': (192, 12, 3, 768), 'vit_small': (384, 12, 6, 1536),
                  'vit_base': (768, 12, 12, 3072), 'vit_large': (1024, 24, 16, 4096),
                  'vit_huge': (1280, 32, 16, 5120), 'vit_giant': (1408, 40, 16, 6144)}


def test_registry_has_ijepa_sizes():
    assert set(EXPECTED_SIZES) <= set(vit.VIT_SIZES)
    assert {'vit_pico', 'vit_nano', 'vit_micro', 'vit_tiny'} <= set(SMALL)
    for name in vit.VIT_SIZES:
        assert callable(getattr(vit, name))


@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('use_cls_token', [False, True])
def test_small_sizes_forward_backward(name, use_cls_token):
    torch.manual_seed(0)
    encoder, predictor = init_model(torch.device('cpu'), patch_size=PATCH, model_name=name, crop_size=CROP,
                                    pred_depth=1, pred_emb_dim=8 * vit.VIT_SIZES[name]['num_heads'],
                                    use_cls_token=use_cls_token)   # predictor heads = encoder heads
    D = vit.VIT_SIZES[name]['embed_dim']
    assert encoder.embed_dim == D and len(encoder.blocks) == vit.VIT_SIZES[name]['depth']
    if name in EXPECTED_SIZES:
        width, depth, heads, hidden = EXPECTED_SIZES[name]
        assert (encoder.embed_dim, len(encoder.blocks), encoder.num_heads) == (width, depth, heads)
        assert encoder.blocks[0].mlp.fc1.out_features == hidden
    B = 2
    x = torch.randn(B, 3, CROP, CROP)
    masks_x, masks = random_masks(1, B, 10), random_masks(2, B, 4, seed=1)
    full = encoder(x)
    assert full.shape == (B, N, D)
    pred = predictor(encoder(x, masks_x), masks_x, masks)
    assert pred.shape == (2 * B, 4, D)
    loss = F.smooth_l1_loss(pred, torch.randn_like(pred))
    loss.backward()
    assert torch.isfinite(loss)
    for model in (encoder, predictor):
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen == ({'pos_embed'} if model is encoder else {'predictor_pos_embed'})
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None, n
                assert torch.isfinite(p.grad).all(), n
                assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize('name', LARGE)
def test_large_sizes_shapes_on_meta_device(name, monkeypatch):
    # the constructor turns its drop-path schedule into Python floats, which a meta tensor cannot do: compute
    # that one schedule on the CPU; every parameter is still allocated on the meta device (no memory)
    linspace = torch.linspace
    monkeypatch.setattr(torch, 'linspace', lambda *a, **k: linspace(*a, **{**k, 'device': 'cpu'}))
    with torch.device('meta'):
        model = getattr(vit, name)(img_size=[224], patch_size=14)
    assert all(p.is_meta for p in model.parameters())
    width, depth, heads, hidden = EXPECTED_SIZES[name]
    assert (model.embed_dim, len(model.blocks), model.num_heads) == (width, depth, heads)
    blk = model.blocks[depth - 1]
    assert blk.attn.num_heads == heads and blk.attn.qkv.weight.shape == (3 * width, width)
    assert blk.mlp.fc1.weight.shape == (hidden, width) and blk.mlp.fc2.weight.shape == (width, hidden)
    assert model.pos_embed.shape == (1, 16 * 16, width)


# --------------------------------------------------------------------------------------------------------------
# 3. forward_features and the optional [CLS] token
# --------------------------------------------------------------------------------------------------------------

def _pico_pair(depth=2, use_cls_token=False, seed=0):
    torch.manual_seed(seed)
    ours = randomise_(vit.vit_pico(img_size=[CROP], patch_size=PATCH, depth=depth, use_cls_token=use_cls_token),
                      seed + 1).eval()
    ref = RefEncoder(depth=depth, cls_token=use_cls_token)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def test_forward_features_x_and_blocks():
    ours, ref = _pico_pair(depth=3)
    x = torch.randn(2, 3, CROP, CROP)
    masks = random_masks(2, 2, 6)
    with torch.no_grad():
        for m in (None, masks):
            out = ours.forward_features(x, masks=m, return_blocks=(1, 2, 3))
            assert torch.allclose(out['x'], ours(x, m), atol=1e-6)
            assert out['cls'] is None
            _, _, blocks, _ = ref.run(x, m)
            assert set(out['blocks']) == {1, 2, 3}
            for l in (1, 2, 3):
                assert close(out['blocks'][l], blocks[l - 1]), l      # raw output of block l (1-based)
            assert not close(out['blocks'][3], out['x'])             # raw, not normalised


def test_cls_attention_row_equals_explicit_softmax():
    ours, ref = _pico_pair(depth=3, use_cls_token=True)
    x = torch.randn(2, 3, CROP, CROP)
    masks = random_masks(1, 2, 7)
    with torch.no_grad():
        for m, K in ((None, N), (masks, 7)):
            out = ours.forward_features(x, masks=m, return_cls_attn=(2,))
            _, cls, _, attns = ref.run(x, m)
            full = attns[1]                                          # (B, h, 1 + K, 1 + K), block 2
            assert full.shape == (2, 2, 1 + K, 1 + K)
            assert set(out['cls_attn']) == {2}
            assert close(out['cls_attn'][2], full[:, :, 0, 1:])      # [CLS] query row over the patch keys
            assert close(out['cls'], cls)


def test_cls_attention_without_cls_token_raises():
    ours, _ = _pico_pair()
    with pytest.raises(ValueError, match='CLS'):
        ours.forward_features(torch.randn(1, 3, CROP, CROP), return_cls_attn=(1,))


def test_cls_token_model():
    ours, ref = _pico_pair(use_cls_token=True)
    assert 'cls_token' in ours.state_dict()
    plain, _ = _pico_pair(use_cls_token=False)
    assert 'cls_token' not in plain.state_dict()
    x = torch.randn(2, 3, CROP, CROP)
    masks = random_masks(2, 2, 5)
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (2, N, 32)                               # patch tokens only
        assert close(out, ref(x))
        masked = ours(x, masks)
        assert masked.shape == (4, 5, 32)
        assert close(masked, ref(x, masks))                          # [CLS] is kept beside the masked tokens
        # the [CLS] token takes part in attention: dropping it changes the patch outputs
        ref_nocls = RefEncoder()
        ref_nocls.load_state_dict({k: v for k, v in ours.state_dict().items() if k != 'cls_token'})
        assert not close(out, ref_nocls(x), atol=1e-3)


# --------------------------------------------------------------------------------------------------------------
# 4. Position-embedding interpolation
# --------------------------------------------------------------------------------------------------------------

def ref_interpolate(table, src, dst):
    D = table.shape[-1]
    grid = table.reshape(1, src[0], src[1], D).permute(0, 3, 1, 2)                    # (1, D, h, w)
    grid = F.interpolate(grid, size=dst, mode='bicubic', align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, dst[0] * dst[1], D)


@pytest.mark.parametrize('size', [(48, 48), (48, 40), (24, 40)])
def test_pos_embed_interpolation(size):
    ours, ref = _pico_pair()
    stored = ours.pos_embed.detach().clone()
    grid = (size[0] // PATCH, size[1] // PATCH)
    expected = ref_interpolate(stored, (GRID, GRID), grid)
    # interpolation is not the same as a fresh sin-cos table of the new grid (so the checks below tell them apart)
    assert not torch.allclose(expected.double(), ref_sincos_table(32, *grid)[None], atol=1e-2)
    tokens = torch.zeros(1, grid[0] * grid[1], 32)
    assert torch.allclose(ours.interpolate_pos_encoding(tokens, ours.pos_embed, grid), expected, atol=1e-6)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (2, grid[0] * grid[1], 32)
        assert close(out, ref.run(x, pos_embed=expected)[0])
        m = random_masks(1, 2, 5, n=grid[0] * grid[1])
        assert close(ours(x, m), ref.run(x, m, pos_embed=expected)[0])
    assert torch.equal(ours.pos_embed, stored)                      # the stored table is not modified


def test_pos_embed_same_size_unchanged():
    ours, _ = _pico_pair()
    tokens = torch.zeros(1, N, 32)
    assert torch.equal(ours.interpolate_pos_encoding(tokens, ours.pos_embed, (GRID, GRID)), ours.pos_embed)
    assert torch.equal(ours.interpolate_pos_encoding(tokens, ours.pos_embed), ours.pos_embed)
    assert torch.equal(vit.interpolate_pos_embed(ours.pos_embed, (GRID, GRID), (GRID, GRID)), ours.pos_embed)


# --------------------------------------------------------------------------------------------------------------
# 5. Initialisation
# --------------------------------------------------------------------------------------------------------------

def _std_ok(w, target):
    """Sample std of w within a tolerance that is tight for large layers (several standard errors)."""
    tol = max(0.04, 6 / math.sqrt(2 * w.numel()))
    return abs(w.std().item() / target - 1) < tol and abs(w.mean().item()) < 6 * target / math.sqrt(w.numel())


@pytest.mark.parametrize('init_rescale', [False, True])
def test_initialisation(init_rescale):
    torch.manual_seed(0)
    encoder, predictor = init_model(torch.device('cpu'), patch_size=PATCH, model_name='vit_tiny', crop_size=CROP,
                                    pred_depth=3, pred_emb_dim=192, init_rescale=init_rescale)
    checked = 0
    for model, blocks_prefix in ((encoder, 'blocks'), (predictor, 'predictor_blocks')):
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                target = 0.02
                parts = name.split('.')
                if init_rescale and parts[0] == blocks_prefix and name.endswith(('attn.proj', 'mlp.fc2')):
                    target = 0.02 / math.sqrt(2 * (int(parts[1]) + 1))
                assert _std_ok(m.weight.detach(), target), (name, m.weight.std().item(), target)
                assert m.bias is not None and torch.all(m.bias == 0), name
                checked += 1
            elif isinstance(m, nn.LayerNorm):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
                assert m.eps == 1e-6
    assert checked == 1 + 4 * 12 + 2 + 4 * 3
    # the rescale is actually distinguishable at this size: block 11's proj differs a lot between the modes
    std_last = encoder.blocks[11].attn.proj.weight.std().item()
    assert (std_last < 0.006) if init_rescale else (std_last > 0.018)


# --------------------------------------------------------------------------------------------------------------
# 6. Tensor helpers
# --------------------------------------------------------------------------------------------------------------

def test_apply_masks_equals_gather_loops():
    torch.manual_seed(0)
    B, D = 3, 5
    x = torch.randn(B, N, D)
    for num in (1, 3):
        masks = random_masks(num, B, 6, seed=num)
        expected = torch.stack([x[b, m[b]] for m in masks for b in range(B)])   # (num*B, K, D)
        assert torch.equal(apply_masks(x, masks), expected)


@pytest.mark.parametrize('repeat', [1, 2, 3])
def test_repeat_interleave_batch_equals_loops(repeat):
    B, chunks = 2, 3
    x = torch.randn(chunks * B, 4, 5)
    rows = []
    for i in range(chunks):              # each chunk of B rows is repeated `repeat` times in place
        for _ in range(repeat):
            for b in range(B):
                rows.append(x[i * B + b])
    assert torch.equal(repeat_interleave_batch(x, B, repeat=repeat), torch.stack(rows))
