"""A noisy top-k gate trained with Shazeer et al. 2017's importance and load losses.

Appendix A of the paper (arXiv 1701.06538) explains why a gate needs these losses: "the gating
network tends to converge to a state where it always produces large weights for the same few
experts. This imbalance is self-reinforcing, as the favored experts are trained more rapidly and
thus are selected even more by the gating network." Its table 6 measures the balance each pair of
loss weights reached. This module reproduces the mechanism instead of looking the table up:

* **Tokens.** Each token is one of E token types (at most MAX_TOKEN_TYPES) whose frequencies
  follow Zipf's law (exponent 1, as word frequencies do). A type's features are a random
  direction of unit expected norm in a FEATURE_WIDTH-wide input, so types share the gate's
  weights as real tokens do; the gate is linear in them (W_g and W_noise, FEATURE_WIDTH x E),
  both starting at zero (appendix A).
* **Gate.** H = clean + N(0, 1) * softplus(noise logits) (eq. 4), the top k kept, softmax over
  them (eq. 3-5).
* **The task's pull.** An expert's loss on a token type falls with the data of that type it has
  been trained on, by Kaplan et al. 2020's joint law (arXiv 2001.08361, eq. 1.5)
  L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D, taken per expert: N its
  parameters, D the tokens it trains on over the run. A parameter-limited expert (small N, much
  data) barely gains from more data, so its pull is weak; a data-limited one pulls hard. The task
  loss of a token is its gates times its experts' losses; its gradient raises the logits of the
  experts that have seen more of the token's type: the self-reinforcement. The loss level is
  TASK_LOSS_NATS (the log of the perplexity table 6 reports for its balanced runs); only its
  differences between experts move the gate.
* **Importance loss** (eq. 6-7): w_importance * CV(sum over the batch of each expert's gates)^2.
* **Load loss** (appendix A, eq. 8-11): w_load * CV(Load)^2 with the smooth estimator
  Load_i = sum_x P(x, i), P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / softplus(noise_i)),
  the normal CDF of the chance that expert i is still chosen on a new draw of noise. The threshold
  kth_excluding is held fixed in the gradient (a stop-gradient; the paper's text does not say).
* **Optimizer.** Adam (Kingma & Ba 2015; the paper trains with Adam), the learning rate warmed up
  linearly then decayed with the inverse square root of the step (appendix C's schedule).

The trained gate's expected share of assignments per expert is then the load distribution the
rest of simcc routes with. The work is bounded: steps x tokens per step x experts <= TRAIN_WORK,
token types <= MAX_TOKEN_TYPES and experts <= specs.base.MAX_TRAINED_GATE_EXPERTS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simcc.memo import Memo

# Kaplan et al. 2020, table 5 / eq. 1.5 (loss in nats, N non-embedding parameters, D tokens).
ALPHA_N, ALPHA_D, N_C, D_C = 0.076, 0.095, 8.8e13, 5.4e13
TASK_LOSS_NATS = math.log(35.7)  # Shazeer et al. 2017, table 6: test perplexity ~35.7 once balanced
TOKEN_ZIPF = 1.0  # word frequencies follow Zipf's law with exponent ~1
TRAIN_STEPS = 200
PEAK_LEARNING_RATE = 0.05  # logit units per Adam step at the end of warm-up
WARMUP_FRACTION = 0.036  # appendix C: 1,000 warm-up steps of ~27,700 (10 epochs of 0.83B words, ~300k a batch)
TRAIN_WORK = 1 << 27  # steps x tokens per step x experts (~1 s of numpy)
# Token types, one per expert up to this many (the gate's logits per type are types x experts a
# step); a layer of more experts than specs.base.MAX_TRAINED_GATE_EXPERTS is refused.
MAX_TOKEN_TYPES = 256
# One simulated step stands for ~140 of the paper's (27,700 in 200), so it moves the gate ~140
# times as far and its last steps jitter accordingly; the gate read out is the average of the last
# quarter's iterates (Polyak & Juditsky 1992), closer to where many small real steps settle.
AVERAGED_FRACTION = 0.25
EVAL_DRAWS = 32  # noise draws per token type when the trained gate's shares are read
FEATURE_WIDTH = 64  # the gate input width each token type is a direction in


@dataclass(frozen=True)
class TrainedGate:
    """What the trained gate does to load: each expert's expected share of the assignments."""

    share: np.ndarray  # [E], sums to 1
    steps: int
    tokens_per_step: int

    def batch_cv(self, tokens: int, k: int) -> float:
        """CV of the experts' assignment counts over one batch of `tokens` tokens, as table 6
        measured it: the shares' own spread plus the batch's multinomial noise. With N = k T
        assignments, Var(count_i) = N s_i (1 - s_i), so CV^2 = CV_s^2 + E (1 - sum s^2) / N."""
        experts = self.share.size
        share_cv2 = experts * float(np.sum(self.share**2)) - 1.0
        noise = experts * (1.0 - float(np.sum(self.share**2))) / (k * tokens)
        return math.sqrt(max(0.0, share_cv2) + noise)


