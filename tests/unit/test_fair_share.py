"""The fair share: an even split of a job's partitions over its live workers, in an order all
workers agree on, adding up to exactly the partitions (so nobody waits for a partition that
no one will hand over, and no two workers pass one back and forth)."""

from __future__ import annotations

import pytest

from pgstream.runtime.group import payload
from pgstream.runtime.leases import share_of


@pytest.mark.parametrize("partitions", [0, 1, 2, 5, 6, 7, 64])
@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
def test_shares_add_up_to_the_partitions_and_differ_by_at_most_one(
    partitions: int, workers: int
) -> None:
    shares = [share_of(partitions, workers, rank) for rank in range(workers)]
    assert sum(shares) == partitions
    assert max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)  # the first in order get the extra ones


def test_four_partitions_over_three_workers_leave_nobody_empty() -> None:
    # ceil(4 / 3) = 2 each would let two workers hold 2 + 2 and the third none, for good
    assert [share_of(4, 3, r) for r in range(3)] == [2, 1, 1]


def test_notifications_name_the_job_and_the_sender() -> None:
    assert payload("shop", "host:1:ab") == "shop\thost:1:ab"
