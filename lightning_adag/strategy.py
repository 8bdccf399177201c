"""``ADAGStrategy``: N asynchronous worker processes and a parameter server, as a Lightning strategy."""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import time
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_adag import auth
from lightning_adag.algorithms import ALGORITHMS, Algorithm, resolve_algorithm, suggested_window
from lightning_adag.callback import ADAGCallback
from lightning_adag.checkpoint import CenterRecord
from lightning_adag.flat import FlatState, Layout, check_shareable
from lightning_adag.lockstep import assign_training_data, check_asynchrony, disable_lockstep
from lightning_adag.payload import COMPRESSIONS
from lightning_adag.sampling import DynamicSampler, sampler_for
from lightning_adag.server.launch import ServerProcess, start_parts
from lightning_adag.transports import TRANSPORTS, Client, connect
from lightning_adag.transports.sharded import ShardedClient
from lightning_adag.transports.tcp import split_address
from lightning_adag.worker import Worker, check_overlappable

log = logging.getLogger(__name__)

_START_METHODS = ("popen", "spawn", "fork", "forkserver")
_DATA = ("dynamic", "static")
DRIFT_TIMEOUT = timedelta(hours=24)
_TRANSPORTS = ("auto", *TRANSPORTS)
#: Seconds the launching process waits, when its run fails or is interrupted, for the workers it launched to stop at
#: their next batch boundary before it kills them (one may wait in a collective for this rank, which never comes).
WORKERS_STOP_GRACE = 15.0


