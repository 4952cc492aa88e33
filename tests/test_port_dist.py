"""port.dist: a rank's share of the images is contiguous and cut at batch boundaries."""
from __future__ import annotations

import pytest

from dlibbridge.port.dist import Dist, rank_device


@pytest.mark.parametrize("n,batch,world", [(10, 3, 2), (25, 4, 2), (130, 64, 3), (5, 64, 3), (0, 4, 2), (7, 1, 4)])
def test_shards_cover_every_item_once_at_batch_boundaries(n, batch, world):
    shares = [Dist(r, world).shard(n, batch) for r in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert all(lo % batch == 0 and lo <= hi for lo, hi in shares)
    assert Dist().shard(n, batch) == (0, n)


def test_rank_device():
    assert rank_device("cuda", Dist(1, 2, local_rank=1)) == "cuda:1"
    assert rank_device("cuda", Dist()) == "cuda" and rank_device("cpu", Dist(1, 2, 1)) == "cpu"
