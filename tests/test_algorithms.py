from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightning_adag.algorithms import (
    ADAG,
    AEASGD,
    DOWNPOUR,
    Commit,
    DynSGD,
    PulledCenters,
    resolve_algorithm,
    server_rule,
    staleness_scale,
    suggested_window,
)
from lightning_adag.flat import FlatState, Layout
from lightning_adag.server.core import ServerCore
from lightning_adag.worker import Worker

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@given(st.lists(finite, min_size=1, max_size=64), st.lists(finite, min_size=1, max_size=64), st.integers(1, 64))
def test_adag_commits_the_window_difference_divided_by_its_steps(theta, theta0, steps):
    n = min(len(theta), len(theta0))
    theta, theta0 = torch.tensor(theta[:n]), torch.tensor(theta0[:n])
    out = torch.empty(n)
    ADAG(window=8).worker_delta(theta, theta0, steps, out)
    torch.testing.assert_close(out * steps, theta - theta0, rtol=1e-5, atol=1e-3)
    # multiplied by 1/steps in one fused pass: within an ulp of the division
    torch.testing.assert_close(out, (theta - theta0) / steps, rtol=2**-22, atol=0.0)


def test_window_one_commits_the_whole_difference():
    theta, theta0, out = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0]), torch.empty(2)
    ADAG(window=1).worker_delta(theta, theta0, 1, out)
    assert torch.equal(out, theta - theta0)


def test_server_side_adds_the_delta():
    center = torch.tensor([1.0, 2.0])
    ADAG().server_apply(center, torch.tensor([0.5, -1.0]), Commit(worker=0, pulled_clock=2, clock=5))
    assert torch.equal(center, torch.tensor([1.5, 1.0]))


@pytest.mark.parametrize("window", [0, -3, 1.5, "8", True])
def test_invalid_windows_are_refused(window):
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        ADAG(window=window)


def test_resolve_algorithm():
    assert resolve_algorithm("adag", 5).window == 5
    instance = ADAG(3)
    assert resolve_algorithm(instance, None) is instance
    with pytest.raises(ValueError, match="conflicts"):
        resolve_algorithm(instance, 4)
    with pytest.raises(ValueError, match="unknown algorithm 'sgd'"):
        resolve_algorithm("sgd", 4)


def test_suggested_window_is_the_thesis_heuristic():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))  # 3 layers with parameters
    assert suggested_window(5, mlp) == 4  # (5 + 3) / 2
    assert suggested_window(1, nn.Linear(2, 2)) == 1


# ------------------------------------------------------------------------------------------- the other algorithms
def core_with(spec, initial, trainable=None):
    core = ServerCore()
    numel = len(initial)
    core.configure(Layout(numel, trainable or numel, torch.float64, "d"), spec)
    core.initialize(torch.tensor(initial, dtype=torch.float64), 0)
    return core


def test_dynsgd_divides_a_commit_by_its_staleness_plus_one():
    core = core_with(DynSGD().spec(), [0.0, 0.0])
    for worker in (0, 1, 2):
        core.read(torch.empty(2, dtype=torch.float64), worker)  # all three pull the center at clock 0
    core.commit(0, torch.tensor([6.0, 6.0], dtype=torch.float64), pulled_clock=0)  # τ = 0: whole delta
    core.commit(1, torch.tensor([6.0, 6.0], dtype=torch.float64), pulled_clock=0)  # τ = 1: half
    receipt = core.commit(2, torch.tensor([6.0, -6.0], dtype=torch.float64), pulled_clock=0)  # τ = 2: a third
    assert receipt.staleness == 2
    assert torch.equal(core.center, torch.tensor([6.0 + 3.0 + 2.0, 6.0 + 3.0 - 2.0], dtype=torch.float64))