def normal_cdf(z: np.ndarray) -> np.ndarray:
    """Phi(z) through erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf."""
    x = np.abs(z) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-x * x)
    return 0.5 * (1.0 + np.sign(z) * erf)


def normal_pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def cv_squared_gradient(values: np.ndarray) -> tuple[float, np.ndarray]:
    """CV^2 of `values` (population variance over mean squared) and its gradient: with S the sum,
    CV^2 = E sum(v^2) / S^2 - 1, so d/dv_i = 2 E v_i / S^2 - 2 E sum(v^2) / S^3."""
    experts, total, squares = values.size, float(values.sum()), float(np.sum(values**2))
    if total <= 0.0:
        return 0.0, np.zeros_like(values)
    return experts * squares / total**2 - 1.0, 2.0 * experts * values / total**2 - 2.0 * experts * squares / total**3


class _Adam:
    """Adam with the paper's defaults (beta1 0.9, beta2 0.999, eps 1e-8)."""

    def __init__(self, shape: tuple[int, ...]):
        self.first, self.second, self.steps = np.zeros(shape), np.zeros(shape), 0

    def step(self, params: np.ndarray, gradient: np.ndarray, rate: float) -> None:
        self.steps += 1
        self.first = 0.9 * self.first + 0.1 * gradient
        self.second = 0.999 * self.second + 0.001 * gradient**2
        unbiased_first = self.first / (1 - 0.9**self.steps)
        unbiased_second = self.second / (1 - 0.999**self.steps)
        params -= rate * unbiased_first / (np.sqrt(unbiased_second) + 1e-8)


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then decay with the inverse square root of the step (appendix C)."""
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return PEAK_LEARNING_RATE * (step + 1) / warmup
    return PEAK_LEARNING_RATE * math.sqrt(warmup / (step + 1))


def _top_k(noisy: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k chosen experts and the (k+1)-th largest value (the threshold a chosen expert
    must stay above); for an expert outside the top k the threshold is the k-th largest."""
    order = np.argpartition(-noisy, k, axis=1)[:, : k + 1]
    values = np.take_along_axis(noisy, order, axis=1)
    ranked = np.argsort(-values, axis=1)
    order = np.take_along_axis(order, ranked, axis=1)
    values = np.take_along_axis(values, ranked, axis=1)
    return order[:, :k], values[:, k - 1 : k + 1]


_TRAINED = Memo(64)


@dataclass(frozen=True)
class GateTraining:
    """What the gate is trained on: the layer's shape, the loss weights and the run's data."""

    experts: int
    k: int
    w_importance: float
    w_load: float
    noise_std: float  # the N(0, 1) * softplus(x W_noise) term's scale
    expert_params: float  # parameters of one expert
    tokens_per_expert: float  # tokens one expert trains on over the run if balanced (T k / E)
    seed: int

    def loss_ratio(self, relative_data: np.ndarray) -> np.ndarray:
        """An expert's loss at `relative_data` times its balanced share of data, over its loss at
        the balanced share: Kaplan's L(N, D) at N = expert_params, D = share x tokens_per_expert."""
        parameter_term = (N_C / self.expert_params) ** (ALPHA_N / ALPHA_D)
        data_term = D_C / self.tokens_per_expert
        return ((parameter_term + data_term / relative_data) / (parameter_term + data_term)) ** ALPHA_D


def train_gate(training: GateTraining) -> TrainedGate:
    """The gate after TRAIN_STEPS steps of the task, importance and load losses (memoised: the
    training is a pure function of its inputs)."""
    if training.k >= training.experts:  # every expert takes every token: nothing to balance
        return TrainedGate(np.full(training.experts, 1.0 / training.experts), 0, 0)
    return _TRAINED.get(training, lambda: _train(training))


