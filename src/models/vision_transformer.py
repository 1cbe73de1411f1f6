# Vision Transformer encoder and I-JEPA predictor, parameter-compatible with facebookresearch/ijepa.
#
# Dimensions used in shape comments:
#   B  batch                 N  patches of the image (grid_h * grid_w)
#   K  kept (visible) tokens  D  encoder width            Dp predictor width
#   h  attention heads       hd head width (D / h)        P  prefix tokens (1 with [CLS], else 0)
#
# Parameter names follow ijepa exactly (patch_embed.proj, pos_embed, blocks.{i}.attn.qkv, ..., predictor_embed,
# mask_token, predictor_pos_embed, predictor_blocks.{i}..., predictor_norm, predictor_proj), so ijepa checkpoints
# load and give the same outputs. The optional [CLS] token adds one parameter, `cls_token`.

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.masks.utils import apply_masks
from src.utils.tensors import repeat_interleave_batch, true_first, trunc_normal_


# --------------------------------------------------------------------------------------------------------------
# Position embeddings (fixed 2-D sin-cos, MAE formula; ijepa stores them without a [CLS] row)
# --------------------------------------------------------------------------------------------------------------

def _to_2tuple(x):
    if isinstance(x, (list, tuple)):
        return (int(x[0]), int(x[-1]))
    return (int(x), int(x))


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """Sin-cos embedding of the positions `pos` (any shape, flattened): returns float64 [M, embed_dim]."""
    assert embed_dim % 2 == 0, 'sin-cos position embedding needs an even width'
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.)
    omega = 1. / 10000 ** omega                                      # (D/2,)
    out = torch.outer(torch.as_tensor(pos, dtype=torch.float64).reshape(-1), omega)  # (M, D/2)
    return torch.cat([out.sin(), out.cos()], dim=1)                  # (M, D)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """Fixed 2-D sin-cos embedding of a (grid_h, grid_w) grid in raster order: float64 [grid_h*grid_w, D].

    As in MAE/ijepa the first half of the channels encodes the column index, the second half the row index.
    With `cls_token` a zero row is prepended.
    """
    gh, gw = _to_2tuple(grid_size)
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64),
                                torch.arange(gw, dtype=torch.float64), indexing='ij')  # (gh, gw) each
    emb = torch.cat([get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols),
                     get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows)], dim=1)  # (gh*gw, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb


def interpolate_pos_embed(pos_embed, src_grid, dst_grid):
    """Bicubic resize of a patch position embedding [1, src_h*src_w, D] to [1, dst_h*dst_w, D] (no [CLS] row)."""
    src_grid, dst_grid = _to_2tuple(src_grid), _to_2tuple(dst_grid)
    if src_grid == dst_grid:
        return pos_embed
    D = pos_embed.shape[-1]
    if pos_embed.shape[1] != src_grid[0] * src_grid[1]:
        raise ValueError(f'pos_embed has {pos_embed.shape[1]} rows, expected {src_grid[0]}x{src_grid[1]}')
    grid = pos_embed.reshape(1, src_grid[0], src_grid[1], D).permute(0, 3, 1, 2)   # (1, D, sh, sw)
    grid = F.interpolate(grid.float(), size=dst_grid, mode='bicubic', align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, dst_grid[0] * dst_grid[1], D).to(pos_embed.dtype)


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------

def drop_path(x, drop_prob: float = 0., training: bool = False, packing=None):
    """Stochastic depth: drop the whole residual branch of a sample with probability `drop_prob` (with `packing`,
    x holds packed tokens [T, D] and a sample is a row of the padded batch)."""
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1 - drop_prob
    if packing is not None:
        keep = x.new_empty(packing.shape[0]).bernoulli_(keep_prob)[packing.rows].unsqueeze(-1)   # (T, 1)
    else:
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * keep / keep_prob


class DropPath(nn.Module):
    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x, packing=None):
        return drop_path(x, self.drop_prob or 0., self.training, packing)


class Packing:
    """The real tokens of a padded batch [M, L, ...] (valid [M, L], True = real token) stored densely as [T, ...],
    T = number of real tokens, so that the per-token layers (LayerNorm, Linear, MLP) do no work on padding.
    Attention unpacks to [M, L] for its masked product and packs its output again.

    num_valid: T, which must equal valid.sum(); known to the caller, so building the index reads nothing from the
    device (torch.nonzero_static; where a torch build lacks it for the device, nonzero, which does read).
    """

    def __init__(self, valid, num_valid):
        self.shape = valid.shape                                                # (M, L)
        flat = valid.reshape(-1)
        if num_valid == 0:
            self.index = torch.zeros(0, dtype=torch.long, device=valid.device)
        else:
            try:
                self.index = torch.nonzero_static(flat, size=num_valid).squeeze(1)   # (T,) into M * L
            except NotImplementedError:                       # no kernel for this device in older torch builds
                self.index = flat.nonzero().squeeze(1)
        self.rows = self.index // self.shape[1]                                 # (T,) row of each token
        self.attn_mask = valid[:, None, None, :]                                # (M, 1, 1, L)

    def pack(self, x):
        """[M, L, ...] -> [T, ...]."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x):
        """[T, ...] -> [M, L, ...], zeros at padding."""
        M, L = self.shape
        return x.new_zeros(M * L, *x.shape[1:]).index_copy(0, self.index, x).view(M, L, *x.shape[1:])


