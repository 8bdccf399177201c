"""``python -m lightning_adag.server`` (or ``adag-server``): run a parameter server.

Workers authenticate with the shared key in the environment variable ADAG_AUTH_KEY. Training runs start their
own server unless they are given ``ADAGStrategy(server="host:port")``; a standalone server outlives runs, and
with ``--checkpoint`` it also outlives itself.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
from typing import NoReturn

import torch

from lightning_adag import auth
from lightning_adag.server.aggregator import GATHER, AggregatorCore
from lightning_adag.server.core import SHARD_BYTES, ServerCore
from lightning_adag.server.service import MAX_HANDSHAKES, Service
from lightning_adag.server.snapshots import SnapshotError, Snapshotter
from lightning_adag.transports import TRANSPORTS
from lightning_adag.transports.base import Listener

log = logging.getLogger("lightning_adag.server")


_ADDRESS_IN_USE = " (another server listens there: stop it, or choose another --port or --unix path)"


def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adag-server", description=__doc__)
    parser.add_argument("--host", help="address to listen on for TCP workers (e.g. 0.0.0.0 or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=29600, help="TCP port (0 picks a free one; default 29600)")
    parser.add_argument("--unix", help="path of a Unix socket for workers on this machine (shared memory)")
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="TRANSPORT:WHERE",
        help=f"listen for workers of a transport ({', '.join(TRANSPORTS)}) at an address in its terms, for example"
        " tcp:0.0.0.0:29600 or shm:/tmp/adag.sock (repeatable; --host/--port and --unix are shorthands)",
    )
    parser.add_argument("--checkpoint", help="file for snapshots of the center and clock, restored at start")
    parser.add_argument("--checkpoint-every", type=float, default=60.0, help="seconds between snapshots")
    parser.add_argument("--lifeline-fd", type=int, help=argparse.SUPPRESS)  # owner's pipe: stop at its EOF
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # where to say the address once ready
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for applying commits (default 1: the work is memory-bound, and an OpenMP pool"
        " competes with the workers for cores)",
    )
    parser.add_argument(
        "--shard-mib",
        type=float,
        default=SHARD_BYTES / 2**20,
        help="MiB per shard of the center (default %(default)g): commits from different workers pipeline through"
        " the shards, one core each; a size at least the model's turns pipelining off",
    )
    parser.add_argument(
        "--max-handshakes",
        type=int,
        default=MAX_HANDSHAKES,
        help="peers allowed to be joining at once (default %(default)s); more are told the server is busy and retry,"
        " and a peer silent for a second makes room for a new one",
    )
    parser.add_argument(
        "--upstream",
        metavar="HOST:PORT",
        help="run as a node's aggregator: sum the local workers' commits and send them to the server at HOST:PORT"
        " (over TCP, with the same key) as one commit per round; see lightning_adag.server.aggregator",
    )
    parser.add_argument("--node-rank", type=int, default=0, help="with --upstream: the rank this node joins as")
    parser.add_argument(
        "--node-workers", type=int, default=1, help="with --upstream: the local workers each round waits for"
    )
    parser.add_argument(
        "--gather-ms",
        type=float,
        default=GATHER * 1e3,
        help="with --upstream: the longest a round waits for the rest of the local workers (default %(default)g)",
    )
    parser.add_argument(
        "--upstream-timeout", type=float, default=120.0, help="with --upstream: seconds to wait for that server"
    )
    parser.add_argument(
        "--part",
        metavar="I/K",
        help="hold part I (from 0) of a center cut into K parts, one server each; workers connect to all K"
        " (ADAGStrategy(server='host:port,host:port,...'), in part order)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if args.host is None and args.unix is None and not args.listen:
        args.host = "127.0.0.1"
    for endpoint in args.listen:
        name, _, where = endpoint.partition(":")
        if name not in TRANSPORTS or not where:
            parser.error(f"--listen takes TRANSPORT:WHERE with TRANSPORT one of {list(TRANSPORTS)}, got {endpoint!r}")
    if args.host is not None:
        host = f"[{args.host}]" if ":" in args.host else args.host
        args.listen.append(f"tcp:{host}:{args.port}")
    if args.unix is not None:
        args.listen.append(f"shm:{args.unix}")
    if args.checkpoint_every <= 0:
        parser.error("--checkpoint-every must be positive")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.max_handshakes < 1:
        parser.error("--max-handshakes must be at least 1")
    if args.shard_mib <= 0:
        parser.error("--shard-mib must be positive")
    if args.part is not None:
        index, _, count = args.part.partition("/")
        if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
            parser.error(f"--part takes I/K with 0 <= I < K (part I of K), got {args.part!r}")
        if args.upstream is not None:
            parser.error("an aggregator holds no part of the center: give --part to the servers it sends to")
        args.part = (int(index), int(count)) if int(count) > 1 else None  # part 0 of 1: the whole center
    if args.upstream is not None:
        if args.checkpoint:
            parser.error("an aggregator holds no center of its own: give --checkpoint to the server it sends to")
        if args.node_workers < 1 or args.node_rank < 0:
            parser.error("--node-workers must be at least 1 and --node-rank at least 0")
        if args.gather_ms < 0 or args.upstream_timeout <= 0:
            parser.error("--gather-ms must be at least 0 and --upstream-timeout positive")
    return args


def open_listener(endpoint: str) -> Listener:
    """A bound listener for ``TRANSPORT:WHERE``."""
    name, _, where = endpoint.partition(":")
    return TRANSPORTS[name].listener(where)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the server until stopped, then exit at once: the clean-up that matters is done by then, and the
    interpreter's own teardown of torch took seconds on a loaded machine, past the owner's patience."""
    code = serve(parse_args(argv))
    logging.shutdown()
    os._exit(code)


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="[adag-server %(asctime)s] %(message)s", stream=sys.stderr)
    try:
        key = auth.key_from_env()
    except auth.AuthenticationError as err:
        log.error("%s", err)
        return 2
    if advice := auth.weak_key_advice(key):
        log.warning("%s", advice)
    signal.signal(signal.SIGTERM, _stop)
    torch.set_num_threads(args.threads)
    if args.upstream is None:
        aggregator = None
        core = ServerCore(shard_bytes=max(1, round(args.shard_mib * 2**20)))
        snapshotter = Snapshotter(core, args.checkpoint, args.checkpoint_every) if args.checkpoint else None
        service = Service(core, key, part=args.part, max_handshakes=args.max_handshakes)
    else:  # a node's aggregator (no --checkpoint: it holds no center of its own)
        aggregator = AggregatorCore(
            args.upstream, key, args.node_rank, args.node_workers, args.gather_ms / 1e3, args.upstream_timeout
        )
        snapshotter = None
        service = Service(aggregator, key, assignments=aggregator, max_handshakes=args.max_handshakes)
    stop_snapshots = threading.Event()
    code = 0
    try:
        if snapshotter is not None:
            snapshotter.check_path()
            snapshotter.restore()
            threading.Thread(target=snapshotter.run, args=(stop_snapshots,), daemon=True).start()
        addresses = []
        for endpoint in args.listen:
            try:
                listener = open_listener(endpoint)
            except OSError as err:
                log.error(
                    "cannot listen on %s: %s%s", endpoint, err, _ADDRESS_IN_USE if err.errno == errno.EADDRINUSE else ""
                )
                return 1
            service.listen(listener)
            addresses.append(listener.address)
            log.info("listening on %s", listener.address)
        if args.ready_fd is not None:
            os.write(args.ready_fd, (json.dumps({"addresses": addresses, "pid": os.getpid()}) + "\n").encode())
            os.close(args.ready_fd)
        service.serve(lifeline=args.lifeline_fd)
    except (KeyboardInterrupt, SystemExit):
        pass
    except SnapshotError as err:
        log.error("%s", err)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the clean-up even if asked again
        log.info("stopping")
        stop_snapshots.set()
        service.close()
        if aggregator is not None:
            aggregator.close()
        if snapshotter is not None and code == 0 and not snapshotter.save_or_log():
            code = 1  # the clean-up is done; the exit code says that the last commits are not in the snapshot
        log.info("stopped")
    return code


if __name__ == "__main__":
    main()
