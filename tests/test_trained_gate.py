"""The aux-loss gate (routing/trained_gate.py): its pieces against hand-derived values, and the
trained mechanism against the direction of Shazeer et al. 2017's table 6."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simcc.routing.trained_gate import (ALPHA_D, GateTraining, TrainedGate, cv_squared_gradient, normal_cdf,
                                        train_gate)


def test_normal_cdf_matches_erf():
    z = np.array([-6.0, -2.5, -1.0, -0.1, 0.0, 0.3, 1.7, 4.0])
    exact = [0.5 * (1 + math.erf(v / math.sqrt(2))) for v in z]
    assert normal_cdf(z) == pytest.approx(exact, abs=2e-7)


def test_cv_squared_and_its_gradient_by_hand():
    # [1, 3]: mean 2, population variance 1, CV^2 = 1/4. With E = 2, S = 4, sum v^2 = 10:
    # d/dv_i = 2 E v_i / S^2 - 2 E sum v^2 / S^3 = v_i / 4 - 0.625.
    value, gradient = cv_squared_gradient(np.array([1.0, 3.0]))
    assert value == pytest.approx(0.25)
    assert gradient == pytest.approx([-0.375, 0.125])
    values = np.array([2.0, 5.0, 1.0, 7.0])
    step = 1e-6
    for i in range(values.size):
        bumped = values.copy()
        bumped[i] += step
        numeric = (cv_squared_gradient(bumped)[0] - cv_squared_gradient(values)[0]) / step
        assert cv_squared_gradient(values)[1][i] == pytest.approx(numeric, rel=1e-4)


def training(**changes) -> GateTraining:
    base = dict(experts=64, k=2, w_importance=0.0, w_load=0.0, noise_std=1.0, expert_params=2 * 512 * 1024,
                tokens_per_expert=1e8, seed=0)
    base.update(changes)
    return GateTraining(**base)


def test_loss_ratio_follows_kaplans_joint_law():
    balanced = training()
    assert balanced.loss_ratio(np.array([1.0])) == pytest.approx([1.0])
    # A data-limited expert (huge N, little data): [D_c / (2D)]^a / [D_c / D]^a = 2^-a.
    data_limited = training(expert_params=1e15, tokens_per_expert=1e6)
    assert data_limited.loss_ratio(np.array([2.0])) == pytest.approx([2 ** -ALPHA_D], rel=1e-3)
    # A parameter-limited expert (tiny N, much data) barely gains from twice the data.
    parameter_limited = training(expert_params=1e3, tokens_per_expert=1e12)
    assert 1 - parameter_limited.loss_ratio(np.array([2.0]))[0] < 1e-4


def test_batch_cv_adds_the_multinomial_noise_by_hand():
    gate = TrainedGate(np.full(64, 1 / 64), 1, 1)
    # Even shares: CV^2 = E (1 - 1/E) / (k T) = 63 / (2 x 1000).
    assert gate.batch_cv(1000, 2) == pytest.approx(math.sqrt(63 / 2000))
    skewed = TrainedGate(np.array([0.5, 0.25, 0.25]), 1, 1)
    # Shares' own CV^2 = 3 x 0.375 - 1 = 0.125; noise 3 x 0.625 / 1e9 is negligible.
    assert skewed.batch_cv(10**9, 1) == pytest.approx(math.sqrt(0.125), rel=1e-6)


def test_gate_without_losses_collapses_and_losses_balance_it():
    """Table 6's direction: no loss leaves a few experts with most of the load; any loss
    balances it, the more the heavier the weights."""
    none = train_gate(training())
    weak = train_gate(training(w_importance=0.01, w_load=0.01))
    strong = train_gate(training(w_importance=1.0, w_load=1.0))
    cv = {name: gate.batch_cv(300_000, 2) for name, gate in (("none", none), ("weak", weak), ("strong", strong))}
    assert cv["none"] > 1.0 and none.share.max() * 64 > 5
    assert cv["none"] > 3 * cv["weak"] > 3 * cv["strong"]
    assert strong.share.sum() == pytest.approx(1.0)


def test_load_loss_balances_the_counts_better_than_importance_loss():
    """Table 6: at weight 0.2 the load loss reaches CV 0.04, the importance loss 0.17; importance
    balances the gates' sums, which uneven small gates can meet with uneven counts."""
    importance_only = train_gate(training(w_importance=0.2)).batch_cv(300_000, 2)
    load_only = train_gate(training(w_load=0.2)).batch_cv(300_000, 2)
    assert load_only < importance_only < 0.2


def test_a_data_limited_expert_pulls_harder():
    """The self-reinforcement grows with how much an expert gains from data: at the same weak
    losses, data-limited experts (little data per parameter) end less balanced."""
    weights = dict(w_importance=0.01, w_load=0.01)
    rich = train_gate(training(tokens_per_expert=1e12, **weights))
    starved = train_gate(training(tokens_per_expert=1e5, **weights))
    assert starved.batch_cv(300_000, 2) > 10 * rich.batch_cv(300_000, 2)


def test_each_seed_trains_its_own_gate_and_the_same_seed_the_same():
    assert np.array_equal(train_gate(training(seed=3)).share, train_gate(training(seed=3)).share)
    assert not np.array_equal(train_gate(training(seed=3)).share, train_gate(training(seed=4)).share)
