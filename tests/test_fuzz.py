"""simcc's promise for any input, checked on a short seeded sample of mutated inputs: exit 0 with
valid output (strict, finite JSON) or exit 2 with one `error: ` line naming the file and field;
never a traceback, a hang or runaway memory. benchmarks/fuzz.py runs the same engine for
thousands of cases; this is the CI budget (about 40 subprocesses, two at a time)."""

from __future__ import annotations

import pytest

import fuzz_support as F

CI_SEED = 20261130
CI_JOBS = 2  # CI machines have two cores
CI_TIMEOUT_S = 30.0  # per case; an unmutated case takes 1-4 s
# Seeded cases per kind: 25, plus the 3 FIXED_OVERRIDES the brief names and the 12 regression
# cases (one minimal reproducer per root cause the long run found): 40 in all. Sweeps are trimmed
# to at most 8 configurations; the slowest workloads (> 2 s unmutated) are left to the long run.
CI_PLAN: dict[str, int] = {
    "workload": 6, "hardware": 5, "override": 3, "sweep": 2, "trace_csv": 2,
    "kernels_csv": 2, "comm_csv": 2, "histogram_csv": 1, "placement_csv": 1, "argument": 1,
}


def ci_cases() -> list[F.Case]:
    """The CI selection: the same cases on every run, whatever else changes in the engine's tables."""
    corpus = F.Corpus()
    cases = F.fixed_override_cases() + F.regression_cases()
    index = 0
    for kind, count in CI_PLAN.items():
        for _ in range(count):
            case = F.generate(corpus, CI_SEED, index, kind=kind, fast_only=True)
            cases.append(case)
            index += 1
    return cases


CASES = ci_cases()


@pytest.fixture(scope="module")
def outcomes() -> dict[str, F.Outcome]:
    """All CI cases run once, CI_JOBS at a time; each test below reads its own outcome."""
    results = F.run_many(CASES, CI_JOBS, timeout_s=CI_TIMEOUT_S)
    return {outcome.ident: outcome for outcome in results}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.ident}-{c.kind}" for c in CASES])
def test_mutated_input_is_handled(case: F.Case, outcomes: dict[str, F.Outcome]) -> None:
    outcome = outcomes[case.ident]
    assert outcome.passed, (
        f"{outcome.outcome} ({outcome.root}) for {case.kind} {case.base}: {case.mutation}\n"
        f"  command (in a folder with the case's files): {outcome.command}\n"
        f"  exit {outcome.rc} after {outcome.seconds} s; stderr ends:\n{outcome.stderr_tail[-1500:]}")


def test_plan_covers_every_kind() -> None:
    assert set(CI_PLAN) == set(F.KINDS) and len(CASES) == 40 and len({c.ident for c in CASES}) == 40


# ------------------------------------------------------------------------- in-process, hypothesis

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the dev extra is not installed: the subprocess cases above still run
    given = None

_CORPUS = F.Corpus()
_OVERRIDE_PATHS = sorted(F._override_paths(_CORPUS, F.ROOT / "workloads" / f"{F.MIXTRAL}.yaml", "dgx_h100_x8"))
# Aliases that expand to a billion nodes are left to the subprocess cases, which have a timeout.
_VALUES = [v for v in F.SET_VALUES if v != F.billion_laughs()]


def _load_with_override(path: str, value: str) -> None:
    """Loading with any `--set` value gives a spec or an InputError, nothing else."""
    from simcc.errors import InputError
    from simcc.specs.loader import load_hardware, load_workload, split_overrides

    workload_sets, hardware_sets = split_overrides([f"{path}={value}"])
    try:
        load_workload(F.MIXTRAL, workload_sets)
        load_hardware("dgx_h100_x8", hardware_sets)
    except InputError as error:
        assert "\n" not in error.one_line()


if given is not None:
    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(path=st.sampled_from(_OVERRIDE_PATHS),
           value=st.one_of(st.sampled_from(_VALUES), st.floats().map(repr),
                           st.integers(min_value=-10**40, max_value=10**40).map(str), st.text(max_size=12)))
    def test_set_override_loads_or_fails_cleanly(path: str, value: str) -> None:
        """In-process, so hypothesis can try many values in a second (derandomized: same every run)."""
        _load_with_override(path, value)
else:
    @pytest.mark.skip(reason="hypothesis is not installed (pip install -e '.[dev]')")
    def test_set_override_loads_or_fails_cleanly() -> None:
        """Placeholder so the skip is visible."""
