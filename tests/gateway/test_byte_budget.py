"""The consumer's bound on payload bytes held between arrival and acknowledgement."""

from __future__ import annotations

import threading

from gateway.flow import ByteBudget


def test_bytes_past_the_budget_wait_until_given_back() -> None:
    budget = ByteBudget(100)
    assert budget.take(60, timeout=0)
    assert budget.take(40, timeout=0)
    assert not budget.take(1, timeout=0.05)  # full: refused within the timeout
    taken = threading.Event()
    waiter = threading.Thread(target=lambda: budget.take(50, timeout=5) and taken.set())
    waiter.start()
    assert not taken.wait(0.1)
    budget.give(60)  # room for 50 now: the waiting thread is woken
    waiter.join(5)
    assert taken.is_set()
    assert budget.held == 90


def test_an_item_larger_than_the_budget_passes_alone() -> None:
    budget = ByteBudget(100)
    assert budget.take(10, timeout=0)
    assert not budget.take(500, timeout=0.05)  # not beside anything else
    budget.give(10)
    assert budget.take(500, timeout=0)  # alone it may pass, or it would wait forever
    assert not budget.take(1, timeout=0.05)
    budget.give(500)
    assert budget.held == 0
