# DSeq-JEPA's sequential prediction (paper Eq. 5) on top of the I-JEPA encoder and predictor.
#
# Given ordered disjoint regions R_1..R_R per image, step k (k = 1..R-1) predicts R_{k+1}:
#   sequential  the context encoder sees exactly R_1 u ... u R_k (token dropping); the predictor sees their
#               encodings and mask tokens at R_{k+1}                                   (paper, default)
#   flat        every step uses the first context R_1 (all targets in parallel, as I-JEPA does)
#   chained     the context encoder sees R_1 once; step k's predictor also sees its own predictions for
#               R_2..R_k, and gradients flow through that chain
# Steps with an empty target (or an empty context) carry no loss and are skipped.
#
# Dimensions: B images, S = R - 1 steps, N patches, M (image, step) pairs kept, L / T padded context / target
# length, D encoder width. `_mask` tensors are bool with True = the token belongs to the set; `_valid` marks the
# real (non-padding) entries of a padded id tensor.

import torch
import torch.nn.functional as F

from src.utils.tensors import true_first


def plan_steps(regions, prediction='sequential', max_steps=None):
    """Context and target masks of every step: (context_mask, target_mask), bool [B, S, N].

    regions: bool [B, R, N], disjoint, in prediction order (R_1 is context only, never a target).
    """
    if prediction == 'sequential':
        context = regions[:, :-1].cumsum(dim=1) > 0                        # R_1 u ... u R_k
    elif prediction in ('flat', 'chained'):
        context = regions[:, :1].expand(-1, regions.shape[1] - 1, -1)     # R_1 at every step
    else:
        raise ValueError(f'unknown prediction mode {prediction!r}')
    target = regions[:, 1:]
    if max_steps is not None:
        context, target = context[:, :max_steps], target[:, :max_steps]
    return context, target


def pack(masks, K=None):
    """Bool masks [M, N] -> (ids [M, K] LongTensor of the True positions in raster order, then padding;
    valid [M, K] bool), K the largest count (read from the device, a host synchronisation, unless given)."""
    counts = masks.sum(dim=1)                                              # (M,)
    if K is None:
        K = max(int(counts.max()), 1) if len(counts) else 1                # M = 0: no pair in the batch
    ids = true_first(masks, K)                                             # True positions first
    valid = torch.arange(K, device=masks.device).unsqueeze(0) < counts.unsqueeze(1)
    return ids, valid


def gather_tokens(x, ids):
    """x [M, N, D], ids [M, K] -> [M, K, D]."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def length_buckets(lengths, max_buckets=4, max_waste=0.25):
    """Split pairs into at most `max_buckets` groups of similar length, so that padding each group to its own
    longest row wastes little: returns a list of index lists (into `lengths`), longest first.

    Greedy over the lengths sorted in decreasing order: a group closes when padding the next pair to the group's
    longest would waste more than `max_waste` of its tokens.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, current = [], []
    for i in order:
        if current and len(groups) < max_buckets - 1 and lengths[i] < (1 - max_waste) * lengths[current[0]]:
            groups.append(current)
            current = []
        current.append(i)
    return groups + [current] if current else groups


def predict_pairs(encoder, predictor, imgs, context_mask, target_mask, max_buckets=4, static=False):
    """Encode each kept (image, step) pair's context by token dropping and predict its target.

    context_mask / target_mask: bool [B, S, N]. Returns (predictions [M, T, D], target ids [M, T],
    target valid [M, T], image index [M]); pairs whose context or target is empty are left out.
    Pairs are processed in up to `max_buckets` groups of similar context + target length, each padded to its own
    longest (contexts of later steps are longer: one padded batch would waste up to half its tokens).
    With `static`, no size is read from the device: all B * S pairs are kept (empty ones with no valid target)
    and padded to N context and N target tokens, so the shapes are fixed and the step never synchronises.
    """
    if static:
        return _predict_static(encoder, predictor, imgs, context_mask, target_mask)
    kept = context_mask.any(dim=2) & target_mask.any(dim=2)                # (B, S)
    image_index, step_index = kept.nonzero(as_tuple=True)                  # (M,), (M,)
    contexts, targets = context_mask[image_index, step_index], target_mask[image_index, step_index]  # (M, N)
    sizes = torch.stack([contexts.sum(dim=1), targets.sum(dim=1)], dim=1).tolist()   # the step's one host sync
    M, device = len(sizes), contexts.device
    ctx_len = [c for c, _ in sizes]
    L = max(ctx_len, default=1)
    ctx_ids, ctx_valid = pack(contexts, L)                                 # (M, L), every pair
    # -- context encoder: groups of similar context length, each padded to its own longest, then back to
    # (image, step) order padded to L
    groups = length_buckets(ctx_len, max_buckets) if M else [[]]
    z = [encoder(imgs, masks=[ctx_ids[rows, :l]], image_index=image_index[rows], key_valid=ctx_valid[rows, :l],
                 num_valid=sum(ctx_len[i] for i in group))
         for group, rows, l in _groups(groups, ctx_len, device)]           # (m, l, D) each
    # (index_select rather than [index] on tensors that need gradients: its backward is deterministic on the CPU)
    z = torch.cat([F.pad(part, (0, 0, 0, L - part.shape[1])) for part in z]).index_select(0, _restore(groups, device))
    # -- predictor: groups of similar context + target length; in each row the real context and target tokens
    # are moved together (compact_length), so neither a short context nor a short target is padded
    total = [c + t for c, t in sizes]
    groups = length_buckets(total, max_buckets) if M else [[]]
    outputs = []
    for group, rows, k in _groups(groups, total, device):
        l = max([sizes[i][0] for i in group], default=1)
        T = max([sizes[i][1] for i in group], default=1)
        tgt_ids, tgt_valid = pack(targets[rows], T)                        # (m, T)
        preds = predictor(z[:, :l].index_select(0, rows), [ctx_ids[rows, :l]], [tgt_ids],
                          context_valid=ctx_valid[rows, :l], target_valid=tgt_valid, compact_length=k,
                          num_valid=sum(total[i] for i in group))
        outputs.append((preds, tgt_ids, tgt_valid))
    # -- back to (image, step) order, every group padded to the longest target
    T = max(o[0].shape[1] for o in outputs)
    restore = _restore(groups, device)
    return (torch.cat([_pad_tokens(o[0], T, 0.) for o in outputs]).index_select(0, restore),
            torch.cat([_pad_tokens(o[1], T, 0) for o in outputs])[restore],
            torch.cat([_pad_tokens(o[2], T, False) for o in outputs])[restore],
            image_index)