class ADAGStrategy(DDPStrategy):
    """Asynchronous data-parallel training through a parameter server (Hermans et al., 2017).

    Launches one worker process per device like DDP does, and global rank 0 starts a parameter-server process.
    Each worker trains on its shard and, every ``window`` local optimizer steps, commits its normalized
    accumulated update to the server and pulls the center variable back. No collective runs between workers inside
    an epoch, so a slow worker does not hold the others back. Validation, checkpoints and the model left after
    ``fit`` are the center variable.

    A :class:`~lightning.pytorch.strategies.DDPStrategy` without the ``DistributedDataParallel`` wrapper: it keeps
    DDP's launch, process group and epoch-level collectives, and Lightning treats it as DDP wherever it asks (the
    ``DistributedSampler``, ``trainer.fit(torch.compile(model))``).

    Args:
        window: local optimizer steps between two commits (λ). ``None`` picks the thesis' heuristic
            ``(workers + layers) / 2`` at setup.
        algorithm: ``"adag"``, ``"downpour"``, ``"aeasgd"``, ``"dynsgd"``, or an
            :class:`~lightning_adag.algorithms.Algorithm` instance carrying its hyperparameters (e.g.
            ``AEASGD(window=8, rho=5.0, elastic_lr=0.01)``).
        transport: ``"shm"`` (shared memory, all workers on one machine), ``"tcp"``, or ``"auto"``: shm when the
            run has one node, tcp otherwise or when ``server`` is given.
        server: ``"host:port"`` of a running ``adag-server`` to join instead of starting one (or, for a center
            cut into parts, ``"host:port,host:port,..."``: the servers started with ``--part 0/k``, ``1/k``... in
            that order); workers read the shared key from the ``ADAG_AUTH_KEY`` environment variable.
        server_port: TCP port of the server this run starts (tcp transport only); default: the main port + 1.
            With ``servers=k``, part ``i`` listens at ``server_port + i``, or at a free port.
        servers: how many server processes hold the center, each a contiguous part of it (TCP only): every
            commit and pull goes to all of them at once. On several nodes part ``i`` runs on node
            ``i mod num_nodes``, so the nodes' network links add up; on one node, all run there. Each part
            applies commits atomically, but a pull may hold parts at different clocks (see docs/behaviour.md).
            Unlike one server, a run over several does not survive a part server yet: its workers stop.
        start_method: how the worker processes start, as for DDP: ``"popen"`` (default), ``"spawn"``, ``"fork"``
            or ``"forkserver"``.
        server_timeout: seconds a worker waits for the server to answer before it fails.
        compression: ``"bf16"`` or ``"fp16"`` sends each commit's delta in that 16-bit dtype (half the bytes of a
            float32 model); the server still accumulates in float32. ``None`` (default) sends the center's dtype.
        error_feedback: with ``compression``, add what rounding dropped from one commit to the next, so nothing
            is lost over time (default True).
        overlap: run each commit and pull on a background thread while the next window trains, folding the new
            center in when it arrives (θ ← θ + (C − θ⁰), θ⁰ ← C); hides communication at the price of one more
            exchange of staleness. Off by default; not for ``"aeasgd"``.
        data: ``"dynamic"`` (default): the server hands out each epoch's training samples in chunks as the workers
            ask for them, so a fast worker trains more of the epoch than a slow one and every sample is trained
            once; ``"static"``: each worker keeps a fixed ``DistributedSampler`` shard, as under DDP. Where dynamic
            assignment cannot apply (an ``IterableDataset``, a sampler of the user's, ``max_steps``), the run says
            so in one line and stays static.
        chunk: samples per chunk of dynamic assignment; ``None`` picks a few batches.
        aggregate: ``"node"`` starts an aggregator on every node (by its local rank 0): the node's workers commit to
            it over shared memory, and it sends their summed commits to the server over TCP as one commit, so the
            network carries one commit and one center per round of the node's workers instead of one per worker.
            Only for rules whose server adds commits (ADAG without ``gamma``, DOWNPOUR, either without
            ``outer_momentum``). ``None`` (default): every worker commits to the server itself.
        process_group_backend, timeout: for the control-plane process group (epoch-level metric sync, barriers).
            Its collectives wait for the slowest worker, which may be epochs behind a fast one, so the default
            timeout is 24 hours rather than DDP's 30 minutes; a worker that dies still fails them at once.
    """

    strategy_name = "adag"

    def __init__(
        self,
        window: int | None = None,
        algorithm: str | Algorithm = "adag",
        transport: Literal["auto", "shm", "tcp"] = "auto",
        server: str | None = None,
        server_port: int | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DRIFT_TIMEOUT,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        server_timeout: float = 120.0,
        compression: Literal["bf16", "fp16"] | None = None,
        error_feedback: bool = True,
        overlap: bool = False,
        data: Literal["dynamic", "static"] = "dynamic",
        chunk: int | None = None,
        aggregate: Literal["node"] | None = None,
        servers: int = 1,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.algorithm = resolve_algorithm(algorithm, window)
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport must be one of {_TRANSPORTS}, got {transport!r}")
        if isinstance(servers, bool) or not isinstance(servers, int) or servers < 1:
            raise ValueError(f"servers must be a positive number of server processes, got {servers!r}")
        if server is not None:
            addresses = server.split(",")
            for address in addresses:
                split_address(address)
            if servers not in (1, len(addresses)):
                raise ValueError(f"servers={servers} but server= lists {len(addresses)} address(es): give one per part")
            servers = len(addresses)
            if transport == "shm":
                raise ValueError("server='host:port' is reached over TCP: use transport='tcp' or 'auto' with it")
            key = os.environ.get(auth.KEY_ENV, "").encode()
            if key and (advice := auth.weak_key_advice(key)):  # a missing key fails when the workers join
                rank_zero_warn(advice)
        if servers > 1 and transport == "shm":
            raise ValueError(f"servers={servers} reaches its servers over TCP: use transport='tcp' or 'auto'")
        if servers > 1 and aggregate is not None:
            raise ValueError(
                "aggregate='node' sends each node's commits to one server; a center cut into parts (servers > 1)"
                " is not combined with it yet: choose one"
            )
        if server_port is not None and not 0 <= server_port < 65536:
            raise ValueError(f"server_port must be in [0, 65535], got {server_port}")
        if start_method not in _START_METHODS:
            raise ValueError(f"start_method must be one of {_START_METHODS}, got {start_method!r}")
        if not _is_number(server_timeout) or not 0 < server_timeout < math.inf:
            raise ValueError(f"server_timeout must be a positive, finite number of seconds, got {server_timeout!r}")
        for name, value in (("error_feedback", error_feedback), ("overlap", overlap)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if compression is not None and compression not in COMPRESSIONS:
            raise ValueError(f"compression must be None or one of {sorted(COMPRESSIONS)}, got {compression!r}")
        if overlap:
            check_overlappable(self.algorithm)
        if data not in _DATA:
            raise ValueError(f"data must be one of {_DATA}, got {data!r}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk must be a positive number of samples or None, got {chunk!r}")
        if aggregate not in (None, "node"):
            raise ValueError(f"aggregate must be None or 'node', got {aggregate!r}")
        if aggregate is not None:
            if self.algorithm.unsummable is not None:
                raise ValueError(f"aggregate='node' cannot run {self.algorithm!r}: {self.algorithm.unsummable}")
            if transport == "shm":
                raise ValueError(
                    "with aggregate='node' workers reach their node's aggregator over shared memory and the"
                    " aggregators reach the server over TCP: use transport='auto'"
                )
        self._aggregate = aggregate
        self._aggregator: ServerProcess | None = None  # this node's, when this process is its local rank 0
        self._data = data
        self._chunk = chunk
        self._run, self._seed = "", 0  # this run's name on the server and its data order's seed, from rank 0
        self.sampler: DynamicSampler | None = None  # the training data's, when assigned dynamically
        self._transport = transport
        self._external_server = server
        self._server_port = server_port
        self._key = b""
        self._server_timeout = server_timeout
        self._compression = None if compression is None else COMPRESSIONS[compression]
        self._error_feedback = error_feedback
        self._overlap = overlap
        self._servers_count = servers
        self._servers: list[ServerProcess] = []  # the part servers this process started and owns
        self._server_address: str | None = None
        self.worker: Worker | None = None
        self._record = CenterRecord()  # what the next checkpoint saves beside the weights
        self._restored = CenterRecord()  # what the checkpoint this run resumes from saved
        self._interrupted = False  # the Trainer stops on an exception, Ctrl+C or SIGTERM

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self.num_nodes > 1 and TRANSPORTS[self.transport].local_only and self._aggregate is None:
            raise ValueError(
                f"transport={self.transport!r} needs every worker on one machine, but num_nodes={self.num_nodes}:"
                " use transport='tcp' or 'auto'"
            )
        if self._start_method == "popen":
            self._launcher = _CheckingSubprocessLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _CheckingMultiProcessingLauncher(self, start_method=self._start_method)

    # ----------------------------------------------------------------------------------------------- lifecycle
    @override
    def setup_environment(self) -> None:
        self._ensure_callback(self.lightning_module.trainer)
        super().setup_environment()

    @override
    def setup_distributed(self) -> None:
        """DDP's process group, with the server started before it (it starts while the other workers still start
        up and meet in the rendezvous) and its address and key shared through it."""
        if self._external_server is None and self.is_global_zero:
            self._key = auth.new_key().encode()
            if not self._spreads_parts:
                self._servers = start_parts(self._key.decode(), self._server_transport, self._server_bind_addresses())
        super().setup_distributed()
        atexit.unregister(_destroy_process_group)  # once per process, however many times the Trainer sets up
        atexit.register(_destroy_process_group)
        if self._spreads_parts:
            self._server_address, self._key = self._start_parts_on_nodes()
        else:
            self._server_address, self._key = self._share_server_address()
        if self._aggregate is not None:
            self._server_address = self._start_aggregator(self._server_address)
        # runs sharing a standalone server keep apart; every worker orders the epochs by rank 0's seed
        self._run, self._seed = self.broadcast((secrets.token_hex(8), int(os.getenv("PL_GLOBAL_SEED", 0))))

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        if self._layer_sync is not None:
            rank_zero_warn(
                "Trainer(sync_batchnorm=True) is ignored by strategy='adag': synchronizing batch statistics at every"
                " step would make every worker wait for the slowest. Each worker normalizes with its own batch's"
                " statistics, and the running statistics travel with the commits, handed from worker to worker."
            )
            self._layer_sync = None
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        check_asynchrony(trainer)
        restored, self._restored = self._restored, CenterRecord()
        if self._evaluates_checkpoint(trainer):
            self.worker = None  # the checkpoint holds a center saved by this strategy: evaluate exactly that
        else:
            self.worker = self._join_server(trainer, restored)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            if self._data == "dynamic":
                resume = restored.data
                assign_training_data(trainer, lambda dataloader: self._dynamic_sampler(trainer, dataloader, resume))
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        disable_lockstep(trainer)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The center variable (not this worker's parameters), as a state dict. Its clock, the algorithm's
        server-side state at that same clock and, when the model holds it rounded, the center itself are recorded
        for :meth:`save_checkpoint`. Once the worker is gone (after ``fit``) the record describes the final center
        the model holds (see :meth:`record_final_center`)."""
        if self.worker is None:
            return super().lightning_module_state_dict()
        showing = self.worker.shown_clock is not None
        self._record_shown_center()
        state = {name: value.clone() for name, value in super().lightning_module_state_dict().items()}
        if not showing:
            self.worker.resume_window()
        return state

    def record_final_center(self) -> None:
        """At the end of ``fit``, once every worker's last commit is in: record the final center for a checkpoint
        saved after the worker is gone."""
        self._record_shown_center()
        self.worker.resume_window()

    def _record_shown_center(self) -> None:
        """Show the center (unless it is shown) and record its clock, the server state at that clock and the exact
        center for the next checkpoint."""
        clock = self.worker.shown_clock if self.worker.shown_clock is not None else self.worker.show_center()
        state_clock, server_state = self.worker.server_state()
        while state_clock not in (None, clock):  # a commit came between the two reads: show the newer center
            clock = self.worker.show_center()
            state_clock, server_state = self.worker.server_state()
        data = None if self.sampler is None else (self.sampler.epoch, self.sampler.position)
        self._record = CenterRecord(clock, server_state, self.worker.exact_center, self.worker.flat.layout, data)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        self._record.save(checkpoint)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._restored = CenterRecord.load(checkpoint)
        return checkpoint

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        self._interrupted = True

    @override
    def teardown(self) -> None:
        """Close this worker's connection and stop the server this process owns. When the run stops on an
        exception, Ctrl+C or SIGTERM, the workers this process launched stop first: a server stopped under a worker
        that is still training would fail that worker with a misleading ``ServerGoneError``."""
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self._aggregator is not None:
            self._aggregator.stop()
            self._aggregator = None
        if self._servers:
            if self._interrupted and isinstance(self.launcher, _CheckingSubprocessLauncher):
                self.launcher.stop_workers(WORKERS_STOP_GRACE)
            _announce_server_stopped(self._run)
            for server in self._servers:
                server.stop()
            self._servers = []
        self._interrupted = False
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """One name per algorithm ("adag", "downpour", "aeasgd", "dynsgd"), each with its default
        hyperparameters; ``override=True`` keeps a second registration (a re-import) harmless."""
        for name, algorithm in ALGORITHMS.items():
            description = f"Asynchronous parameter-server training: {algorithm.__doc__.splitlines()[0]}"
            strategy_registry.register(name, cls, description=description, override=True, algorithm=name)

    # ----------------------------------------------------------------------------------------------- helpers
    def _dynamic_sampler(
        self, trainer: pl.Trainer, dataloader: Any, resume: tuple[int, int] | None
    ) -> DynamicSampler | None:
        worker, run, rank = self.worker, self._run, self.global_rank

        def take(epoch: int, plan: dict) -> tuple[int, int]:
            return worker.take({"run": run, "epoch": epoch, "worker": rank, "plan": plan})

        self.sampler = sampler_for(trainer, dataloader, take, self._seed, self._chunk, resume)
        return self.sampler

    def _ensure_callback(self, trainer: pl.Trainer) -> None:
        if not any(isinstance(cb, ADAGCallback) for cb in trainer.callbacks):
            trainer.callbacks.insert(0, ADAGCallback())

    @property
    def transport(self) -> str:
        """The transport this run's workers use: ``"shm"`` or ``"tcp"`` (shm with ``aggregate="node"``: to their
        node's aggregator)."""
        if self._aggregate is not None:
            return "shm"
        if self._transport != "auto":
            return self._transport
        remote = self._external_server is not None or self.num_nodes > 1 or self._servers_count > 1
        return "tcp" if remote else "shm"

    @property
    def _server_transport(self) -> str:
        """The transport the server this run starts listens on: the workers', or with aggregation the
        aggregators' (tcp)."""
        return "tcp" if self._aggregate is not None else self.transport

    @property
    def _spreads_parts(self) -> bool:
        """Whether this run's own part servers run across its nodes (part ``i`` on node ``i mod num_nodes``)."""
        return self._external_server is None and self._servers_count > 1 and self.num_nodes > 1

    def _start_parts_on_nodes(self) -> tuple[str, bytes]:
        """Start part ``i``'s server on node ``i mod num_nodes`` (by its local rank 0), so that the parts' network
        links add up. Rank 0's key and every node's addresses travel through the rendezvous, and a node that
        cannot start its part fails every worker."""
        assert self.cluster_environment is not None
        key: bytes = self.broadcast(self._key)
        count, started, failure = self._servers_count, {}, ""
        if self.local_rank == 0:
            try:
                host = _address_toward(self.cluster_environment.main_address)
                host = f"[{host}]" if ":" in host else host
                mine = range(self.node_rank, count, self.num_nodes)
                for index in mine:
                    port = 0 if self._server_port is None else self._server_port + index
                    options = ("--part", f"{index}/{count}")
                    self._servers.append(ServerProcess.start(key.decode(), "tcp", f"{host}:{port}", options=options))
                started = {index: server.wait_ready() for index, server in zip(mine, self._servers)}
            except Exception as err:
                failure = f"node {self.node_rank}: {type(err).__name__}: {err}"
        gathered: list = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, (started, failure))
        failures = [failure for _, failure in gathered if failure]
        if failures:
            raise RuntimeError(f"the part servers could not start: {'; '.join(failures)}")
        addresses = {index: address for started, _ in gathered for index, address in started.items()}
        return ",".join(addresses[index] for index in range(count)), key

    def _server_bind_addresses(self) -> list[str | None]:
        """Where the servers this run starts listen: for tcp, loopback on one node and the cluster's main address
        on several, at ``server_port`` (default: main port + 1); several servers at consecutive ports from
        ``server_port``, or at free ports when it is not given (the rendezvous tells every worker where); for a
        local transport, a new address of its own."""
        if TRANSPORTS[self._server_transport].local_only:
            return [None]
        assert self.cluster_environment is not None
        host = self.cluster_environment.main_address if self.num_nodes > 1 else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        if self._server_port is not None:
            return [f"{host}:{self._server_port + index}" for index in range(self._servers_count)]
        if self._servers_count > 1:
            return [f"{host}:0"] * self._servers_count
        return [f"{host}:{self.cluster_environment.main_port + 1}"]

    @staticmethod
    def _evaluates_checkpoint(trainer: pl.Trainer) -> bool:
        """Whether this run evaluates weights restored from ``ckpt_path`` (known only once they are restored:
        before that, ``trainer.ckpt_path`` still names the previous call's checkpoint)."""
        return trainer.state.fn != TrainerFn.FITTING and trainer.ckpt_path is not None

    def _share_server_address(self) -> tuple[str, bytes]:
        """Everyone learns the server's address and key from rank 0 (the run's rendezvous carries them), or rank
        0's failure to start it, so that every worker raises rather than waiting on a rank that already failed.
        With an external server, the address was given and the key comes from the environment."""
        if self._external_server is not None:
            return self._external_server, auth.key_from_env()
        outcome: tuple[str, str, bytes] = ("", "", b"")
        if self.is_global_zero:
            try:
                outcome = ("ok", ",".join(server.wait_ready() for server in self._servers), self._key)
                if len(self._servers) == 1:
                    self._servers[0].keep_running()  # a server that dies is replaced while rank 0 lives
            except Exception as err:
                outcome = ("error", f"{type(err).__name__}: {err}", b"")
        status, detail, key = self.broadcast(outcome)
        if status != "ok":
            raise RuntimeError(f"global rank 0 could not start the parameter server: {detail}")
        return detail, key

    def _start_aggregator(self, upstream: str) -> str:
        """Local rank 0 starts this node's aggregator, joined to the server at ``upstream``; every worker learns
        its own node's aggregator, or some node's failure to start one, so that every worker raises."""
        outcome = ("", "")
        if self.local_rank == 0:
            options = (
                "--upstream", upstream,
                "--node-rank", str(self.node_rank),
                "--node-workers", str(self.num_processes),
                "--upstream-timeout", str(self._server_timeout),
            )  # fmt: skip
            try:
                self._aggregator = ServerProcess.start(self._key.decode(), "shm", options=options)
                outcome = ("ok", self._aggregator.wait_ready())
            except Exception as err:
                outcome = ("error", f"{type(err).__name__}: {err}")
        nodes: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(nodes, (self.node_rank, *outcome))
        for node, status, detail in nodes:
            if status == "error":
                raise RuntimeError(f"node {node} could not start its aggregator: {detail}")
        return next(detail for node, status, detail in nodes if node == self.node_rank and status == "ok")

    def _join_server(self, trainer: pl.Trainer, restored: CenterRecord) -> Worker:
        """Lay the model out flat, connect, and start every worker from the same center.

        Rank 0 offers its parameters (already restored from ``ckpt_path``, if any) and the checkpoint's clock as the
        initial center; after a barrier every worker pulls it, and a second barrier keeps any worker from
        committing before all have pulled.
        """
        module = self.lightning_module
        flat = FlatState(module)
        if self.algorithm.window is None:
            self.algorithm.window = suggested_window(self.world_size, module)
            rank_zero_info(f"ADAG: window={self.algorithm.window} (thesis heuristic: (workers + layers) / 2)")
        addresses = self._server_address.split(",")
        link = (self.global_rank, flat.layout, self.algorithm.spec(), self._key, self._server_timeout)
        pin_memory = self.root_device.type == "cuda"
        if len(addresses) > 1:
            # a center cut into parts does not survive a part server yet: its workers stop (see docs/behaviour.md)
            client, reconnect = ShardedClient(addresses, *link, pin_memory=pin_memory), None
        else:
            connect_once = functools.partial(connect, self.transport, addresses[0], *link, pin_memory=pin_memory)
            client = connect_once()
            owned_by_rank_zero = self._external_server is None and not self.is_global_zero

            def reconnect() -> Client:
                if owned_by_rank_zero:  # no new server will come: fail now rather than after server_timeout
                    _check_server_owner(self._run)
                return connect_once()

        try:
            worker = Worker(
                flat,
                client,
                self.algorithm,
                self._compression,
                self._error_feedback,
                self._overlap,
                reconnect=reconnect,
                patience=self._server_timeout,
            )
        except BaseException:
            client.close()
            raise
        try:
            self._start_from_one_center(trainer, worker, restored)
        except BaseException:
            worker.close()  # teardown never sees a worker that did not finish joining
            raise
        return worker

    def _start_from_one_center(self, trainer: pl.Trainer, worker: Worker, restored: CenterRecord) -> None:
        if self.is_global_zero:
            center = _restored_center(restored, worker.flat.layout)
            receipt = worker.offer_initial_center(restored.clock, restored.server_state, center)
            if trainer.ckpt_path is not None and receipt.clock != restored.clock:
                rank_zero_warn(
                    f"the server already holds a center (clock {receipt.clock}), so it replaces the weights restored"
                    f" from {trainer.ckpt_path} (clock {restored.clock}); the optimizer state is restored"
                )
        self.barrier("adag_center_initialized")
        self._record = CenterRecord(worker.reset_to_center().clock)
        self.barrier("adag_center_pulled")


def _address_toward(host: str) -> str:
    """This machine's address on its route to ``host``: where the other nodes can reach a server it starts."""
    family, _, _, _, where = socket.getaddrinfo(host, 1, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(where)  # a UDP connect sends nothing; it only picks the route
        return probe.getsockname()[0]


def _server_stopped_key(run: str) -> str:
    return f"adag/{run}/server-stopped"


def _announce_server_stopped(run: str) -> None:
    """Tell the other workers, through the process group's store, that rank 0 stops the run's server on purpose
    (the run ends, perhaps after an error on rank 0), so that none waits for it to come back."""
    if torch.distributed.is_initialized():
        try:
            _default_store().set(_server_stopped_key(run), "1")
        except RuntimeError:
            pass  # the store is gone too: the workers find that out instead


def _check_server_owner(run: str) -> None:
    """Raise a ``RuntimeError`` if global rank 0, which runs this run's server, stopped it or is gone."""
    try:
        stopped = _default_store().check([_server_stopped_key(run)])
    except RuntimeError as err:  # the store lives in rank 0's process (or torchrun's agent)
        raise RuntimeError(
            f"global rank 0, which runs the parameter server, is gone ({err}): the run cannot continue; see rank 0's"
            " log for why it stopped"
        ) from err
    if stopped:
        raise RuntimeError(
            "global rank 0 stopped the parameter server: the run is ending, probably after an error on rank 0;"
            " see its log"
        )


def _default_store() -> torch.distributed.Store:
    """The default process group's rendezvous store (torch keeps no public accessor)."""
    return torch.distributed.distributed_c10d._get_default_store()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _restored_center(restored: CenterRecord, layout: Layout) -> Tensor | None:
    """The exact center a checkpoint holds next to the model's rounded weights, if it was saved for this layout."""
    if restored.exact_center is None:
        return None
    if restored.exact_layout != layout:
        rank_zero_warn(
            "the checkpoint's full-precision center belongs to another model layout (different parameters, frozen"
            " set, or float64 against float32); the server starts from the checkpoint's model weights instead, as"
            " saved"
        )
        return None
    return restored.exact_center


class _ChecksModelBeforeLaunch:
    """Validate the LightningModule in the launching process, so that a model ADAG cannot train fails before any
    worker process starts. Models that build their layers in ``configure_model`` are checked in ``setup``."""

    def launch(self, function, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        model = args[0] if args else None
        if isinstance(model, pl.LightningModule) and not is_overridden("configure_model", model):
            check_shareable(model)
        return super().launch(function, *args, trainer=trainer, **kwargs)


class _CheckingSubprocessLauncher(_ChecksModelBeforeLaunch, _SubprocessScriptLauncher):
    def stop_workers(self, grace: float) -> None:
        """Stop the worker processes this one launched: SIGTERM, on which each stops at its next batch boundary
        and disconnects, and SIGKILL for any still running ``grace`` seconds later."""
        running = [proc for proc in self.procs if proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class _CheckingMultiProcessingLauncher(_ChecksModelBeforeLaunch, _MultiProcessingLauncher):
    pass


def _destroy_process_group() -> None:
    """Destroy the control-plane process group while the interpreter is still whole. A process that exits with a
    gloo group alive can abort in its C++ destructors during interpreter finalization ("terminate called without an
    active exception", SIGABRT; pytorch/pytorch#190489), failing a run that finished."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
