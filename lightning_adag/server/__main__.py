"""``python -m lightning_adag.server``: run a parameter server.

The strategy starts one per run from global rank 0; it can also be started by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys

from lightning_adag.server.service import Service
from lightning_adag.transports import shm


def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adag-server", description=__doc__)
    parser.add_argument("--unix", required=True, help="path of the Unix socket to listen on (shared-memory transport)")
    parser.add_argument("--shm-prefix", default=f"adag-{os.getpid()}", help="name prefix of the mailbox segments")
    parser.add_argument("--lifeline-fd", type=int, help="stop when this pipe reaches end-of-file (owner died)")
    parser.add_argument("--ready-fd", type=int, help="write one JSON line with the address here once listening")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="[adag-server %(asctime)s] %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _stop)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    service = Service(listener, args.shm_prefix)
    try:
        umask = os.umask(0o077)  # the socket file is created 0600: only this user's processes may connect
        try:
            listener.bind(args.unix)
        finally:
            os.umask(umask)
        listener.listen(256)
        if args.ready_fd is not None:
            os.write(args.ready_fd, (json.dumps({"address": args.unix, "pid": os.getpid()}) + "\n").encode())
            os.close(args.ready_fd)
        logging.getLogger("lightning_adag.server").info("listening on %s", args.unix)
        service.serve(lifeline=args.lifeline_fd)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the clean-up even if asked again
        service.close()
        shm.unlink_quietly(args.unix)
        shm.remove_segments(args.shm_prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
