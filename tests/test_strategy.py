"""Configuration: registration, construction, and the errors raised before any process starts."""

from __future__ import annotations

import importlib

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

import lightning_adag
from lightning_adag import ADAG, ADAGStrategy
from lightning_adag.flat import check_shareable


def test_import_registers_adag_idempotently():
    importlib.reload(lightning_adag)
    importlib.reload(lightning_adag)
    assert StrategyRegistry["adag"]["strategy"].__name__ == "ADAGStrategy"


def test_the_registered_name_builds_the_strategy_with_one_worker_per_device():
    trainer = L.Trainer(strategy="adag", accelerator="cpu", devices=3, logger=False)
    assert isinstance(trainer.strategy, ADAGStrategy)
    assert trainer.strategy.num_processes == 3
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 3, "rank": 0}
    assert trainer._accelerator_connector.is_distributed


def test_explicit_settings():
    strategy = ADAGStrategy(window=16)
    assert strategy.algorithm.window == 16
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False)
    assert trainer.strategy is strategy
    assert ADAGStrategy(algorithm=ADAG(window=5)).algorithm.window == 5
    assert ADAGStrategy().algorithm.window is None  # chosen at setup from workers and layers


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 0}, "window must be an integer >= 1"),
        ({"algorithm": "hogwild"}, "unknown algorithm 'hogwild'"),
        ({"server": "nohost"}, "must look like 'host:port'"),
        ({"server": "h:99999"}, "must look like 'host:port'"),
        ({"server": "h:1", "transport": "shm"}, "reached over TCP"),
        ({"server_port": 70000}, "server_port must be in"),
        ({"transport": "ucx"}, "transport must be one of"),
        ({"start_method": "thread"}, "start_method must be one of"),
        ({"server_timeout": 0}, "server_timeout must be a positive, finite"),
        ({"server_timeout": float("nan")}, "server_timeout must be a positive, finite"),
        ({"server_timeout": float("inf")}, "server_timeout must be a positive, finite"),
        ({"server_timeout": "60"}, "server_timeout must be a positive, finite"),
        ({"error_feedback": "no"}, "error_feedback must be True or False"),
        ({"overlap": "no"}, "overlap must be True or False"),
    ],
)
def test_invalid_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ADAGStrategy(**kwargs)


def test_shared_memory_needs_one_node():
    with pytest.raises(ValueError, match="transport='shm' needs every worker on one machine"):
        L.Trainer(strategy=ADAGStrategy(transport="shm"), accelerator="cpu", devices=2, num_nodes=2, logger=False)


@pytest.mark.parametrize(
    "kwargs, num_nodes, transport",
    [({}, 1, "shm"), ({}, 2, "tcp"), ({"transport": "tcp"}, 1, "tcp"), ({"server": "host:29600"}, 1, "tcp")],
)
def test_auto_transport_is_shared_memory_on_one_node_and_tcp_otherwise(kwargs, num_nodes, transport):
    strategy = ADAGStrategy(**kwargs)
    L.Trainer(strategy=strategy, accelerator="cpu", devices=2, num_nodes=num_nodes, logger=False)
    assert strategy.transport == transport


def test_a_model_without_trainable_parameters_fails_before_any_worker_starts(script):
    code = script.run("frozen.py", timeout=120)
    output = script.output()
    assert code != 0
    assert "has no trainable parameters" in output
    assert "MEMBER: 2/2" not in output  # no second worker ever joined


def test_a_complex_model_fails_before_any_worker_starts():
    with pytest.raises(ValueError, match="complex64.*real pairs"):
        check_shareable(torch.nn.Linear(2, 2).to(torch.complex64))


@pytest.mark.parametrize("key", ["k", "a" * 15])
def test_a_short_shared_key_is_pointed_out_at_construction(monkeypatch, key):
    monkeypatch.setenv("ADAG_AUTH_KEY", key)
    with pytest.warns(UserWarning, match=f"ADAG_AUTH_KEY is {len(key)} character.*token_hex"):
        ADAGStrategy(server="host:29600")


def test_a_long_shared_key_passes_silently(monkeypatch, recwarn):
    monkeypatch.setenv("ADAG_AUTH_KEY", "a" * 16)
    ADAGStrategy(server="host:29600")
    assert not [w for w in recwarn if "ADAG_AUTH_KEY" in str(w.message)]
