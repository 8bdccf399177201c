"""How many bytes cross to the server per worker commit, with and without a node-local aggregator?

    python benchmarks/aggregation.py --nodes 2 --workers 2 4 --repeats 3

Simulates ``--nodes`` nodes on this machine: a real server process (TCP) and, per node, ``--workers`` client
threads of this process that each commit ``--commits`` times a model of ``--params`` float32 parameters, pausing
``--compute-ms`` (with ±25 % jitter) before each commit as a window of training would. ``direct``: every worker
commits to the server over TCP, as ``ADAGStrategy()`` across nodes; ``aggregated``: each node's workers commit over
shared memory to that node's aggregator process, which alone talks to the server, as
``ADAGStrategy(aggregate="node")``.

The bytes are the kernel's count (``ss``'s ``bytes_received`` + ``bytes_sent``) on the server's TCP sockets over
the commit phase: everything that crossed to and from the server, headers included. Reported per configuration
(medians of ``--repeats``): those bytes per worker commit, worker commits per upstream commit, the median time a
commit blocks its worker, and the wall time of the phase.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch

from lightning_adag.flat import Layout
from lightning_adag.server.launch import ServerProcess
from lightning_adag.transports import connect

KEY = "aggregation-bench"
SPEC = {"name": "adag"}


def server_bytes(port: int) -> int:
    """Bytes sent and received so far on the established TCP connections of the server at ``port``."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    return sum(int(n) for n in re.findall(r"bytes_(?:sent|received):(\d+)", out))


def run(nodes: int, workers: int, aggregated: bool, layout: Layout, commits: int, compute: float) -> dict:
    server = ServerProcess.start(KEY, "tcp", log_level="ERROR")
    aggregators: list[ServerProcess] = []
    clients = []
    try:
        address = server.wait_ready()
        port = int(address.rpartition(":")[2])
        seed = connect("tcp", address, 10_000, layout, SPEC, KEY.encode(), 120)
        seed.mailbox.normal_(0, 0.01)
        seed.initialize(0)
        seed.close()
        for node in range(nodes):
            if aggregated:
                options = ("--upstream", address, "--node-rank", str(node), "--node-workers", str(workers))
                aggregators.append(ServerProcess.start(KEY, "shm", log_level="ERROR", options=options))
                where = ("shm", aggregators[-1].wait_ready())
            else:
                where = ("tcp", address)
            for local in range(workers):
                rank = node * workers + local
                clients.append(connect(where[0], where[1], rank, layout, SPEC, KEY.encode(), 120))
        pulled_all, go = threading.Barrier(len(clients) + 1), threading.Barrier(len(clients) + 1)
        latencies: list[list[float]] = [[] for _ in clients]

        def work(index: int, client) -> None:
            jitter = random.Random(index)
            pulled = client.pull().clock
            pulled_all.wait()
            go.wait()
            for _ in range(commits):
                time.sleep(compute * jitter.uniform(0.75, 1.25))
                client.mailbox.fill_(1e-6)
                start = time.perf_counter()
                pulled = client.commit(pulled, 1).clock
                latencies[index].append(time.perf_counter() - start)

        threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(clients)]
        for thread in threads:
            thread.start()
        pulled_all.wait()
        before = server_bytes(port)
        go.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        crossed = server_bytes(port) - before
        upstream = clients[0].stats()
        upstream_commits = sum(w["commits"] for w in upstream["workers"].values())
        return {
            "bytes_per_worker_commit": crossed / (len(clients) * commits),
            "worker_commits_per_upstream_commit": len(clients) * commits / upstream_commits,
            "commit_ms_median": 1e3 * statistics.median(t for per in latencies for t in per),
            "wall_s": wall,
        }
    finally:
        for client in clients:
            client.close()
        for aggregator in aggregators:
            aggregator.stop()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4], help="workers per node")
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--commits", type=int, default=20, help="commits per worker")
    parser.add_argument("--compute-ms", type=float, default=50.0, help="time between two commits of a worker")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    layout = Layout(args.params, args.params, torch.float32, "aggregation-bench")
    results = []
    print("| workers per node | configuration | bytes per worker commit | worker commits per upstream commit |"
          " commit ms (median) | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for workers in args.workers:
        for aggregated in (False, True):
            runs = [
                run(args.nodes, workers, aggregated, layout, args.commits, args.compute_ms / 1e3)
                for _ in range(args.repeats)
            ]
            row = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            row.update(workers=workers, configuration="aggregated" if aggregated else "direct", runs=runs)
            results.append(row)
            print(
                f"| {workers} | {row['configuration']} | {row['bytes_per_worker_commit'] / 2**20:.2f} MiB |"
                f" {row['worker_commits_per_upstream_commit']:.2f} | {row['commit_ms_median']:.1f} |"
                f" {row['wall_s']:.1f} |",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