class MLP(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`.

    `attn_mask` (optional) is a bool tensor broadcastable to [B, h, T, T]; True means the key may be attended to.
    With `return_cls_attn` it also returns the attention row of the first token ([CLS]) over all T keys,
    [B, h, T], computed from that single query so the T x T matrix is never materialised.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'width {dim} is not divisible by num_heads={num_heads}')
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention_received(self, x, attn_mask=None, chunk=256):
        """Mean attention each of the T keys receives, over all queries and heads: [B, T].

        The T x T weights are formed for `chunk` queries at a time (for DSeq-JEPA's column_mean saliency)."""
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]                                                 # (B, h, T, hd)
        total = x.new_zeros(B, T, dtype=torch.float32)
        for i in range(0, T, chunk):
            logits = (q[:, :, i:i + chunk] * self.scale) @ k.transpose(-2, -1)   # (B, h, t, T)
            if attn_mask is not None:
                logits = logits.masked_fill(~attn_mask[..., i:i + chunk, :] if attn_mask.shape[-2] > 1
                                            else ~attn_mask, float('-inf'))
            total += logits.float().softmax(dim=-1).sum(dim=(1, 2))
        return total / (self.num_heads * T)

    def forward(self, x, attn_mask=None, return_cls_attn=False, packing=None):
        C = x.shape[-1]
        qkv = self.qkv(x)                                                     # (B, T, 3C)
        if packing is not None:          # x: packed tokens [T', C]; attention runs on the padded rows [B, T]
            qkv, attn_mask = packing.unpack(qkv), packing.attn_mask
        B, T = qkv.shape[:2]
        qkv = qkv.reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                               # (B, h, T, hd) each
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.)               # (B, h, T, hd)
        out = out.transpose(1, 2).reshape(B, T, C)
        if packing is not None:
            out = packing.pack(out)                                           # (T', C)
        out = self.proj_drop(self.proj(out))
        if not return_cls_attn:
            return out, None
        logits = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)           # (B, h, 1, T)
        if attn_mask is not None:
            row = attn_mask[..., :1, :] if attn_mask.dim() >= 2 else attn_mask
            logits = logits.masked_fill(~row, float('-inf'))
        return out, logits.float().softmax(dim=-1).squeeze(2)                 # (B, h, T)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = MLP(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x, attn_mask=None, return_cls_attn=False, packing=None):
        """x [B, T, D]; or, with `packing`, the packed real tokens [T, D] of a padded batch (see Packing)."""
        y, cls_attn = self.attn(self.norm1(x), attn_mask=attn_mask, return_cls_attn=return_cls_attn,
                                packing=packing)
        x = x + self.drop_path(y, packing)
        x = x + self.drop_path(self.mlp(self.norm2(x)), packing)
        return (x, cls_attn) if return_cls_attn else x


class PatchEmbed(nn.Module):
    """Image to patch embedding: a conv with kernel = stride = patch_size; [B, C, H, W] -> [B, N, D]."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = _to_2tuple(img_size)
        self.patch_size = patch_size
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                       # (B, N, D)


# --------------------------------------------------------------------------------------------------------------
# Initialisation: the single place where weights are initialised (see README "Initialisation")
# --------------------------------------------------------------------------------------------------------------

def init_weights(module, blocks, init_std=0.02, init_rescale=False):
    """Initialise `module` in place.

    Linear and Conv2d weights ~ trunc_normal(std=init_std), biases 0; LayerNorm weight 1, bias 0. This is what an
    ijepa model effectively starts from: ijepa's `init_model` re-initialises every Linear after construction, which
    undoes the depth-scaled rescale its constructors apply. That effective behaviour is our default;
    `init_rescale=True` applies the rescale (attn.proj and mlp.fc2 of block i divided by sqrt(2 * (i + 1))).
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if init_rescale:
        with torch.no_grad():
            for layer_id, blk in enumerate(blocks, start=1):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


# --------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------

class VisionTransformer(nn.Module):
    """ViT encoder. `forward(x, masks=None)` returns the final normalised patch tokens, as in ijepa.

    `masks` is a LongTensor [B, K] (or a list of them) of patch indices to keep: the encoder then only processes
    those tokens (token dropping), and the list entries are stacked along the batch (`apply_masks` order).
    `forward_features` also exposes the [CLS] token, intermediate block outputs and [CLS] attention rows.
    """

    def __init__(
        self,
        img_size=[224],
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        predictor_embed_dim=384,
        depth=12,
        predictor_depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        norm_layer=nn.LayerNorm,
        init_std=0.02,
        use_cls_token=False,
        init_rescale=False,
        **kwargs
    ):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        self.grid_size = self.patch_embed.grid_size
        num_patches = self.patch_embed.num_patches
        # -- fixed sin-cos position embedding, stored as a frozen parameter (ijepa's checkpoints hold it)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim), requires_grad=False)
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(embed_dim, self.grid_size).float().unsqueeze(0))
        # -- optional learnable [CLS] token (no position embedding, as in the DSeq-JEPA reference)
        self.num_prefix_tokens = 1 if use_cls_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_cls_token else None
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth decay rule
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.init_std = init_std
        init_weights(self, self.blocks, init_std=init_std, init_rescale=init_rescale)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=init_std)

    def interpolate_pos_encoding(self, x, pos_embed, grid_size=None):
        """Position embedding for patch tokens `x` [B, N', D] on `grid_size` (square grid assumed if omitted)."""
        npatch = x.shape[1]
        if npatch == pos_embed.shape[1] and (grid_size is None or tuple(grid_size) == self.grid_size):
            return pos_embed
        if grid_size is None:
            side = int(math.isqrt(npatch))
            if side * side != npatch:
                raise ValueError(f'{npatch} patches do not form a square grid; pass grid_size')
            grid_size = (side, side)
        return interpolate_pos_embed(pos_embed, self.grid_size, grid_size)

    def prepare_tokens(self, x, masks=None, image_index=None):
        """Patchify, add position embeddings, keep the `masks` tokens and prepend [CLS]: [B', P + K, D].

        image_index: optional LongTensor [M]; then `masks` is one LongTensor [M, K] whose row m keeps tokens of
        image image_index[m] (several token sets per image, e.g. DSeq-JEPA's steps), and B' = M.
        """
        grid = (x.shape[-2] // self.patch_embed.patch_size, x.shape[-1] // self.patch_embed.patch_size)
        x = self.patch_embed(x)                                               # (B, N, D)
        x = x + self.interpolate_pos_encoding(x, self.pos_embed, grid)
        if image_index is not None:
            ids = masks[0] if isinstance(masks, list) else masks              # (M, K)
            # index_select, not x[image_index]: the backward of advanced indexing accumulates in a nondeterministic
            # order on the CPU, index_select's does not
            x = x.index_select(0, image_index).gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (M, K, D)
        elif masks is not None:
            x = apply_masks(x, masks if isinstance(masks, list) else [masks])  # (len(masks)*B, K, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B', 1 + K, D)
        return x

    def forward_features(self, x, masks=None, return_blocks=(), return_cls_attn=(), attn_mask=None,
                         return_attn_received=()):
        """Encoder pass that also returns what DSeq-JEPA needs, without a second pass.

        return_blocks:   block numbers l (1-based: l = 1 is the output of the first block, l = depth the last)
                         whose raw (not normalised) patch-token outputs are returned in out['blocks'][l], [B', K, D]
        return_cls_attn: block numbers whose [CLS]-query attention over the patch tokens is returned in
                         out['cls_attn'][l], [B', h, K] (the [CLS]-to-[CLS] weight is left out); needs a [CLS] token
        attn_mask:       optional bool [B', 1 or h, T, T] over the P + K tokens, True = may attend
        return_attn_received: block numbers whose mean attention received per patch (over all queries and heads)
                         is returned in out['attn_received'][l], [B', K]
        Returns a dict with 'x' (final normalised patch tokens [B', K, D]), 'cls' (final normalised [CLS] [B', D]
        or None), 'blocks', 'cls_attn' and 'attn_received'.
        """
        if return_cls_attn and self.cls_token is None:
            raise ValueError('[CLS] attention was requested but the encoder has no [CLS] token '
                             '(set meta.use_cls_token: true)')
        for l in list(return_blocks) + list(return_cls_attn) + list(return_attn_received):
            if not 1 <= l <= self.depth:
                raise ValueError(f'block {l} requested, the encoder has blocks 1..{self.depth}')
        P = self.num_prefix_tokens
        x = self.prepare_tokens(x, masks)
        blocks, cls_attn, received = {}, {}, {}
        for i, blk in enumerate(self.blocks, start=1):
            if i in return_attn_received:
                received[i] = blk.attn.attention_received(blk.norm1(x), attn_mask)[:, P:]   # (B', K)
            if i in return_cls_attn:
                x, attn = blk(x, attn_mask=attn_mask, return_cls_attn=True)
                cls_attn[i] = attn[:, :, P:]                                  # (B', h, K)
            else:
                x = blk(x, attn_mask=attn_mask)
            if i in return_blocks:
                blocks[i] = x[:, P:]
        x = self.norm(x)
        return {'x': x[:, P:], 'cls': x[:, 0] if P else None, 'blocks': blocks, 'cls_attn': cls_attn,
                'attn_received': received}

    def forward(self, x, masks=None, image_index=None, key_valid=None, num_valid=None):
        """Final normalised patch tokens of the kept tokens, [B', K, D].

        image_index / key_valid (optional, see prepare_tokens): token sets of varying size, padded to K; padding
        (key_valid False) is never attended to. With num_valid, the number of True entries in key_valid, the
        per-token layers skip the padding too (see Packing) and its outputs are zeros; without it the shapes do
        not depend on the data (nothing is read from the device) and the padding's outputs are meaningless. This
        is token dropping: tokens outside `masks` never enter the encoder.
        """
        x = self.prepare_tokens(x, masks, image_index)
        P = self.num_prefix_tokens
        valid = None if key_valid is None else F.pad(key_valid, (P, 0), value=True)   # (B', P + K)
        if num_valid is None:
            attn_mask = None if valid is None else valid[:, None, None, :]
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask)
            return self.norm(x)[:, P:]
        packing = Packing(valid, num_valid + P * len(valid))
        x = packing.pack(x)                                                     # (T, D)
        for blk in self.blocks:
            x = blk(x, packing=packing)
        return packing.unpack(self.norm(x))[:, P:]


# --------------------------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------------------------

class VisionTransformerPredictor(nn.Module):
    """I-JEPA predictor: context encodings plus mask tokens at target positions -> predicted target features.

    forward(x, masks_x, masks): x [len(masks_x)*B, K_ctx, D] from the encoder, masks_x / masks lists of [B, K]
    index tensors (context / target). Returns [len(masks)*len(masks_x)*B, K_tgt, D], target-block-major, the
    order in which `apply_masks` + `repeat_interleave_batch` lay out the targets.
    """

    def __init__(
        self,
        num_patches,
        embed_dim=768,
        predictor_embed_dim=384,
        depth=6,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        norm_layer=nn.LayerNorm,
        init_std=0.02,
        grid_size=None,
        init_rescale=False,
        **kwargs
    ):
        super().__init__()
        if grid_size is None:
            side = int(math.isqrt(num_patches))
            grid_size = (side, side)
        self.grid_size = _to_2tuple(grid_size)
        if self.grid_size[0] * self.grid_size[1] != num_patches:
            raise ValueError(f'grid {self.grid_size} does not have {num_patches} patches')
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.predictor_pos_embed = nn.Parameter(torch.zeros(1, num_patches, predictor_embed_dim),
                                                requires_grad=False)
        self.predictor_pos_embed.data.copy_(
            get_2d_sincos_pos_embed(predictor_embed_dim, self.grid_size).float().unsqueeze(0))
        self.predictor_blocks = nn.ModuleList([
            Block(dim=predictor_embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                  norm_layer=norm_layer)
            for i in range(depth)])
        self.predictor_norm = norm_layer(predictor_embed_dim)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim, bias=True)
        self.init_std = init_std
        init_weights(self, self.predictor_blocks, init_std=init_std, init_rescale=init_rescale)
        trunc_normal_(self.mask_token, std=init_std)

    def forward(self, x, masks_x, masks, context_valid=None, target_valid=None, compact_length=None,
                num_valid=None):
        """context_valid [B, K_ctx] / target_valid [B, K_tgt] (optional, one context and one target set): False
        marks padding, which no token attends to; with num_valid, the number of real tokens, no per-token layer
        computes it either (see Packing). compact_length (with those masks): the
        largest number of real tokens in a row; each row's real context and target tokens are moved to its front
        and attention runs on that many positions only (attention and the MLP do not depend on token order, so
        the result is the same without the padding between a short context and its targets)."""
        if masks is None or masks_x is None:
            raise ValueError('the predictor needs context (masks_x) and target (masks) indices')
        masks_x = masks_x if isinstance(masks_x, list) else [masks_x]
        masks = masks if isinstance(masks, list) else [masks]
        B = len(x) // len(masks_x)
        pos = self.predictor_pos_embed.expand(B, -1, -1)                     # (B, N, Dp)
        # -- context tokens: project to predictor width, add their position embeddings
        x = self.predictor_embed(x) + apply_masks(pos, masks_x)               # (nenc*B, K_ctx, Dp)
        N_ctxt = x.shape[1]
        # -- one mask token per target position, plus its position embedding
        pred_tokens = apply_masks(pos, masks)                                 # (npred*B, K_tgt, Dp)
        pred_tokens = repeat_interleave_batch(pred_tokens, B, repeat=len(masks_x)) + self.mask_token
        x = torch.cat([x.repeat(len(masks), 1, 1), pred_tokens], dim=1)       # (npred*nenc*B, K_ctx+K_tgt, Dp)
        attn_mask, packing, front = None, None, None
        if context_valid is not None or target_valid is not None:
            if len(masks) != 1 or len(masks_x) != 1:
                raise ValueError('padding masks need one context and one target set per row')
            ctx = context_valid if context_valid is not None else x.new_ones(x.shape[0], N_ctxt, dtype=torch.bool)
            tgt = target_valid if target_valid is not None else x.new_ones(x.shape[0], x.shape[1] - N_ctxt,
                                                                          dtype=torch.bool)
            valid = torch.cat([ctx, tgt], dim=1)                                 # (B, K_ctx+K_tgt)
            if compact_length is not None and compact_length < valid.shape[1]:
                front = true_first(valid, compact_length)                            # (B, K): real tokens first
                full, x = x, x.gather(1, front.unsqueeze(-1).expand(-1, -1, x.shape[-1]))   # (B, K, Dp)
                valid = valid.gather(1, front)
            if num_valid is not None:
                packing = Packing(valid, num_valid)
                x = packing.pack(x)                                              # (T, Dp)
            else:
                attn_mask = valid[:, None, None, :]                              # (B, 1, 1, K)
        for blk in self.predictor_blocks:
            x = blk(x, attn_mask=attn_mask, packing=packing)
        if packing is not None:
            x = packing.unpack(x)
        if front is not None:                                                    # back to the [ctx, tgt] layout
            x = torch.zeros_like(full).scatter(1, front.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
        x = self.predictor_norm(x[:, N_ctxt:])
        return self.predictor_proj(x)                                         # (npred*nenc*B, K_tgt, D)


# --------------------------------------------------------------------------------------------------------------
# Size registry: ijepa's sizes plus tiny sizes for tests and CPU demos
# --------------------------------------------------------------------------------------------------------------

VIT_SIZES = {
    'vit_pico': dict(embed_dim=32, depth=2, num_heads=2),        # unit tests
    'vit_nano': dict(embed_dim=64, depth=4, num_heads=4),        # CPU demos, smoke runs
    'vit_micro': dict(embed_dim=128, depth=6, num_heads=4),      # CPU demos
    'vit_tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'vit_small': dict(embed_dim=384, depth=12, num_heads=6),
    'vit_base': dict(embed_dim=768, depth=12, num_heads=12),
    'vit_large': dict(embed_dim=1024, depth=24, num_heads=16),
    'vit_huge': dict(embed_dim=1280, depth=32, num_heads=16),
    'vit_giant': dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
}
VIT_EMBED_DIMS = {name: size['embed_dim'] for name, size in VIT_SIZES.items()}


def _vit(name, patch_size=16, **kwargs):
    size = {'mlp_ratio': 4, **VIT_SIZES[name]}   # the size may override the MLP ratio (giant: 48/11)
    size.update(kwargs)
    return VisionTransformer(patch_size=patch_size, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **size)


def vit_predictor(**kwargs):
    return VisionTransformerPredictor(mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                      **kwargs)


def vit_pico(patch_size=16, **kwargs):
    return _vit('vit_pico', patch_size, **kwargs)


def vit_nano(patch_size=16, **kwargs):
    return _vit('vit_nano', patch_size, **kwargs)


def vit_micro(patch_size=16, **kwargs):
    return _vit('vit_micro', patch_size, **kwargs)


def vit_tiny(patch_size=16, **kwargs):
    return _vit('vit_tiny', patch_size, **kwargs)


def vit_small(patch_size=16, **kwargs):
    return _vit('vit_small', patch_size, **kwargs)


def vit_base(patch_size=16, **kwargs):
    return _vit('vit_base', patch_size, **kwargs)


def vit_large(patch_size=16, **kwargs):
    return _vit('vit_large', patch_size, **kwargs)


def vit_huge(patch_size=16, **kwargs):
    return _vit('vit_huge', patch_size, **kwargs)


def vit_giant(patch_size=16, **kwargs):
    return _vit('vit_giant', patch_size, **kwargs)
