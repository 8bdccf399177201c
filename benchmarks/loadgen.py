"""How many commits per second can a server take, and how does that grow with its connections and its cores?

    python benchmarks/loadgen.py --connections 1 4 16 64 256 --seconds 5 --out benchmarks/results/server-load

One process drives the server alone, without a Trainer or a Python process per worker: it opens N authenticated
connections (one thread each) that commit a prebuilt payload and receive the new center, as fast as the server
answers, for ``--seconds`` after all have connected. Reported per connection count: commits per second (all
connections together), bytes per second (payload sent plus center received) and the median time of one exchange.

Configurations (``--configs``): ``one lock`` (one server whose center is one shard, so commits are applied one at
a time), ``pipelined`` (one server, the default 4 MiB shards: commits pipelined through the shards), and
``k servers`` (the center cut into ``--servers`` parts, each served by its own server process, every commit sent
to all of them; see ``ADAGStrategy(server=...)`` with several addresses).

On a small machine the servers and this process share the cores and loopback, so the absolute rates say little
about a cluster; the ratios between configurations, and how each grows with connections, are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from lightning_adag.flat import Layout
from lightning_adag.payload import CommitPayload
from lightning_adag.server.launch import ServerProcess
from lightning_adag.transports import connect

KEY = "loadgen"
ALGORITHM = {"name": "adag"}


def exchanges_per_second(addresses: list[str], transport: str, layout: Layout, connections: int, seconds: float):
    """Commits per second and exchange times of ``connections`` clients hammering the servers at ``addresses``
    (several: each commit goes to every one of them, each holding its part of ``layout``)."""
    parts = part_layouts(layout, len(addresses))
    clients = [
        [
            connect(transport, address, rank, part, ALGORITHM, KEY.encode(), 60)
            for address, part in zip(addresses, parts)
        ]
        for rank in range(connections)
    ]
    for own in clients[0]:
        own.mailbox.normal_(0, 0.01)
        own.initialize(0)
    payloads = [CommitPayload(part, part.dtype) for part in parts]
    for links in clients:
        for link in links:
            link.mailbox.fill_(1e-6)  # a small, finite delta: the center stays finite however many commits land
    start, stop = threading.Barrier(connections + 1), threading.Event()
    times: list[list[float]] = [[] for _ in range(connections)]

    def hammer(index: int) -> None:
        links, clocks = clients[index], [0] * len(parts)
        start.wait()
        while not stop.is_set():
            began = time.perf_counter()
            for number, (link, payload) in enumerate(zip(links, payloads)):
                link.mailbox.fill_(1e-6)  # the reply overwrote the payload with the center
                clocks[number] = link.commit(clocks[number], 1, payload).clock
            times[index].append(time.perf_counter() - began)

    threads = [threading.Thread(target=hammer, args=(index,), daemon=True) for index in range(connections)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    for links in clients:
        for link in links:
            link.close()
    done = [t for per in times for t in per]
    return len(done) / elapsed, statistics.median(done)


def part_layouts(layout: Layout, parts: int) -> list[Layout]:
    """The layouts of ``parts`` contiguous parts of a vector of ``layout``."""
    cuts = [layout.numel * i // parts for i in range(parts + 1)]
    return [
        Layout(b - a, b - a, layout.dtype, f"{layout.digest}-{i}-of-{parts}")
        for i, (a, b) in enumerate(zip(cuts, cuts[1:]))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=4_800_000, help="elements of the center (the paper's MLP)")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument(
        "--configs", nargs="+", default=["one lock", "pipelined"], choices=["one lock", "pipelined", "k servers"]
    )
    parser.add_argument("--servers", type=int, default=2, help="k for the 'k servers' configuration")
    parser.add_argument("--transport", choices=["tcp", "shm"], default="tcp")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", default="benchmarks/results/server-load")
    args = parser.parse_args()
    torch.set_num_threads(1)
    layout = Layout(args.numel, args.numel, torch.float32, "loadgen")
    nbytes = layout.nbytes
    rows, results = [], []
    for config in args.configs:
        count = args.servers if config == "k servers" else 1
        options = ["--shard-mib", str(nbytes / 2**20 + 1)] if config == "one lock" else []
        parts = part_layouts(layout, count)
        for connections in args.connections:
            servers = [ServerProcess.start(KEY, args.transport, log_level="ERROR", options=options) for _ in parts]
            try:
                addresses = [server.wait_ready() for server in servers]
                rate, median = exchanges_per_second(addresses, args.transport, layout, connections, args.seconds)
            finally:
                for server in servers:
                    server.stop()
            moved = rate * 2 * nbytes  # the payload out and the center back
            results.append({"config": config, "servers": count, "connections": connections, "commits_per_s": rate,
                            "bytes_per_s": moved, "median_exchange_s": median})  # fmt: skip
            rows.append(f"| {config} | {count} | {connections} | {rate:.0f} | {moved / 1e9:.2f} | {median * 1e3:.1f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"machine: {os.cpu_count()} cores; command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}",
        "",
        "| configuration | servers | connections | commits/s | GB/s moved | median exchange (ms) |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