def test_aeasgd_exchange_matches_the_elastic_formula_on_hand_computed_tensors():
    # θ = [1, 2], C = [3, −2], α = ρ η = 5 · 0.01 = 0.05: E = α (θ − C) = [−0.1, 0.2]
    core = core_with({"name": "aeasgd"}, [3.0, -2.0])
    algorithm = AEASGD(window=4, rho=5.0, elastic_lr=0.01)
    worker = local_worker(core, theta=[1.0, 2.0], algorithm=algorithm)
    receipt = worker.commit(4)
    expected = torch.tensor([-0.1, 0.2], dtype=torch.float64)
    torch.testing.assert_close(worker.theta, torch.tensor([1.0, 2.0], dtype=torch.float64) - expected)  # θ − E
    torch.testing.assert_close(core.center, torch.tensor([3.0, -2.0], dtype=torch.float64) + expected)  # C + E
    assert receipt.clock == 1 and receipt.staleness == 0 and worker.pulled_clock == 1


def test_adag_staleness_scaling_damps_each_element_by_how_far_it_moved_since_the_pull():
    gamma = 0.5
    core = core_with(ADAG(gamma=gamma).spec(), [0.0, 0.0, 0.0])
    core.read(torch.empty(3, dtype=torch.float64), connection=1)  # worker 1 pulls C = 0 at clock 0
    core.read(torch.empty(3, dtype=torch.float64), connection=0)
    core.commit(0, torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64), pulled_clock=0)  # from C = 0: no damping
    assert torch.equal(core.center, torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64))
    core.commit(1, torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), pulled_clock=0)
    # C − C_pulled = [1, 0, −2]: factors 1 / (d² / γ + 1) = [1/3, 1, 1/9]
    expected = torch.tensor([1.0 + 1 / 3, 1.0, -2.0 + 1 / 9], dtype=torch.float64)
    torch.testing.assert_close(core.center, expected)


def test_adag_keeps_pulled_centers_per_connection_and_frees_them_when_it_closes():
    core = core_with(ADAG(gamma=0.5).spec(), [0.0, 0.0])
    core.read(torch.empty(2, dtype=torch.float64), connection=10)  # two runs' worker 0, on connections 10 and 11
    core.read(torch.empty(2, dtype=torch.float64), connection=11)
    core.commit(0, torch.tensor([1.0, 1.0], dtype=torch.float64), pulled_clock=0, connection=11)
    core.read(torch.empty(2, dtype=torch.float64), connection=11)
    core.commit(0, torch.tensor([1.0, 1.0], dtype=torch.float64), pulled_clock=1, connection=11)
    receipt = core.commit(0, torch.tensor([1.0, 1.0], dtype=torch.float64), pulled_clock=0, connection=10)
    assert receipt.staleness == 2  # the other run's worker 0 did not consume this one's pulled center
    core.read(torch.empty(2, dtype=torch.float64), connection=10)
    core.forget(10)
    with pytest.raises(ValueError, match="worker 0 commits from clock 3, but the server never handed it"):
        core.commit(0, torch.tensor([1.0, 1.0], dtype=torch.float64), pulled_clock=3, connection=10)


@given(st.lists(finite, min_size=1, max_size=32), st.floats(1e-6, 1e3))
def test_staleness_scale_is_the_thesis_formula(moved, gamma):
    pulled = torch.zeros(len(moved), dtype=torch.float64)
    center = torch.tensor(moved, dtype=torch.float64)
    scale = staleness_scale(center, pulled, gamma)
    torch.testing.assert_close(scale, 1.0 / ((center - pulled) ** 2 / gamma + 1.0))
    assert bool(((scale >= 0) & (scale <= 1)).all())
    representable = torch.isfinite((center - pulled) ** 2 / gamma)  # beyond float64, the factor rounds to 0
    assert bool((scale[representable] > 0).all())
    assert bool((scale[center == pulled] == 1).all())  # untouched weights keep the whole delta


def test_outer_nesterov_momentum_on_committed_deltas():
    # μ = 0.5, η = 1: m₁ = Δ₁ = 2, C₁ = 0 + 2 + 0.5 · 2 = 3; m₂ = 0.5 · 2 + 1 = 2, C₂ = 3 + 1 + 0.5 · 2 = 5
    core = core_with(DOWNPOUR(outer_momentum=0.5).spec(), [0.0])
    core.commit(0, torch.tensor([2.0], dtype=torch.float64), pulled_clock=0)
    assert core.center.item() == 3.0
    core.commit(0, torch.tensor([1.0], dtype=torch.float64), pulled_clock=1)
    assert core.center.item() == 5.0
    momentum = torch.empty(1, dtype=torch.float64)
    assert core.read_state(0, momentum).clock == 2 and momentum.item() == 2.0


