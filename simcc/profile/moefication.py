"""Balanced k-means of an FFN's W_in rows, as MoEfication (Zhang et al. 2022) builds experts: every
cluster gets exactly f/E neurons. The profiler times it at a model's FFN sizes so that an SSD
switch is costed from the real algorithm on the real device. torch is imported here only."""

from __future__ import annotations


def balanced_assignment(distance, size: int):
    """Each row goes to a cluster, `size` rows per cluster, near rows first. Rounds of proposals:
    every unplaced row proposes its nearest cluster that still has room, and each cluster accepts
    its nearest proposers up to its room. Each round places at least one row, so it ends."""
    import torch

    rows, clusters = distance.shape
    labels = torch.full((rows,), -1, dtype=torch.long, device=distance.device)
    room = torch.full((clusters,), size, dtype=torch.long, device=distance.device)
    while True:
        free = (labels < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return labels
        scores = distance[free].masked_fill((room <= 0)[None, :], float("inf"))
        choice = scores.argmin(dim=1)
        nearest_first = torch.argsort(scores.gather(1, choice[:, None]).squeeze(1))
        proposals = choice[nearest_first]
        by_cluster = torch.argsort(proposals, stable=True)  # keeps nearest-first inside each cluster
        cluster = proposals[by_cluster]
        counts = torch.bincount(cluster, minlength=clusters)
        rank = torch.arange(cluster.numel(), device=distance.device) - (torch.cumsum(counts, 0) - counts)[cluster]
        accepted = rank < room[cluster]
        labels[free[nearest_first[by_cluster[accepted]]]] = cluster[accepted]
        room -= torch.bincount(cluster[accepted], minlength=clusters)


def balanced_kmeans(rows, clusters: int, iterations: int, seed: int = 0):
    """Cluster labels of each row (one neuron's input weights); f must divide by E."""
    import torch

    count = rows.shape[0]
    if count % clusters:
        raise ValueError(f"{clusters} clusters must divide {count} rows")
    size = count // clusters
    generator = torch.Generator().manual_seed(seed)
    centroids = rows[torch.randperm(count, generator=generator)[:clusters].to(rows.device)].clone()
    labels = torch.zeros(count, dtype=torch.long, device=rows.device)
    for _ in range(iterations):
        # |x - c|^2 without the |x|^2 term, which does not change any row's ranking of clusters.
        distance = (centroids * centroids).sum(dim=1)[None, :] - 2.0 * rows @ centroids.T
        labels = balanced_assignment(distance, size)
        centroids = torch.zeros_like(centroids).index_add_(0, labels, rows) / size
    return labels
