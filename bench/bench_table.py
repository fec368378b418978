"""Weight-block table throughput: ours vs raw pyarrow, tokenizer speed, opening a 10^4-member zoo.

    python bench/bench_table.py [--mb 100] [--members 10000]

Prints one table per measurement; S3 rows use a moto server on 127.0.0.1 (a real S3 endpoint,
loopback only), so they measure our S3 path's overheads, not AWS bandwidth.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rayweights.blocks import WeightLayout
from rayweights.storage import resolve, write_bytes_atomic
from rayweights.table import CheckpointRecord, ZooWriter, open_zoo


def timed(fn, repeat=5):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def start_moto():
    from moto.server import ThreadedMotoServer
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    ep = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": ep, "RAYWEIGHTS_S3_ENDPOINT": ep})
    boto3.client("s3", endpoint_url=ep, region_name="us-east-1").create_bucket(Bucket="bench")
    return server


def bench_io(root: str, mb: int, label: str):
    """One member holding ~mb MB of blocks: table API vs raw pyarrow write/read of the same table."""
    bs = 256
    n_params = mb * 2**20 // 4 // 8           # 8 checkpoints per member
    sd = {f"layer{i}.weight": torch.randn(n_params // 8) for i in range(8)}
    layout = WeightLayout.from_state_dict(sd, block_size=bs)
    ckpts = [CheckpointRecord(step=s, state_dict={k: v + s for k, v in sd.items()}) for s in range(8)]
    uri = root.rstrip("/") + f"/io-{uuid.uuid4().hex[:6]}"
    w = ZooWriter.create(uri, layout)
    table = w.build_table("m0", "t0", "c", 0, ckpts)
    nbytes = 8 * layout.num_blocks * bs * 4
    t_ours_w, _ = timed(lambda: w.write_member("m0", "t0", "c", 0, ckpts))
    raw = resolve(uri).join("raw.parquet")

    def raw_write():
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_bytes_atomic(raw, sink.getvalue().to_pybytes())
    t_raw_w, _ = timed(raw_write)
    zoo = open_zoo(uri)
    t_ours_r, got = timed(lambda: zoo.blocks(["m0"]))
    t_raw_r, _ = timed(lambda: pq.read_table(raw.path, filesystem=raw.fs))
    assert got.shape[0] == 8
    mbs = lambda t: nbytes / t / 2**20
    return [(f"{label} write", mbs(t_ours_w), mbs(t_raw_w)), (f"{label} read", mbs(t_ours_r), mbs(t_raw_r))], nbytes


def bench_tokenizer():
    torch.set_num_threads(1)
    sd = {}
    for i in range(10):   # 10 M parameters in mixed layer shapes, fp32
        sd[f"blocks.{i}.conv.weight"] = torch.randn(256, 256, 3, 3)
        sd[f"blocks.{i}.conv.bias"] = torch.randn(256)
        sd[f"blocks.{i}.bn.weight"] = torch.randn(256)
        sd[f"blocks.{i}.bn.bias"] = torch.randn(256)
        sd[f"blocks.{i}.fc.weight"] = torch.randn(256, 1545)
    n = sum(v.numel() for v in sd.values())
    rows = []
    for rule in (1, 2, 3):
        L = WeightLayout.from_state_dict(sd, rule=rule, block_size=256)
        L.tokenize(sd)   # warm caches (rule-2 permutation)
        t_tok, blocks = timed(lambda: L.tokenize(sd), 5)
        t_det, _ = timed(lambda: L.detokenize(blocks), 5)
        rows.append((rule, n, n * 4 / t_tok / 1e9, n * 4 / t_det / 1e9))
    torch.set_num_threads(os.cpu_count() or 1)
    return rows


def bench_open(root: str, members: int, label: str):
    """A 10^4-member zoo: time to open it and to read the first batch (in-process and via Ray Data)."""
    sd = {"fc.weight": torch.randn(16, 16), "fc.bias": torch.randn(16)}
    layout = WeightLayout.from_state_dict(sd, block_size=64)
    uri = root.rstrip("/") + f"/many-{uuid.uuid4().hex[:6]}"
    w = ZooWriter.create(uri, layout)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda i: w.write_member(f"m{i:06d}", f"t{i % 100:03d}", f"c{i % 100}", i,
                                             [CheckpointRecord(0, blocks=layout.tokenize(sd))]), range(members)))
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    w.consolidate()
    t_cons = time.perf_counter() - t0
    t_open, zoo = timed(lambda: open_zoo(uri), 1)
    assert len(zoo) == members
    t0 = time.perf_counter()
    zoo.blocks([zoo.members.column("member_id")[0].as_py()])
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch = next(iter(zoo.dataset(columns=["block"]).iter_batches(batch_size=256)))
    t_ray = time.perf_counter() - t0
    assert len(batch["block"]) > 0
    return (label, members, t_write, t_cons, t_open, t_first, t_ray)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--members", type=int, default=10_000)
    ap.add_argument("--skip-open", action="store_true", help="skip the 10^4-member zoo section")
    a = ap.parse_args()
    server = start_moto()
    tmp = tempfile.mkdtemp(prefix="rw-bench-")
    io_rows = []
    for root, label in ((tmp, "local"), ("s3://bench/zoos", "s3-loopback")):
        rows, nbytes = bench_io(root, a.mb, label)
        io_rows += rows
    print(f"\n## Table I/O: one member, {nbytes / 2**20:.0f} MB of blocks (best of 5)\n")
    print("| path | ours MB/s | raw pyarrow MB/s | ours/raw |\n|---|---|---|---|")
    for name, ours, raw in io_rows:
        print(f"| {name} | {ours:.0f} | {raw:.0f} | {ours / raw:.2f} |")
    print("\n## Tokenizer, 10 M-parameter state_dict, one core (best of 5)\n")
    print("| rule | params | tokenize GB/s | detokenize GB/s |\n|---|---|---|---|")
    for rule, n, tok, det in bench_tokenizer():
        print(f"| {rule} | {n / 1e6:.1f} M | {tok:.2f} | {det:.2f} |")
    if a.skip_open:
        server.stop()
        return
    from rayweights.runtime import ray_init
    ray_init()
    open_rows = [bench_open(tmp, a.members, "local"), bench_open("s3://bench/zoos", a.members, "s3-loopback")]
    print(f"\n## Opening a {a.members}-member zoo (manifest snapshot + listing; no request per member)\n")
    print("| path | members | write all s | consolidate s | open_zoo s | first member read s | first Ray Data batch s |")
    print("|---|---|---|---|---|---|---|")
    for label, m, tw, tc, to, tf, tr in open_rows:
        print(f"| {label} | {m} | {tw:.1f} | {tc:.2f} | {to:.2f} | {tf:.3f} | {tr:.2f} |")
    server.stop()


if __name__ == "__main__":
    main()