def test_server_state_is_restored_only_into_a_server_without_a_center():
    spec = ADAG(outer_momentum=0.9).spec()
    fresh = ServerCore()
    fresh.configure(Layout(2, 2, torch.float64, "d"), spec)
    assert fresh.load_state(0, torch.tensor([0.5, -0.5], dtype=torch.float64))
    fresh.initialize(torch.zeros(2, dtype=torch.float64), clock=7)
    assert not fresh.load_state(0, torch.ones(2, dtype=torch.float64))  # already running: ignored
    out = torch.empty(2, dtype=torch.float64)
    assert fresh.read_state(0, out).clock == 7 and out.tolist() == [0.5, -0.5]
    with pytest.raises(ValueError, match="not #1"):
        fresh.read_state(1, out)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AEASGD(rho=0), "rho must be a positive, finite number"),
        (lambda: AEASGD(rho=float("inf"), elastic_lr=0.0), "rho must be a positive, finite number"),
        (lambda: AEASGD(elastic_lr=-1), "elastic_lr must be a positive, finite number"),
        (lambda: AEASGD(elastic_lr=float("nan")), "elastic_lr must be a positive, finite number"),
        (lambda: AEASGD(rho=50, elastic_lr=0.1), "at most 1"),
        (lambda: ADAG(gamma=0), "gamma must be a positive, finite number"),
        (lambda: ADAG(gamma=float("inf")), "gamma must be a positive, finite number"),
        (lambda: ADAG(outer_momentum=1.0), r"outer_momentum must be in \[0, 1\)"),
        (lambda: ADAG(outer_momentum=float("nan")), r"outer_momentum must be in \[0, 1\)"),
        (lambda: DOWNPOUR(outer_momentum=-0.1), r"outer_momentum must be in \[0, 1\)"),
        (lambda: DOWNPOUR(outer_lr=0), "outer_lr must be a positive, finite number"),
        (lambda: DOWNPOUR(outer_lr=float("inf")), "outer_lr must be a positive, finite number"),
        (lambda: server_rule({"name": "adag", "outer_lr": float("inf")}), "outer_lr must be a positive, finite"),
    ],
)
def test_bad_hyperparameters_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_names_instances_and_specs():
    assert [type(resolve_algorithm(n, 3)).__name__ for n in ("downpour", "aeasgd", "dynsgd")] == [
        "DOWNPOUR",
        "AEASGD",
        "DynSGD",
    ]
    assert ADAG(gamma=1e-4, outer_momentum=0.9).spec() == {
        "name": "adag",
        "gamma": 1e-4,
        "outer_momentum": 0.9,
        "outer_lr": 1.0,
    }
    assert ADAG().spec() == {"name": "adag"}  # defaults keep the handshake of plain ADAG
    rebuilt = server_rule(ADAG(gamma=1e-4).spec())
    assert isinstance(rebuilt, ADAG) and rebuilt.gamma == 1e-4


def test_every_algorithm_is_a_registered_strategy_name():
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_adag
    from lightning_adag.strategy import ADAGStrategy

    ADAGStrategy.register_strategies(StrategyRegistry)  # a second registration is harmless
    for name in ("adag", "downpour", "aeasgd", "dynsgd"):
        assert StrategyRegistry[name]["strategy"] is lightning_adag.ADAGStrategy
        assert StrategyRegistry[name]["init_params"] == {"algorithm": name}


class LocalClient:
    """A transport client wired straight to a :class:`ServerCore`, to drive an exchange without processes."""

    def __init__(self, core: ServerCore, rank: int = 0) -> None:
        self.core, self.rank = core, rank
        self.mailbox = torch.zeros(core.layout.numel, dtype=core.layout.dtype)

    def pull(self):
        return self.core.read(self.mailbox, self.rank)

    def commit(self, pulled_clock, steps, payload):
        delta, values = payload.views(self.mailbox.view(torch.uint8))
        return self.core.commit(self.rank, delta, pulled_clock, out=self.mailbox, values=values)


def local_worker(core, theta, algorithm):
    model = nn.Linear(len(theta), 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([theta], dtype=torch.float64))
    return Worker(FlatState(model), LocalClient(core), algorithm)


