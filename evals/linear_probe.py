# Linear probe on frozen features, the paper's protocol (SPEC section 4): BatchNorm (no affine) then a linear layer
# on the average-pooled outputs of the last 4 blocks concatenated, SGD with momentum 0.9, 28 epochs, LR 0.01 x
# batch / 256, x0.1 at epochs 8, 16 and 24, weight decay 5e-4 (on the linear layer's weight and bias; the
# BatchNorm has no parameters). 'linear_last' is the same probe on the final
# block's average-pooled output only. Features are cached (evals/features.py), so an epoch is a pass over a matrix.

import logging

import torch
import torch.nn as nn

logger = logging.getLogger()


def train_linear(train_x, train_y, test_x, test_y, num_classes, cfg, device='cpu'):
    """Returns (final test top-1 in %, test top-1 after every epoch)."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dim = train_x.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes)).to(device)
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    train_x, train_y = train_x.float().to(device), train_y.to(device)
    curve = []
    for epoch in range(cfg.epochs):
        head.train()
        perm = torch.randperm(len(train_x), generator=g).to(device)
        total = 0.
        for start in range(0, len(perm), cfg.batch_size):
            rows = perm[start:start + cfg.batch_size]
            if len(rows) < 2:                  # BatchNorm needs two samples
                continue
            loss = nn.functional.cross_entropy(head(train_x[rows]), train_y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(rows)
        sched.step()
        curve.append(accuracy(head, test_x, test_y, device))
        logger.info(f'linear probe epoch {epoch + 1}/{cfg.epochs}: train loss {total / len(perm):.4f}, '
                    f'test top-1 {curve[-1]:.2f}%')
    return curve[-1], curve


@torch.no_grad()
def accuracy(head, x, y, device, chunk=4096):
    """Top-1 accuracy in % of the classifier `head` on features x [n, ...] (chunk rows at a time, eval mode)."""
    head.eval()
    correct = 0
    for start in range(0, len(x), chunk):
        correct += (head(x[start:start + chunk].float().to(device)).argmax(dim=1).cpu() == y[start:start + chunk]).sum()
    return 100. * int(correct) / len(x)


def make_evaluate(pooling):
    def evaluate(cfg, train, test, device):
        (ftr, ytr), (fte, yte) = train, test
        num_classes = int(max(ytr.max(), yte.max())) + 1
        top1, curve = train_linear(ftr[pooling], ytr, fte[pooling], yte, num_classes, cfg.linear, device)
        return {'top1': top1, 'curve': curve}
    return evaluate
