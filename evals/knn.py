# Weighted k-NN classification on frozen features (Wu et al. 2018, as in DINO): cosine similarity to every
# training feature, the k nearest vote with weight exp(similarity / T). SPEC section 4: k = 20, T = 0.07.

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, k=20, temperature=0.07, num_classes=None,
                 chunk_size=1024, device='cpu'):
    """Predicted labels [n_test]: test rows are compared with the whole training set `chunk_size` at a time."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train = F.normalize(train_features.float().to(device), dim=1)
    labels = train_labels.to(device)
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test_features), chunk_size):
        test = F.normalize(test_features[start:start + chunk_size].float().to(device), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)                              # (c, k)
        votes = torch.zeros(len(test), num_classes, device=device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1).cpu())
    return torch.cat(preds)


def evaluate(cfg, train, test, device):
    """cfg: the eval config; train / test: (features dict, labels). Returns {'top1': accuracy in %}."""
    c = cfg.knn
    (ftr, ytr), (fte, yte) = train, test
    num_classes = int(max(ytr.max(), yte.max())) + 1
    preds = knn_classify(ftr[c.pooling], ytr, fte[c.pooling], k=c.k, temperature=c.temperature,
                         num_classes=num_classes, chunk_size=c.chunk_size, device=device)
    return {'top1': 100. * (preds == yte).float().mean().item()}