def _groups(groups, lengths, device):
    """(pair indices, the same on the device, longest length) of each group of pairs."""
    for group in groups:
        yield (group, torch.as_tensor(group, dtype=torch.long, device=device),
               max([lengths[i] for i in group], default=1))


def _restore(groups, device):
    """Index that puts the concatenated groups back in pair order."""
    order = [i for g in groups for i in g]
    restore = torch.empty(len(order), dtype=torch.long, device=device)
    restore[torch.as_tensor(order, dtype=torch.long, device=device)] = torch.arange(len(order), device=device)
    return restore


def _predict_static(encoder, predictor, imgs, context_mask, target_mask):
    B, S, N = context_mask.shape
    contexts, targets = context_mask.reshape(B * S, N), target_mask.reshape(B * S, N)
    kept = contexts.any(dim=1) & targets.any(dim=1)                        # (B*S,)
    image_index = torch.arange(B, device=imgs.device).repeat_interleave(S)  # (image, step) order
    ctx_ids, ctx_valid = pack(contexts, N)
    ctx_valid[:, 0] |= ~kept         # a skipped pair attends to one (ignored) key, so its outputs stay finite
    tgt_ids, tgt_valid = pack(targets, N)
    tgt_valid &= kept.unsqueeze(1)
    z = encoder(imgs, masks=[ctx_ids], image_index=image_index, key_valid=ctx_valid)            # (B*S, N, D)
    preds = predictor(z, [ctx_ids], [tgt_ids], context_valid=ctx_valid, target_valid=tgt_valid)  # (B*S, N, D)
    return preds, tgt_ids, tgt_valid, image_index


def _pad_tokens(t, T, value):
    """Pad dimension 1 of [B, K] or [B, K, D] to length T."""
    pad = (0, 0, 0, T - t.shape[1]) if t.dim() == 3 else (0, T - t.shape[1])
    return F.pad(t, pad, value=value)


def predict_chained(encoder, predictor, imgs, context_mask, target_mask, static=False):
    """Chained mode: one context pass on R_1, then the steps in order, each seeing the earlier predictions.

    Returns the same as `predict_pairs` (pairs ordered step by step). With `static`, every packed set is padded
    to N tokens instead of its largest size, so no size is read from the device."""
    B, S, N = target_mask.shape
    K = N if static else None
    first = context_mask[:, 0]                                             # R_1, (B, N)
    ctx_ids, ctx_valid = pack(first, K)                                    # (B, L)
    # an image with no context attends to one (ignored) key, so that its outputs stay finite on any attention
    # kernel (they are left out of the loss)
    ctx_valid[:, 0] |= ~first.any(dim=1)
    z = encoder(imgs, masks=[ctx_ids], key_valid=ctx_valid)                # (B, L, D)
    D = z.shape[-1]
    canvas = z.new_zeros(B, N, D)                                          # predicted features so far
    predicted = torch.zeros_like(first)                                    # (B, N) True where predicted
    outputs = []
    for k in range(S):
        tgt_ids, tgt_valid = pack(target_mask[:, k], K)                    # (B, T)
        extra_ids, extra_valid = pack(predicted, K) if k > 0 else (None, None)
        if extra_ids is not None and (static or bool(extra_valid.any())):
            x = torch.cat([z, gather_tokens(canvas, extra_ids)], dim=1)    # context + own predictions
            x_ids = torch.cat([ctx_ids, extra_ids], dim=1)
            x_valid = torch.cat([ctx_valid, extra_valid], dim=1)
        else:
            x, x_ids, x_valid = z, ctx_ids, ctx_valid
        preds = predictor(x, [x_ids], [tgt_ids], context_valid=x_valid, target_valid=tgt_valid)  # (B, T, D)
        outputs.append((preds, tgt_ids, tgt_valid & first.any(dim=1, keepdim=True)))
        # -- write this step's predictions onto the canvas (differentiably) for the later steps. A row of tgt_ids
        # holds distinct positions (pack pads with positions outside the target), so each is written once, and
        # `written` is False at the padding
        write = torch.zeros_like(canvas).scatter(1, tgt_ids.unsqueeze(-1).expand(-1, -1, D), preds)
        written = torch.zeros_like(predicted).scatter(1, tgt_ids, tgt_valid)
        canvas = torch.where(written.unsqueeze(-1), write, canvas)
        predicted = predicted | written
    T = max(p.shape[1] for p, _, _ in outputs)
    preds = torch.cat([_pad_tokens(p, T, 0.) for p, _, _ in outputs])     # (S*B, T, D)
    ids = torch.cat([_pad_tokens(i, T, 0) for _, i, _ in outputs])
    valid = torch.cat([_pad_tokens(v, T, False) for _, _, v in outputs])
    image_index = torch.arange(B, device=imgs.device).repeat(S)
    return preds, ids, valid, image_index
