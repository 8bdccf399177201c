"""Commit + pull bandwidth of the shm and tcp transports next to the raw limits, measured in one run.

    python benchmarks/transport.py --sizes 1e6 1e7 5e7 --repeats 7

For each model size (float32 elements) it times, as medians of ``--repeats`` rounds:

* ``memcpy``: two tensor copies of the vector (one up, one down) -- the bound for shared memory -- with torch's
  default threads, and with one thread (``memcpy1``), which is what the server applies commits with;
* ``socket``: the vector sent over loopback TCP to an echo process and received back with plain ``sendall`` /
  ``recv_into`` -- the bound for TCP;
* ``shm`` and ``tcp``: one ``commit`` (the worker's delta to the server, applied, and the new center back) against
  a real server process.

Bandwidth counts the bytes that cross each way (2 x 4 x N). It prints a markdown table with the ratios
shm / memcpy and tcp / socket.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time

import torch

from lightning_adag import wire
from lightning_adag.flat import Layout
from lightning_adag.server.launch import ServerProcess
from lightning_adag.transports import connect

ECHO = """
import socket, sys
n = int(sys.argv[1])
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = memoryview(bytearray(n))
while True:
    got = 0
    while got < n:
        k = conn.recv_into(buf[got:])
        if not k:
            sys.exit(0)
        got += k
    conn.sendall(buf)
"""


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, socket buffers, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_memcpy(numel: int, repeats: int, threads: int) -> float:
    a, b = torch.randn(numel), torch.empty(numel)

    def round_trip():
        b.copy_(a)
        a.copy_(b)

    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return median_seconds(round_trip, repeats)
    finally:
        torch.set_num_threads(default)


def time_socket(numel: int, repeats: int) -> float:
    nbytes = numel * 4
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(nbytes)], stdout=subprocess.PIPE, text=True)
    try:
        sock = socket.create_connection(("127.0.0.1", int(echo.stdout.readline())))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = wire.byte_view(torch.randn(numel))
        back = memoryview(bytearray(nbytes))

        def round_trip():
            sock.sendall(data)
            wire.recv_into_exact(sock, back)

        seconds = median_seconds(round_trip, repeats)
        sock.close()
        return seconds
    finally:
        echo.kill()
        echo.wait()


def time_transport(transport: str, numel: int, repeats: int) -> float:
    server = ServerProcess.start("bench", transport)
    try:
        address = server.wait_ready()
        layout = Layout(numel=numel, trainable=numel, dtype=torch.float32, digest="bench")
        client = connect(transport, address, 0, layout, {"name": "adag"}, b"bench", timeout=600)
        client.mailbox.normal_()
        clock = client.initialize(0).clock
        client.mailbox.mul_(1e-6)

        def round_trip():
            nonlocal clock
            clock = client.commit(clock, 1).clock

        seconds = median_seconds(round_trip, repeats)
        client.close()
        return seconds
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 5e7], help="elements (float32)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(
        "| elements | MB each way | memcpy GB/s | memcpy1 GB/s | shm GB/s | shm / memcpy | shm / memcpy1 |"
        " socket GB/s | tcp GB/s | tcp / socket |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        numel = int(size)
        moved = 2 * 4 * numel / 1e9
        memcpy = moved / time_memcpy(numel, args.repeats, torch.get_num_threads())
        memcpy1 = moved / time_memcpy(numel, args.repeats, 1)
        shm = moved / time_transport("shm", numel, args.repeats)
        raw = moved / time_socket(numel, args.repeats)
        tcp = moved / time_transport("tcp", numel, args.repeats)
        print(
            f"| {numel:,} | {4 * numel / 1e6:.0f} | {memcpy:.2f} | {memcpy1:.2f} | {shm:.2f} | {shm / memcpy:.2f} |"
            f" {shm / memcpy1:.2f} | {raw:.2f} | {tcp:.2f} | {tcp / raw:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