def tokens_per_step(experts: int, k: int) -> int:
    """Enough tokens that each expert expects 4 assignments a step, within the work bound."""
    wanted = max(256, 4 * experts // k)
    return max(16, min(wanted, TRAIN_WORK // (TRAIN_STEPS * experts)))


def _train(training: GateTraining) -> TrainedGate:
    experts, k, noise_std = training.experts, training.k, training.noise_std
    w_importance, w_load = training.w_importance, training.w_load
    rng = np.random.default_rng(training.seed)
    types = min(experts, MAX_TOKEN_TYPES)
    frequency = 1.0 / np.arange(1, types + 1) ** TOKEN_ZIPF
    frequency /= frequency.sum()
    # Each token type's features: independent Gaussian directions of unit expected norm.
    features = rng.standard_normal((types, FEATURE_WIDTH)) / math.sqrt(FEATURE_WIDTH)
    gate, noise_gate = np.zeros((FEATURE_WIDTH, experts)), np.zeros((FEATURE_WIDTH, experts))
    gate_adam, noise_adam = _Adam(gate.shape), _Adam(noise_gate.shape)
    batch = tokens_per_step(experts, k)
    # Data each expert has trained on per token type, warm-started with one step's share so that
    # the first steps' counts do not decide everything.
    trained = np.tile(frequency[:, None] * batch * k / experts, (1, experts))
    rows = np.arange(batch)[:, None]
    columns = np.arange(experts)
    averaged_from = int((1.0 - AVERAGED_FRACTION) * TRAIN_STEPS)
    gate_sum, noise_sum = np.zeros_like(gate), np.zeros_like(noise_gate)
    for step in range(TRAIN_STEPS):
        token_type = rng.choice(types, size=batch, p=frequency)
        clean, noise = features @ gate, features @ noise_gate  # [types, E]
        type_scale = noise_std * _softplus(noise)  # [types, E]
        scale = type_scale[token_type]  # [T, E]
        epsilon = rng.standard_normal((batch, experts))
        logits = clean[token_type]
        noisy = logits + epsilon * scale
        chosen, threshold = _top_k(noisy, k)
        chosen_logits = noisy[rows, chosen]
        gates = np.exp(chosen_logits - chosen_logits[:, :1])
        gates /= gates.sum(axis=1, keepdims=True)  # [T, k]

        # Each expert's loss on each token type, from the data it has seen of that type.
        relative_data = trained / trained.mean(axis=1, keepdims=True)
        expert_loss = TASK_LOSS_NATS * training.loss_ratio(relative_data)  # [types, E]
        gate_gradient = expert_loss[token_type[:, None], chosen] / batch  # d(task)/d(gate)
        importance = np.bincount(chosen.ravel(), weights=gates.ravel(), minlength=experts)
        _, importance_gradient = cv_squared_gradient(importance)
        gate_gradient += w_importance * importance_gradient[chosen]
        # Through the softmax over the chosen experts: dL/dh_i = g_i (dL/dg_i - sum_j g_j dL/dg_j).
        chosen_gradient = gates * (gate_gradient - np.sum(gates * gate_gradient, axis=1, keepdims=True))
        logit_gradient = np.zeros((batch, experts))
        logit_gradient[rows, chosen] = chosen_gradient
        scale_gradient = logit_gradient * epsilon

        if w_load > 0.0:
            z = (logits - _excluded_threshold(threshold, chosen, experts)) / scale
            _, load_gradient = cv_squared_gradient(normal_cdf(z).sum(axis=0))
            density = (w_load * load_gradient) * normal_pdf(z) / scale
            logit_gradient += density
            scale_gradient -= density * z

        cells = (token_type[:, None] * experts + columns).ravel()
        clean_gradient = np.bincount(cells, weights=logit_gradient.ravel(), minlength=types * experts)
        scale_per_type = np.bincount(cells, weights=scale_gradient.ravel(), minlength=types * experts)
        noise_gradient = scale_per_type.reshape(types, experts) * noise_std * _sigmoid(noise)
        rate = learning_rate(step, TRAIN_STEPS)
        gate_adam.step(gate, features.T @ clean_gradient.reshape(types, experts), rate)
        noise_adam.step(noise_gate, features.T @ noise_gradient, rate)
        trained += np.bincount((token_type[:, None] * experts + chosen).ravel(), weights=gates.ravel(),
                               minlength=types * experts).reshape(types, experts)
        if step >= averaged_from:
            gate_sum += gate
            noise_sum += noise_gate
    averaged = TRAIN_STEPS - averaged_from
    clean, noise = features @ (gate_sum / averaged), features @ (noise_sum / averaged)
    return TrainedGate(_expected_share(clean, noise, frequency, k, noise_std, rng), TRAIN_STEPS, batch)


def _excluded_threshold(threshold: np.ndarray, chosen: np.ndarray, experts: int) -> np.ndarray:
    """kth_excluding(H, k, i) for every row and expert: the (k+1)-th largest value for the chosen
    experts, the k-th largest for the others."""
    bar = np.repeat(threshold[:, :1], experts, axis=1)
    np.put_along_axis(bar, chosen, threshold[:, 1:2], axis=1)
    return bar


def _expected_share(clean: np.ndarray, noise: np.ndarray, frequency: np.ndarray, k: int, noise_std: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Each expert's share of the assignments, weighted by token-type frequency. Over EVAL_DRAWS
    draws of the other experts' noise, the chance that expert i is chosen is exactly the load
    estimator's Phi((clean_i - kth_excluding(H, k, i)) / scale_i) (appendix A): averaging it
    instead of counting choices removes most of the draws' noise (a Rao-Blackwell estimate)."""
    types, experts = clean.shape
    scale = noise_std * _softplus(noise)
    chance = np.zeros((types, experts))
    for _ in range(EVAL_DRAWS):
        noisy = clean + rng.standard_normal((types, experts)) * scale
        chosen, threshold = _top_k(noisy, k)
        chance += normal_cdf((clean - _excluded_threshold(threshold, chosen, experts)) / scale)
    share = frequency @ chance
    return share / share.sum()
