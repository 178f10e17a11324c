"""k-means++ with Lloyd iterations in torch, seeded; used to initialise clustered JD (§2.8).

Hand-written (40 lines) rather than scikit-learn: it runs on the same ``--device`` as JD and
adds no 50 MB dependency for one call per compression.
"""

from __future__ import annotations

import torch


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50) -> torch.Tensor:
    """Cluster the rows of x [n, p] into k groups; returns labels [n] long, every group non-empty.

    k-means++ seeding (D² sampling) with ``generator``; an emptied group is re-seeded with the
    point farthest from its centre.
    """
    n = x.shape[0]
    if k >= n:
        return torch.arange(n) % k
    x = x.double().cpu()
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=x.dtype)
        nxt = int(torch.multinomial(p, 1, generator=generator))
        centres.append(x[nxt])
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    c = torch.stack(centres)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(x, c)
        new = dist.argmin(1)
        for j in range(k):
            if not bool((new == j).any()):
                far = int(dist.gather(1, new[:, None]).squeeze(1).argmax())
                new[far] = j
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.stack([x[labels == j].mean(0) for j in range(k)])
    return labels
