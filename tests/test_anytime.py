"""TIPS (Li et al. 2023, arXiv 2305.08021) anytime networks: the sub-network scores computed from
the training DTMC, the sandwich cost they weight, and serving a width per request under a budget."""

from __future__ import annotations

import numpy as np
import pytest

from simcc.errors import InputError
from simcc.estimate import SimulationOptions, estimate
from simcc.layout import build_layout
from simcc.model.anytime import expected_sandwich, hyper_adjacency, path_scores, sandwich, stationary
from simcc.plan.serving import serving_costs
from simcc.sim.serving import Request, choose_widths
from simcc.specs.loader import load_hardware, load_workload
from simcc.specs.workload import AnytimeSpec

WORKLOAD = "tips_anytime_mobilenet_train"


# Hand derivation. H(lambda) is symmetric, so the walk P = D^-1 H has pi proportional to each
# state's weighted degree. A group-g channel copy in sub-network k (one representative layer,
# input and output side) has degree share_g * (w_k + lambda * (K - g)): its weights to the w_k
# channels on the other side, and one lambda tie to each of the K - g other sub-networks holding
# group g (g counted from 1). Summing over the groups k holds, and both sides:
#   mass_k  ~  w_k^2 + lambda * sum_{g <= k} share_g * (K - g)
# widths 1/4, 1/2, 3/4, 1 (shares 1/4), lambda 1, in sixteenths:
#   1 + 12 = 13,  4 + 20 = 24,  9 + 24 = 33,  16 + 24 = 40;  total 110
# widths 1/4, 1/2, 1 (shares 1/4, 1/4, 1/2), lambda 1:  1 + 8 = 9,  4 + 12 = 16,  16 + 12 = 28;  total 53
# the same with lambda 2:  1 + 16 = 17,  4 + 24 = 28,  16 + 24 = 40;  total 85
@pytest.mark.parametrize("widths,coupling,masses", [
    ((0.25, 0.5, 0.75, 1.0), 1.0, (13, 24, 33, 40)),
    ((0.25, 0.5, 1.0), 1.0, (9, 16, 28)),
    ((0.25, 0.5, 1.0), 2.0, (17, 28, 40)),
])
def test_tips_scores_are_the_hand_derived_stationary_distribution(widths, coupling, masses):
    scores = path_scores(AnytimeSpec(widths=widths, coupling=coupling, subnets_per_step=3))
    assert scores.stationary == pytest.approx(np.array(masses) / sum(masses), rel=1e-12)
    middle = np.array(masses[1:-1], dtype=float)
    assert scores.sampling == pytest.approx(middle / middle.sum(), rel=1e-12)


def test_the_solved_distribution_is_stationary_for_the_chain():
    matrix, _ = hyper_adjacency((0.25, 0.5, 0.75, 1.0), 1.0)
    assert np.allclose(matrix, matrix.T)  # undirected, as the paper models the supernet
    transition = matrix / matrix.sum(axis=1, keepdims=True)
    pi = stationary(transition)
    assert pi @ transition == pytest.approx(pi, abs=1e-15) and pi.sum() == pytest.approx(1.0)
    assert pi == pytest.approx(matrix.sum(axis=1) / matrix.sum(), rel=1e-12)  # proportional to degree


def test_omitted_importance_samples_by_tips_scores_and_a_given_one_overrides():
    spec = load_workload(WORKLOAD)[0].anytime  # the shipped workload gives no importance
    assert spec.importance is None
    widths, times = zip(*expected_sandwich(spec))
    assert widths == (1.0, 0.25, 0.5, 0.75) and times == pytest.approx([1.0, 1.0, 2 * 24 / 57, 2 * 33 / 57])
    draws = [w for step in range(4000) for w in sandwich(spec, step, 0)[2:]]
    assert draws.count(0.75) / len(draws) == pytest.approx(33 / 57, abs=0.02)
    assert sandwich(spec, None, 0) == [1.0, 0.25, 0.75, 0.5]  # the plan's step: most important first
    given = spec.model_copy(update={"importance": (3.0, 1.0)})
    assert [times for _, times in expected_sandwich(given)[2:]] == pytest.approx([1.5, 0.5])


def test_expected_step_flops_are_the_sandwich_ends_plus_the_tips_weighted_middle():
    """One MLP 16 -> 32 -> 4: its input and output stay whole, so width w costs
    2 x (16 x 32w + 32w x 4) = 1280w FLOPs a token. Four passes: the ends, then two draws over
    0.5 and 0.75 at 24/57 and 33/57:
    1280 + 320 + 2 x (24/57 x 640 + 33/57 x 960) = 1600 + 94080/57 = 3250.53 FLOPs."""
    workload, _ = load_workload(WORKLOAD, ["model.blocks=[{mlp: {widths: [16, 32, 4]}}]", "model.hidden=16"])
    result = estimate(workload, load_hardware("rtx_4090"), "w")
    assert result.model.forward_gflop_per_token * 1e9 == pytest.approx(1600 + 94080 / 57, rel=1e-12)
    rows = result.anytime_widths
    assert [r.width for r in rows] == [0.25, 0.5, 0.75, 1.0]
    assert [r.trained_per_step for r in rows] == pytest.approx([1.0, 48 / 57, 66 / 57, 1.0])
    assert [r.tips_score for r in rows] == pytest.approx([13 / 110, 24 / 110, 33 / 110, 40 / 110])


# ---------------------------------------------------------------- serving under a latency budget

SERVE = ["mode=serve", "serve.batch=8", "serve.prompt_tokens=1", "serve.output_tokens=1", "serve.arrival_rate=2000"]
BUDGETED = SERVE + ["anytime.serve_width=null"]


