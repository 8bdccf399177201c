"""The center variable, its clock, and the one place where commits are applied."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_adag.algorithms import Algorithm, Commit, server_rule
from lightning_adag.flat import Layout, all_finite
from lightning_adag.wire import Receipt


class LayoutMismatchError(ValueError):
    """A worker's model does not have the layout of the model the server holds."""


@dataclass
class WorkerRecord:
    """What the server saw of one worker, for statistics and the asynchrony tests."""

    commits: int = 0
    staleness_sum: int = 0
    max_staleness: int = 0
    first_commit: float | None = None
    last_commit: float | None = None

    def add(self, staleness: int) -> None:
        """Count one commit of this worker, of ``staleness``."""
        now = time.time()
        self.commits += 1
        self.staleness_sum += staleness
        self.max_staleness = max(self.max_staleness, staleness)
        self.first_commit = self.first_commit or now
        self.last_commit = now

    def to_json(self) -> dict:
        mean = self.staleness_sum / self.commits if self.commits else 0.0
        return {
            "commits": self.commits,
            "mean_staleness": mean,
            "max_staleness": self.max_staleness,
            "first_commit": self.first_commit,
            "last_commit": self.last_commit,
        }


#: Bytes per shard of the center: large enough that handing a lock over costs nothing next to the arithmetic,
#: small enough that a model of tens of MB splits into a few stages that different commits can occupy at once.
SHARD_BYTES = 4 * 2**20


#: Initial clocks must be below this: clocks travel as signed 64-bit integers, and this leaves room for 2**62 commits.
MAX_CLOCK = 2**62

#: What a refused commit's error says.
DIVERGED = (
    "The center is unchanged. The worker's parameters have diverged: lower the learning rate, clip gradients"
    " (Trainer(gradient_clip_val=...)) or look for the step whose loss became NaN."
)
#: What a commit or a recovered center refused for overflowing the center says (its dtype and largest finite
#: value are filled in).
OVERFLOWED = (
    "would make the center overflow {dtype} (largest finite value {limit:.3g}); the center is unchanged."
    " Lower outer_lr or outer_momentum, or the learning rate: parameters this large have run away."
)
#: What a refused initial center or server state says.
RESTORED = "Check the model's initialization, or the checkpoint or server snapshot it was restored from."


def check_agreement(held: Layout, held_spec: dict, layout: Layout, algorithm_spec: dict) -> None:
    """Raise a :class:`LayoutMismatchError` unless a worker's ``layout`` and ``algorithm_spec`` are those the
    server already holds."""
    if layout != held:
        raise LayoutMismatchError(
            f"model layout mismatch: the server holds a model of {held.numel} elements ({held.trainable} trainable,"
            f" {held.dtype}, digest {held.digest}), this worker has {layout.numel} ({layout.trainable} trainable,"
            f" {layout.dtype}, digest {layout.digest}). Every worker must build the same model."
        )
    if algorithm_spec != held_spec:
        raise LayoutMismatchError(
            f"algorithm mismatch: the server runs {held_spec}, this worker asks for {algorithm_spec}"
        )


def require_finite_commit(worker: int, delta: Tensor, values: Tensor | None) -> None:
    """Refuse a commit holding NaN or an infinity (``ValueError``), before it reaches anything others share."""
    require_finite(delta, f"worker {worker}'s commit", DIVERGED)
    if values is not None:
        require_finite(values, f"worker {worker}'s commit (its buffers)", DIVERGED)


def commit_values(layout: Layout, clock: int, delta: Tensor, pulled_clock: int, values: Tensor | None) -> Tensor:
    """The values a commit carries (by default the rest of ``delta``), once its sizes fit ``layout`` and the clock
    it started from is one the server (now at ``clock``) has handed out; else a ``ValueError``."""
    if not 0 <= pulled_clock <= clock:
        raise ValueError(f"pulled clock {pulled_clock} is outside [0, {clock}]")
    trainable = layout.trainable
    values = delta[trainable:] if values is None else values
    if delta.numel() < trainable or values.numel() != layout.numel - trainable:
        raise ValueError(
            f"a commit carries {delta.numel()} delta and {values.numel()} value elements, the layout {trainable} and"
            f" {layout.numel - trainable}"
        )
    return values


def largest_magnitude(tensor: Tensor) -> float:
    """The largest ``|x|`` in ``tensor`` (NaN if any element is NaN, infinite if any is), in one read."""
    if not tensor.numel():
        return 0.0
    low, high = (float(v) for v in torch.aminmax(tensor))
    return max(abs(low), abs(high)) if math.isfinite(low) and math.isfinite(high) else math.nan


