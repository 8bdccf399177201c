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
from lightning_adag.lockstep import check_asynchrony


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
        ({"servers": 0}, "servers must be a positive number"),
        ({"servers": 2, "transport": "shm"}, "reaches its servers over TCP"),
        ({"server": "h:1,h:2", "servers": 3}, "lists 2 address"),
        ({"server": "h:1,nohost"}, "must look like 'host:port'"),
        ({"servers": 2, "aggregate": "node"}, "not combined with it yet"),
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


def test_several_servers_pick_tcp_and_one_address_each():
    assert ADAGStrategy(servers=2).transport == "tcp"
    assert ADAGStrategy(server="h:1,h:2").transport == "tcp"
    assert ADAGStrategy().transport == "shm"


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


@pytest.mark.parametrize(
    ("main_address", "num_nodes", "bound"),
    [("10.1.2.3", 1, "127.0.0.1:29501"), ("10.1.2.3", 2, "10.1.2.3:29501"), ("fd00::7", 2, "[fd00::7]:29501")],
)
def test_the_runs_tcp_server_binds_loopback_on_one_node_and_the_main_address_on_several(
    monkeypatch, main_address, num_nodes, bound
):
    monkeypatch.setenv("MASTER_ADDR", main_address)
    monkeypatch.setenv("MASTER_PORT", "29500")
    strategy = ADAGStrategy(transport="tcp")
    L.Trainer(strategy=strategy, accelerator="cpu", devices=2, num_nodes=num_nodes, logger=False)
    assert strategy._server_bind_addresses() == [bound]
    assert ADAGStrategy(transport="shm")._server_bind_addresses() == [None]  # a socket file of its own


def test_a_time_based_val_check_interval_is_refused_and_max_time_warned():
    refused = L.Trainer(strategy="adag", accelerator="cpu", devices=2, logger=False, val_check_interval="00:00:01:00")
    with pytest.raises(ValueError, match="time-based val_check_interval"):
        check_asynchrony(refused)
    timed = L.Trainer(strategy="adag", accelerator="cpu", devices=2, logger=False, max_time="00:00:10:00")
    with pytest.warns(UserWarning, match=r"max_time=.*broadcasts from rank 0 after every batch"):
        check_asynchrony(timed)
    per_epoch = L.Trainer(strategy="adag", accelerator="cpu", devices=2, logger=False, max_epochs=2)
    check_asynchrony(per_epoch)  # neither: nothing said


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