def _costs(workload):
    system = load_hardware("rtx_4090")
    return serving_costs(workload, system, build_layout(workload, system, "w"))


def _budgeted(budget_s: float, extra=()):
    return load_workload(WORKLOAD, BUDGETED + [f"anytime.serve_latency_budget_s={budget_s!r}", *extra])[0]


def test_each_request_gets_the_widest_width_its_predicted_latency_fits():
    """Hand check: one-token requests take their prefill at the full batch, scaled by their
    difficulty, so request r at width w is predicted prefill_w(8) x scale_r. With the budget set to
    width 0.75's nominal latency, an easy request (1.0) fits 0.75 exactly, one 2% harder misses
    0.75 but fits 0.5 (0.5 is 3% faster here), and one 20% harder fits nothing: it runs at 0.25,
    counted over budget."""
    costs = _costs(_budgeted(1.0))
    assert [t.width for t in costs.widths] == [0.25, 0.5, 0.75, 1.0]
    prefill = {t.width: t.prefill.at(8) for t in costs.widths}
    assert prefill[0.25] < prefill[0.5] < prefill[0.75] < prefill[1.0]
    budget = prefill[0.75]
    assert prefill[0.75] * 1.02 > budget >= prefill[0.5] * 1.02 and prefill[0.25] * 1.2 > budget  # the premise
    serve = _budgeted(budget).serve
    requests = [Request(0.0, 1, 1, 1.0), Request(0.0, 1, 1, 1.02), Request(0.0, 1, 1, 1.2)]
    choice = choose_widths(requests, costs, serve, budget)
    assert [r.width for r in choice.requests] == [0.75, 0.5, 0.25] and choice.over_budget == 1


def test_a_tighter_budget_serves_narrower_and_faster():
    costs = _costs(_budgeted(1.0))
    nominal = [t.latency(1, 1, 1.0, _budgeted(1.0).serve) for t in costs.widths]
    system, options = load_hardware("rtx_4090"), SimulationOptions(request_count=200)
    served, p50 = [], []
    for index in (3, 2, 1, 0):  # budgets at each width's nominal latency, loosest first
        result = estimate(_budgeted(nominal[index]), system, "w", options)
        shares = {row.width: row.served_share for row in result.anytime_widths}
        served.append(max(width for width, share in shares.items() if share > 0))
        assert shares[served[-1]] == 1.0  # every (nominal) request the same width
        p50.append(result.latency.latency_p50_s)
        assert result.model.serve_width is None and not any("exceed" in note for note in result.notes)
    assert served == [1.0, 0.75, 0.5, 0.25]
    assert p50 == sorted(p50, reverse=True) and p50[-1] < p50[0]


def test_a_budget_every_width_misses_serves_the_narrowest_with_a_note():
    result = estimate(_budgeted(1e-9), load_hardware("rtx_4090"), "w", SimulationOptions(request_count=50))
    assert [row.served_share for row in result.anytime_widths] == [1.0, 0.0, 0.0, 0.0]
    [note] = [n for n in result.notes if "exceed" in n]
    assert note.startswith("50 of 50 requests exceed anytime.serve_latency_budget_s (1e-09 s)")
    assert "served at 0.25" in note


def test_a_width_chosen_by_budget_costs_what_that_fixed_width_costs():
    """Requests all budgeted to width 0.5 play the same steps as serving 0.5 fixed: a request's
    step share is its width's table, whatever the supernet's."""
    system = load_hardware("rtx_4090")
    options = SimulationOptions(request_count=300)
    fixed = estimate(load_workload(WORKLOAD, SERVE)[0], system, "w", options)  # the workload serves 0.5
    half = [t for t in _costs(_budgeted(1.0)).widths if t.width == 0.5][0]
    budget = half.latency(1, 1, 1.0, _budgeted(1.0).serve)
    chosen = estimate(_budgeted(budget), system, "w", options)
    assert {row.width: row.served_share for row in chosen.anytime_widths}[0.5] == 1.0
    assert chosen.latency.latency_p50_s == pytest.approx(fixed.latency.latency_p50_s, rel=1e-9)
    assert chosen.latency.latency_p99_s == pytest.approx(fixed.latency.latency_p99_s, rel=1e-9)
    assert chosen.throughput.model_tflops_per_device == pytest.approx(fixed.throughput.model_tflops_per_device,
                                                                     rel=1e-9)


def test_harder_requests_in_a_trace_get_narrower_widths():
    costs = _costs(_budgeted(1.0))
    budget = costs.widths[2].prefill.at(8)  # width 0.75's nominal latency
    trace = [Request(i * 1e-3, 1, 1, scale) for i, scale in enumerate([1.0, 1.0, 1.02, 1.2])]
    result = estimate(_budgeted(budget), load_hardware("rtx_4090"), "w", SimulationOptions(requests=trace))
    shares = {row.width: row.served_share for row in result.anytime_widths}
    assert shares == {0.25: 0.25, 0.5: 0.25, 0.75: 0.5, 1.0: 0.0}


def test_anytime_serving_inputs_are_validated():
    with pytest.raises(InputError, match="not both"):
        load_workload(WORKLOAD, SERVE + ["anytime.serve_latency_budget_s=0.01"])  # the file gives serve_width
    with pytest.raises(InputError, match="serve_latency_budget_s"):
        load_workload(WORKLOAD, BUDGETED + ["anytime.serve_latency_budget_s=0"])
    with pytest.raises(InputError, match="coupling"):
        load_workload(WORKLOAD, ["anytime.coupling=-1"])