def require_finite(tensor: Tensor, what: str, advice: str) -> None:
    """Raise a ``ValueError`` that says how many elements of ``tensor`` are NaN or infinite, if any are (checked
    at memory speed by :func:`~lightning_adag.flat.all_finite`; only a refusal pays for the exact count)."""
    if not all_finite(tensor):
        bad = tensor.numel() - int(torch.isfinite(tensor).sum())
        raise ValueError(f"{what} holds {bad} NaN or infinite value(s) of {tensor.numel()}. {advice}")


class ServerCore:
    """Holds the center ``C`` and the clock (number of commits applied).

    The center is split into shards, each with its own lock. A commit or a pull enters in order through one small
    entry lock (which assigns its clock), then walks the shards in one fixed order (from the end of the center,
    see :meth:`_walk`), hand over hand: it takes the next shard's lock before it releases the current one. Nothing
    overtakes anything, so every shard sees the commits in the same order and a pull sees exactly the commits that
    entered before it, never half of one, whatever transport delivered them; yet while commit k works on one
    shard, commit k+1 already works on the shard before it, so commits from several workers use several cores. An
    algorithm whose server half is not elementwise and stateless (see ``Algorithm.elementwise``) gets a single
    shard: one lock, as before.

    The first worker to initialize the center (or to offer one it recovered) fixes the layout and the algorithm;
    later ones must agree.
    ``allocate(numel, dtype)`` supplies the center's storage.
    """

    def __init__(
        self, allocate: Callable[[int, torch.dtype], Tensor] | None = None, shard_bytes: int = SHARD_BYTES
    ) -> None:
        self._allocate = allocate or (lambda numel, dtype: torch.zeros(numel, dtype=dtype))
        self._shard_bytes = shard_bytes
        self._entry = threading.Lock()
        self._spans: list[slice] = []
        self._locks: list[threading.Lock] = []
        self.layout: Layout | None = None
        self.algorithm: Algorithm | None = None
        self.algorithm_spec: dict | None = None
        self.center: Tensor | None = None
        self.clock = 0
        self.initialized = False
        self.workers: dict[int, WorkerRecord] = {}
        # The newest center of a previous incarnation this server knows (trainable region) and its clock: a
        # snapshot's, or one a reconnecting worker offered (see :meth:`recover`). None on a server never restarted.
        self._base: Tensor | None = None
        self._base_clock = 0
        #: An upper bound on ``|C|`` of the trainable region; while a commit cannot take it past ``_headroom`` it
        #: is applied without a check (see :meth:`commit`).
        self._bound = 0.0
        self._headroom = 0.0

    def configure(self, layout: Layout, algorithm_spec: dict) -> bool:
        """Accept a worker's layout and algorithm. Once the center is initialized they are fixed and the worker's
        must agree (True); before, any worker may join (False): the first proposes them, and the first to
        initialize the center (or load state into it) fixes its own (see :meth:`initialize`). So a worker that
        says hello and never initializes cannot keep a server empty for everyone else."""
        with self._entry:
            if not self.initialized:
                if self.layout is None:
                    self._adopt(layout, algorithm_spec)
                else:
                    server_rule(algorithm_spec)  # a spec it cannot run is refused now, not at initialization
                return False
            check_agreement(self.layout, self.algorithm_spec, layout, algorithm_spec)
            return True

    def _adopt(self, layout: Layout, algorithm_spec: dict) -> None:
        """Take ``layout`` and the algorithm for the center to come (the caller holds the entry lock, and every
        shard's if there are any; nothing is initialized)."""
        algorithm = server_rule(algorithm_spec)
        self.center = self._allocate(layout.numel, layout.dtype)
        self.layout, self.algorithm, self.algorithm_spec = layout, algorithm, dict(algorithm_spec)
        shard = max(1, self._shard_bytes // layout.dtype.itemsize) if algorithm.elementwise else layout.numel
        starts = range(0, layout.numel, shard)
        self._spans = [slice(a, min(a + shard, layout.numel)) for a in reversed(starts)]  # see _walk
        self._locks = [threading.Lock() for _ in self._spans]

    def _settle(self, layout: Layout | None, algorithm_spec: dict | None) -> None:
        """Before a worker's initialization or state is taken: once initialized, its layout must agree; before, the
        center takes its layout if another worker's was proposed (called with the center quiesced)."""
        if layout is None:
            return
        if self.initialized:
            check_agreement(self.layout, self.algorithm_spec, layout, algorithm_spec)
        elif (layout, algorithm_spec) != (self.layout, self.algorithm_spec):
            self._adopt(layout, algorithm_spec)

    def _start(self, values: Tensor, clock: int) -> None:
        """Make ``values`` (finite) the center at ``clock``, with the bound the overflow check starts from."""
        self.center.copy_(values)
        self._bound = largest_magnitude(self.center[: self.layout.trainable])
        self._headroom = torch.finfo(self.center.dtype).max / 2
        self.clock, self.initialized = clock, True

    def initialize(
        self, values: Tensor, clock: int, layout: Layout | None = None, algorithm_spec: dict | None = None
    ) -> Receipt:
        """Set the center to ``values`` at ``clock`` unless it already holds one; either way, return its clock.
        ``layout`` and ``algorithm_spec``, the initializing worker's, are fixed from then on (by default, those
        :meth:`configure` took)."""
        if not 0 <= clock < MAX_CLOCK:
            raise ValueError(f"clock must be in [0, 2**62), got {clock}: is the checkpoint or snapshot damaged?")
        with self._quiesced():
            self._settle(layout, algorithm_spec)
            self._require_layout()
            if not self.initialized:
                require_finite(values, "the initial center", RESTORED)
                self._start(values, clock)
            return Receipt(self.clock)

    def recover(
        self,
        values: Tensor,
        clock: int,
        connection: int | None = None,
        layout: Layout | None = None,
        algorithm_spec: dict | None = None,
    ) -> Receipt:
        """Take ``values``, a center at ``clock`` that a worker pulled from this server's previous incarnation (the
        process before a restart), so that a restarted server loses no more than the commits in flight.

        A server without a center starts from it. Otherwise the offer counts only if it is newer than the newest
        center of the previous incarnation the server knows (its snapshot, or an earlier offer): that history is
        linear, so the offer holds exactly the commits between the two, and they are added to the center,
        ``C ← C + (offer − known)`` on the trainable region, with the clock advanced by their number. The commits
        applied since the restart stay; values that travel by value are the offer's only if there were none. An
        offer no newer, or to a server that was never restarted, changes nothing. An offer whose commits would make
        the center overflow is refused (``ValueError``) and changes nothing either. Unless refused, return the clock.

        The worker on ``connection``, if named, is known to hold the offer (rules that keep pulled centers need
        it). ``layout`` and ``algorithm_spec`` are the offering worker's, as for :meth:`initialize`: the first offer
        or initialization taken fixes them."""
        if not 0 <= clock < MAX_CLOCK:
            raise ValueError(f"clock must be in [0, 2**62), got {clock}")
        require_finite(values, "a recovered center", RESTORED)
        with self._quiesced():
            self._settle(layout, algorithm_spec)
            self._require_layout()
            trainable = self.layout.trainable
            newer = self._base is not None and clock > self._base_clock
            taken = newer or not self.initialized
            if not self.initialized or (newer and self.clock == self._base_clock):
                self._start(values, clock)
            elif newer:
                moved = self.center[:trainable] + (values[:trainable] - self._base)
                if not all_finite(moved):
                    raise ValueError(f"a recovered center {self._overflowed()}")
                self.center[:trainable].copy_(moved)
                self._bound = largest_magnitude(moved)
                self.clock += clock - self._base_clock
            if taken:
                self._remember_base(values[:trainable], clock)
            if connection is not None:
                self.algorithm.server_pulled(connection, clock, values[:trainable])
            return Receipt(self.clock)

    def commit(
        self,
        worker: int,
        delta: Tensor,
        pulled_clock: int,
        out: Tensor | None = None,
        values: Tensor | None = None,
        connection: int | None = None,
    ) -> Receipt:
        """Apply one commit atomically, then (when ``out`` is given) copy the new center into ``out``: the center
        the worker now holds. ``connection`` (by default, ``worker``) is what the algorithm keeps per-worker state
        under (see :meth:`read`, :meth:`forget`).

        ``delta``'s trainable region goes through the algorithm's rule, accumulated in the center's dtype whatever
        dtype the delta came in; ``values`` (by default, the rest of ``delta``: frozen parameters and floating-point
        buffers) replace the center's, so running statistics travel from worker to worker.

        A commit holding NaN or an infinity is refused whole (``ValueError``) before it takes a clock: one diverged
        worker must not poison the center every other worker pulls. The check runs outside the locks. So is a finite
        commit that would make the center overflow: while the algorithm bounds how far a commit moves the center
        (``Algorithm.step_bound``) and that bound keeps the center far from its dtype's largest value, commits are
        pipelined unchecked; otherwise the commit is applied with the whole center held, checked, and rolled back
        if any element became infinite.
        """
        largest = largest_magnitude(delta)
        if not math.isfinite(largest):
            require_finite(delta, f"worker {worker}'s commit", DIVERGED)
        if values is not None:
            require_finite(values, f"worker {worker}'s commit (its buffers)", DIVERGED)
        with self._entry:
            self._require_initialized()
            values = commit_values(self.layout, self.clock, delta, pulled_clock, values)
            commit = Commit(worker, pulled_clock, self.clock, worker if connection is None else connection)
            self.algorithm.server_admit(commit)
            step = self.algorithm.step_bound(largest)
            if not self._bound + step < self._headroom:
                return self._commit_checked(commit, delta, values, out)
            self._bound += step
            receipt = self._count(commit)
            first = self._enter()

        def apply(span: slice, final: bool) -> None:
            self._apply(commit, delta, values, span)
            if out is not None:
                self._hand_out(commit.connection, receipt.clock, out, span, final)

        self._walk(first, apply)
        return receipt

    def _commit_checked(self, commit: Commit, delta: Tensor, values: Tensor, out: Tensor | None) -> Receipt:
        """Apply ``commit`` with the whole center held (the caller holds the entry lock), and undo it, raising a
        ``ValueError``, if it made any element of the center or of the algorithm's state infinite."""
        with self._all_shards():
            center = self.center.clone()
            state = {name: vector.clone() for name, vector in self.algorithm.server_state().items()}
            for span in self._spans:
                self._apply(commit, delta, values, span)
            trainable = self.center[: self.layout.trainable]
            if not all(map(all_finite, (trainable, *self.algorithm.server_state().values()))):
                self.center.copy_(center)
                for name, vector in state.items():
                    self.algorithm.load_server_state(name, vector)
                for name in set(self.algorithm.server_state()) - set(state):  # created by this commit
                    self.algorithm.load_server_state(name, torch.zeros_like(trainable))
                raise ValueError(f"worker {commit.worker}'s commit {self._overflowed()}")
            self._bound = largest_magnitude(trainable)
            receipt = self._count(commit)
            for index, span in enumerate(self._spans):
                if out is not None:
                    self._hand_out(commit.connection, receipt.clock, out, span, index == len(self._spans) - 1)
            return receipt

    def _apply(self, commit: Commit, delta: Tensor, values: Tensor, span: slice) -> None:
        """Fold ``commit`` into one shard: its delta through the algorithm's rule, its values copied."""
        trainable = self.layout.trainable
        stop = min(span.stop, trainable)
        if span.start < stop:
            self.algorithm.server_apply(self.center[span.start : stop], delta[span.start : stop], commit)
        start = max(span.start, trainable)
        if start < span.stop:
            self.center[start : span.stop].copy_(values[start - trainable : span.stop - trainable])

    def _count(self, commit: Commit) -> Receipt:
        """Advance the clock for an applied ``commit`` and record it (under the entry lock)."""
        self.clock += 1
        self.workers.setdefault(commit.worker, WorkerRecord()).add(commit.staleness)
        return Receipt(self.clock, commit.staleness)

    def read(self, out: Tensor, connection: int | None = None) -> Receipt:
        """Copy a consistent snapshot of the center into ``out`` (the center the worker on ``connection``, if
        named, now holds)."""
        with self._entry:
            self._require_initialized()
            receipt = Receipt(self.clock)
            first = self._enter()
        self._walk(first, lambda span, final: self._hand_out(connection, receipt.clock, out, span, final))
        return receipt

    def forget(self, connection: int) -> None:
        """``connection`` closed: free what the algorithm kept for it (the centers it pulled)."""
        with self._quiesced():
            if self.algorithm is not None:
                self.algorithm.server_forget(connection)

    def snapshot(self) -> dict | None:
        """Everything needed to restart from here (see :meth:`restore`), or None before initialization."""
        with self._quiesced():
            if not self.initialized:
                return None
            return {
                "center": self.center.clone(),
                "clock": self.clock,
                "layout": self.layout.to_json(),
                "algorithm": dict(self.algorithm_spec),
                "server_state": {name: value.clone() for name, value in self.algorithm.server_state().items()},
            }

    def restore(self, snapshot: dict) -> None:
        """Start from a :meth:`snapshot`: its layout and algorithm bind later workers, its center and clock are
        the server's."""
        self.configure(Layout.from_json(snapshot["layout"]), snapshot["algorithm"])
        with self._quiesced():
            for name, values in snapshot.get("server_state", {}).items():
                self._load_server_state(name, values)
        self.initialize(snapshot["center"], int(snapshot["clock"]))
        with self._quiesced():
            self._remember_base(self.center[: self.layout.trainable], self.clock)

    def read_state(self, index: int, out: Tensor) -> Receipt:
        """Copy the algorithm's server-side vector number ``index`` (see ``Algorithm.state_names``) into ``out``,
        with the clock it belongs to (the same clock as a center read then)."""
        with self._quiesced():
            self._require_initialized()
            state = self.algorithm.server_state().get(self._state_name(index))
            if state is None:
                out.zero_()
            else:
                out.copy_(state)
            return Receipt(self.clock)

    def load_state(
        self, index: int, values: Tensor, layout: Layout | None = None, algorithm_spec: dict | None = None
    ) -> bool:
        """Restore the algorithm's server-side vector number ``index`` from a checkpoint, before the center is
        initialized; ignored (returns False) once a center is held, exactly like :meth:`initialize`'s values
        (``layout`` and ``algorithm_spec`` as there)."""
        with self._quiesced():
            self._settle(layout, algorithm_spec)
            self._require_layout()
            if self.initialized:
                return False
            self._load_server_state(self._state_name(index), values)
            return True

    def stats(self) -> dict:
        with self._entry:
            return {
                "clock": self.clock,
                "initialized": self.initialized,
                "layout": self.layout.to_json() if self.layout else None,
                "algorithm": self.algorithm_spec,
                "workers": {str(rank): record.to_json() for rank, record in sorted(self.workers.items())},
            }

    def _hand_out(self, connection: int | None, clock: int, out: Tensor, span: slice, final: bool) -> None:
        """Copy one shard of the center into ``out``; after the final one, tell the algorithm what the worker on
        ``connection`` got (only single-shard algorithms look, so their center is whole then)."""
        out[span].copy_(self.center[span])
        if final and connection is not None:
            self.algorithm.server_pulled(connection, clock, self.center[: self.layout.trainable])

    def _enter(self) -> threading.Lock:
        """Take the first shard's lock (the caller holds the entry lock, so the pipeline's order is kept)."""
        self._locks[0].acquire()
        return self._locks[0]

    def _walk(self, held: threading.Lock, visit: Callable[[slice, bool], None]) -> None:
        """Visit every shard in order (``visit(span, final)``), holding its lock and taking the next before
        releasing the current one. Everything that takes several shard locks takes them in this one order.

        The order runs from the end of the center to its start (``_spans`` is built that way) because a commit is
        answered in the buffer it arrived in: every element of a payload lies at or before the bytes of its own
        center element (a 16-bit delta packs into the buffer's first half), so handing out a shard overwrites only
        payload that shards already visited have read. Walking forwards, the first shard's center would overwrite
        the next shard's compressed delta.
        """
        try:
            for index, span in enumerate(self._spans):
                final = index == len(self._spans) - 1
                visit(span, final)
                if not final:
                    following = self._locks[index + 1]
                    following.acquire()
                    held.release()
                    held = following
        finally:
            held.release()

    @contextlib.contextmanager
    def _quiesced(self):
        """Hold the whole center: no commit or pull enters, and those in flight have left every shard."""
        with self._entry, self._all_shards():
            yield

    @contextlib.contextmanager
    def _all_shards(self):
        """Take every shard's lock (the caller holds the entry lock), once commits in flight have left them."""
        with contextlib.ExitStack() as stack:
            for lock in self._locks:  # in walk order: a commit in flight holds one and waits for the next
                stack.enter_context(lock)
            yield

    def _overflowed(self) -> str:
        """Why a change that would make the center overflow its dtype was refused."""
        limit = torch.finfo(self.center.dtype).max
        return OVERFLOWED.format(dtype=str(self.center.dtype).removeprefix("torch."), limit=limit)

    def _remember_base(self, trainable: Tensor, clock: int) -> None:
        if self._base is None:
            self._base = trainable.clone()
        else:
            self._base.copy_(trainable)
        self._base_clock = clock

    def _load_server_state(self, name: str, values: Tensor) -> None:
        require_finite(values, f"the server state {name!r}", RESTORED)
        self.algorithm.load_server_state(name, values)

    def _state_name(self, index: int) -> str:
        names = self.algorithm.state_names
        if not 0 <= index < len(names):
            raise ValueError(f"{self.algorithm.name} keeps {len(names)} server-side state vector(s), not #{index}")
        return names[index]

    def _require_layout(self) -> None:
        if self.layout is None:
            raise RuntimeError("no worker has said hello yet: the server does not know the model's layout")

    def _require_initialized(self) -> None:
        self._require_layout()
        if not self.initialized:
            raise RuntimeError("the center is not initialized: the first worker must send INIT before commits")