def test_an_outer_learning_rate_scales_both_the_delta_and_the_momentum():
    # μ = 0.5, η = 0.5: m₁ = Δ₁ = 2, C₁ = 0 + 0.5 · 2 + 0.25 · 2 = 1.5
    core = core_with(DOWNPOUR(outer_momentum=0.5, outer_lr=0.5).spec(), [0.0])
    core.commit(0, torch.tensor([2.0], dtype=torch.float64), pulled_clock=0)
    assert core.center.item() == 1.5


def test_downpour_commits_the_whole_window_difference_whatever_its_steps():
    theta, theta0 = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    for rule in (DOWNPOUR(4), DynSGD(4)):
        out = torch.empty(2)
        rule.worker_delta(theta, theta0, 4, out)
        assert out.tolist() == [2.0, -2.0]


@pytest.mark.parametrize("rule", [ADAG(1), DOWNPOUR(1)], ids=["adag", "downpour"])
def test_a_window_delta_feeds_back_what_a_16_bit_wire_drops(rule):
    theta, theta0 = torch.tensor([1.0 + 2**-10, 0.0]), torch.zeros(2)
    out, residual = torch.empty(2, dtype=torch.bfloat16), torch.zeros(2)
    rule.worker_delta(theta, theta0, 1, out, residual)
    assert out.tolist() == [1.0, 0.0] and residual.tolist() == [2**-10, 0.0]  # bf16 keeps 8 bits: the rest waits


def test_a_rule_without_server_state_names_the_state_it_was_offered():
    with pytest.raises(ValueError, match="downpour keeps no server state named 'outer_momentum'"):
        DOWNPOUR(2).load_server_state("outer_momentum", torch.zeros(2))


def test_a_consumed_pulled_center_cannot_be_committed_from_again():
    centers = PulledCenters()
    for clock in (3, 5, 6):
        centers.remember(0, clock, torch.full((2,), float(clock)))
    assert centers.take(Commit(0, 5, 7, connection=0)).tolist() == [5.0, 5.0]
    for consumed in (3, 5):  # its own and every older one
        with pytest.raises(ValueError, match=f"commits from clock {consumed}, but the server never handed it"):
            centers.check(Commit(0, consumed, 7, connection=0))
    centers.check(Commit(0, 6, 7, connection=0))


def test_every_rule_keeps_its_window_and_says_what_it_is():
    assert [rule.window for rule in (ADAG(3), DOWNPOUR(4), DynSGD(5), AEASGD(6))] == [3, 4, 5, 6]
    assert repr(ADAG(4, outer_momentum=0.5)) == "ADAG(window=4, outer_momentum=0.5, outer_lr=1.0)"
    assert repr(AEASGD(8)) == "AEASGD(window=8, rho=5.0, elastic_lr=0.01)"


@pytest.mark.parametrize(
    ("rho", "elastic_lr", "accepted"),
    [(0.5, 0.5, True), (1.0, 1.0, True), (4.0, 0.25, True), (2.0, 0.75, False), (1.0, 0.0, False), (0.0, 1.0, False)],
)
def test_aeasgd_takes_any_positive_rho_and_rate_whose_product_is_at_most_one(rho, elastic_lr, accepted):
    if accepted:
        assert AEASGD(2, rho=rho, elastic_lr=elastic_lr).rho == rho
    else:
        with pytest.raises(ValueError, match=rf"must be (a positive, finite number|at most 1), got {rho * elastic_lr}"):
            AEASGD(2, rho=rho, elastic_lr=elastic_lr)


def test_the_window_heuristic_counts_only_modules_that_own_parameters():
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.ReLU())
    assert suggested_window(2, nested) == 2  # the two Linear layers, not the containers: round((2 + 2) / 2)


@pytest.mark.parametrize("spec", [{"name": "hogwild"}, {}], ids=["unknown", "unnamed"])
def test_a_server_asked_for_an_algorithm_it_does_not_know_lists_those_it_does(spec):
    known = "['adag', 'aeasgd', 'downpour', 'dynsgd']"
    with pytest.raises(ValueError, match=rf"does not know algorithm {spec.get('name')!r}; it knows {re.escape(known)}"):
        server_rule(spec)
