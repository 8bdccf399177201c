"""``python -m lightning_adag.server`` (or ``adag-server``): run a parameter server.

Workers authenticate with the shared key in the environment variable ADAG_AUTH_KEY. Training runs start their
own server unless they are given ``ADAGStrategy(server="host:port")``; a standalone server outlives runs, and
with ``--checkpoint`` it also outlives itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import NoReturn

import torch

from lightning_adag import auth
from lightning_adag.server.core import SHARD_BYTES, ServerCore
from lightning_adag.server.service import Service
from lightning_adag.server.snapshots import Snapshotter
from lightning_adag.transports import shm

log = logging.getLogger("lightning_adag.server")


def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adag-server", description=__doc__)
    parser.add_argument("--host", help="address to listen on for TCP workers (e.g. 0.0.0.0 or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=29600, help="TCP port (0 picks a free one; default 29600)")
    parser.add_argument("--unix", help="path of a Unix socket for workers on this machine (shared memory)")
    parser.add_argument("--checkpoint", help="file for snapshots of the center and clock, restored at start")
    parser.add_argument("--checkpoint-every", type=float, default=60.0, help="seconds between snapshots")
    parser.add_argument("--shm-prefix", default=f"adag-{os.getpid()}", help="name prefix of mailbox segments")
    parser.add_argument("--lifeline-fd", type=int, help=argparse.SUPPRESS)  # owner's pipe: stop at its EOF
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # where to say the address once ready
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for applying commits (default 1: the work is memory-bound, and an OpenMP pool"
        " competing with the workers for cores made a commit 25x slower in our measurements)",
    )
    parser.add_argument(
        "--shard-mib",
        type=float,
        default=SHARD_BYTES / 2**20,
        help="MiB per shard of the center (default %(default)g): commits from different workers pipeline through"
        " the shards, one core each; a size at least the model's turns pipelining off",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if args.host is None and args.unix is None:
        args.host = "127.0.0.1"
    if args.checkpoint_every <= 0:
        parser.error("--checkpoint-every must be positive")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.shard_mib <= 0:
        parser.error("--shard-mib must be positive")
    return args


def open_listeners(args: argparse.Namespace) -> list[tuple[socket.socket, str]]:
    """Bound sockets and the address a worker uses for each: 'host:port' for TCP, the path for Unix."""
    listeners = []
    if args.host is not None:
        tcp = socket.create_server((args.host, args.port), family=_family(args.host))
        host, port = tcp.getsockname()[:2]
        listeners.append((tcp, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"))
    if args.unix is not None:
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o077)  # the socket file is created 0600: only this user's processes may connect
        try:
            unix.bind(args.unix)
        finally:
            os.umask(umask)
        listeners.append((unix, args.unix))
    return listeners


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


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
    signal.signal(signal.SIGTERM, _stop)
    torch.set_num_threads(args.threads)
    core = ServerCore(shard_bytes=max(1, round(args.shard_mib * 2**20)))
    snapshotter = Snapshotter(core, args.checkpoint, args.checkpoint_every) if args.checkpoint else None
    service = Service(core, key, args.shm_prefix)
    stop_snapshots = threading.Event()
    try:
        if snapshotter is not None:
            snapshotter.restore()
            threading.Thread(target=snapshotter.run, args=(stop_snapshots,), daemon=True).start()
        addresses = []
        for sock, address in open_listeners(args):
            service.listen(sock)
            addresses.append(address)
            log.info("listening on %s", address)
        if args.ready_fd is not None:
            os.write(args.ready_fd, (json.dumps({"addresses": addresses, "pid": os.getpid()}) + "\n").encode())
            os.close(args.ready_fd)
        service.serve(lifeline=args.lifeline_fd)
    except (KeyboardInterrupt, SystemExit):
        pass
    except OSError as err:
        log.error("cannot listen: %s (choose another --port, or stop the process that holds it)", err)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the clean-up even if asked again
        log.info("stopping")
        stop_snapshots.set()
        service.close()
        if snapshotter is not None:
            snapshotter.save()
        if args.unix is not None:
            shm.unlink_quietly(args.unix)
        shm.remove_segments(args.shm_prefix)
        log.info("stopped")
    return 0


if __name__ == "__main__":
    main()
