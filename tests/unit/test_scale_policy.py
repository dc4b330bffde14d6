"""The autoscaling policy: a pure function of what the queue shows."""

from __future__ import annotations

import pytest

from blockpress.workers.autoscale import Decision, ScalePolicy, decide

POLICY = ScalePolicy(min_replicas=1, max_replicas=4, jobs_per_replica=2, max_wait_s=5, down_idle_s=30)


def test_a_long_queue_grows_the_pool_to_its_share_within_the_maximum() -> None:
    assert decide(POLICY, current=1, depth=5, oldest_age_s=0.1, idle_s=0) == Decision(3, "lag")
    assert decide(POLICY, current=2, depth=50, oldest_age_s=0.1, idle_s=0) == Decision(4, "lag")
    assert decide(POLICY, current=4, depth=50, oldest_age_s=60, idle_s=0) == Decision(4, "steady")


def test_a_short_queue_that_waits_too_long_adds_one() -> None:
    assert decide(POLICY, current=2, depth=1, oldest_age_s=6, idle_s=0) == Decision(3, "wait")
    assert decide(POLICY, current=2, depth=1, oldest_age_s=4, idle_s=0) == Decision(2, "steady")


def test_an_idle_queue_shrinks_one_at_a_time_down_to_the_minimum() -> None:
    assert decide(POLICY, current=3, depth=0, oldest_age_s=0, idle_s=29) == Decision(3, "steady")
    assert decide(POLICY, current=3, depth=0, oldest_age_s=0, idle_s=31) == Decision(2, "idle")
    assert decide(POLICY, current=1, depth=0, oldest_age_s=0, idle_s=999) == Decision(1, "steady")


def test_a_pool_outside_its_bounds_is_brought_back() -> None:
    assert decide(POLICY, current=0, depth=0, oldest_age_s=0, idle_s=999) == Decision(1, "bounds")
    assert decide(POLICY, current=9, depth=9, oldest_age_s=99, idle_s=0) == Decision(4, "bounds")


def test_scale_to_zero_waits_for_a_job_before_adding_one() -> None:
    zero = ScalePolicy(min_replicas=0, max_replicas=2, jobs_per_replica=1, max_wait_s=1, down_idle_s=0)
    assert decide(zero, current=0, depth=0, oldest_age_s=0, idle_s=0) == Decision(0, "steady")
    assert decide(zero, current=0, depth=1, oldest_age_s=0, idle_s=0) == Decision(1, "lag")
    assert decide(zero, current=1, depth=0, oldest_age_s=0, idle_s=0) == Decision(0, "idle")


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="min_replicas"):
        ScalePolicy(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError):
        ScalePolicy(jobs_per_replica=0)
