# V-JEPA's attentive probe (Bardes et al. 2024, "Revisiting Feature Prediction for Learning Visual Representations
# from Video", evaluation protocol): a learnable query token cross-attends to the frozen encoder's patch tokens
# (one block: cross-attention then MLP, each with a residual and a pre-LayerNorm), and a linear layer classifies the
# pooled token. Trained with AdamW and a cosine learning rate on the cached patch tokens (pooling 'tokens').

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from evals.linear_probe import accuracy
from evals.scaffold import register

logger = logging.getLogger()


class AttentiveClassifier(nn.Module):
    def __init__(self, dim, num_classes, num_heads=4, mlp_ratio=4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'attentive.num_heads={num_heads} must divide the feature width {dim}')
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_q, self.norm_x = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens):                                   # (B, N, D) -> (B, num_classes)
        B, N, D = tokens.shape
        h = self.num_heads
        q = self.q(self.norm_q(self.query)).expand(B, -1, -1).reshape(B, 1, h, D // h).transpose(1, 2)
        k, v = self.kv(self.norm_x(tokens)).reshape(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D)
        x = self.query + self.proj(pooled)
        x = x + self.mlp(self.norm_mlp(x))
        return self.head(x[:, 0])


def train_attentive(train_x, train_y, test_x, test_y, num_classes, cfg, device='cpu'):
    """Returns (final test top-1 in %, test top-1 after every epoch)."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = AttentiveClassifier(train_x.shape[-1], num_classes, cfg.num_heads).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train_x) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    curve = []
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=g)
        for start in range(0, len(perm), cfg.batch_size):
            rows = perm[start:start + cfg.batch_size]
            loss = F.cross_entropy(model(train_x[rows].float().to(device)), train_y[rows].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        curve.append(accuracy(model, test_x, test_y, device, chunk=1024))
        logger.info(f'attentive probe epoch {epoch + 1}/{cfg.epochs}: test top-1 {curve[-1]:.2f}%')
    return curve[-1], curve


def evaluate(cfg, train, test, device):
    (ftr, ytr), (fte, yte) = train, test
    num_classes = int(max(ytr.max(), yte.max())) + 1
    top1, curve = train_attentive(ftr['tokens'], ytr, fte['tokens'], yte, num_classes, cfg.attentive, device)
    return {'top1': top1, 'curve': curve}


register('attentive', evaluate, lambda cfg: 'tokens')
