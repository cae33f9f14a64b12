"""Waiting times (npu/engine/eta.py): the figures learned from finished jobs, and the forecast that
plays the workers' round-robin forward."""

from __future__ import annotations

import pytest

from npu.engine.eta import Figures, Planned, Work, forecast


def test_round_robin_shares_the_device_by_steps_not_by_seconds() -> None:
    # One device, two slots: a 10-step chat (0.1 s a step) and a 2-step image (1 s a step). Each
    # round is one step of each (1.1 s): the image ends after two rounds, the chat runs alone then.
    plan = forecast([(2, [Planned("chat", 1.0, 10), Planned("image", 2.0, 2)])], [Planned("next", 0.5, 5)])
    assert plan.ends["image"] == pytest.approx(2.2)
    assert plan.starts["next"] == pytest.approx(2.2), "the first slot to free takes the next job"
    # after 2.2 s: chat 8 steps of 0.1 s, next 5 steps of 0.1 s -> 5 rounds of 0.2 s, then chat 3 alone
    assert plan.ends["next"] == pytest.approx(3.2)
    assert plan.ends["chat"] == pytest.approx(3.5)
    assert plan.next_free == pytest.approx(3.2), "both slots are taken until 'next' ends"


def test_waiting_jobs_take_slots_in_service_order_across_devices() -> None:
    plan = forecast([(1, [Planned("a", 3.0, 3)]), (1, [Planned("b", 1.0, 1)])],
                    [Planned("w1", 2.0, 2), Planned("w2", 2.0, 2)])
    assert (plan.starts["w1"], plan.starts["w2"]) == (pytest.approx(1.0), pytest.approx(3.0))
    assert plan.next_free == pytest.approx(3.0)


def test_an_unknown_cost_makes_it_and_everything_behind_it_unknown() -> None:
    plan = forecast([(1, [Planned("run", 1.0, 1)])],
                    [Planned("known", 1.0, 1), Planned("new-model", None, None), Planned("after", 1.0, 1)])
    assert plan.starts["known"] == pytest.approx(1.0)
    assert plan.starts["new-model"] is None and plan.starts["after"] is None and plan.next_free is None


def test_an_idle_device_starts_a_job_at_once() -> None:
    plan = forecast([(2, [])], [Planned("w", 4.0, 4)])
    assert plan.starts["w"] == 0.0 and plan.ends["w"] == pytest.approx(4.0) and plan.next_free == 0.0


def test_figures_come_from_finished_jobs_and_typical_lengths_are_capped() -> None:
    figures = Figures()
    assert figures.cost("chat", {"decode": Work(None)}) is None, "nothing measured yet: no guess"
    figures.learn("chat", "prefill", 100, 0.5, 2)  # 5 ms a prompt token, a step per 50 tokens
    figures.learn("chat", "decode", 40, 2.0, 40)  # 50 ms a token
    seconds, steps = figures.cost("chat", {"prefill": Work(200), "decode": Work(None, at_most=10)})  # type: ignore[misc]
    assert seconds == pytest.approx(200 * 0.005 + 10 * 0.05)
    assert steps == pytest.approx(4 + 10)
    figures.learn("chat", "decode", 20, 2.0, 20)  # slower now: 100 ms a token, moving average
    assert 0.05 < figures.as_dict()["chat"]["decode"]["seconds_per_unit"] < 0.1


def test_higher_priority_work_arriving_lately_lengthens_a_lower_jobs_wait() -> None:
    from npu.engine.places import ARRIVALS_S, Places

    places = Places()
    now = 1000.0
    places._arrivals.extend([(now - 10, 1, 30.0), (now - 5, 1, 30.0), (now - 1, 2, 50.0)])  # chats, a picture
    assert places._load_above(2, now, devices=1) == pytest.approx(60.0 / ARRIVALS_S), "chats go first"
    assert places._load_above(1, now, devices=1) == 0.0, "nothing outranks a chat here"
    assert places._load_above(2, now, devices=2) == pytest.approx(30.0 / ARRIVALS_S), "two devices share it"
    places._arrivals.append((now, 0, 10_000.0))
    assert places._load_above(2, now, devices=1) == 0.9, "capped: a wait never becomes infinite"
