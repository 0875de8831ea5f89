"""How long does a neighbour list take, and where? The host's table builder against the device's.

``e2f.neighbors.neighbor_list`` finds pairs with vesin on the CPU, then orders them (target,
distance, ties) and builds the padded table: on the host for CPU inputs (``_table_numpy``), on
the device for CUDA inputs (``_table_torch``). This probe times both builders on the same
inputs (the suites' liquid boxes, periodic, cutoff 5 Å, the 32 nearest), checks that they give
the same tables bit for bit, and times vesin's own pair search on the CPU and, where its CUDA
backend loads, on the device (its pairs compared with the CPU's as a set)::

    PYTHONPATH=.:scripts python scripts/neighbor_probe.py --out neighbors.jsonl --sizes 1000 10000 100000

One JSON line per (size, builder): median wall ms of ``--repeats`` calls after a warm-up, each
ended by a device synchronisation.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import vesin

from agg_order_probe import write_record
from e2f import neighbors
from suites.workloads import liquid_box


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _builder(device_tables: set):
    def call(pos, box):
        saved = neighbors.DEVICE_TABLES
        neighbors.DEVICE_TABLES = device_tables
        try:
            return neighbors.neighbor_list(pos, 5.0, 32, batch=box.batch, cell=box.cell, pbc=box.pbc)
        finally:
            neighbors.DEVICE_TABLES = saved
    return call


def _vesin_pairs(points, box) -> tuple:
    calculator = vesin.NeighborList(cutoff=5.0, full_list=True)
    i, j, shift = calculator.compute(points, box, True, quantities="ijS")
    return i, j, shift


def _pair_set(i, j, shift) -> set:
    cols = [np.asarray(torch.as_tensor(a).cpu()).astype(np.int64).reshape(len(i), -1) for a in (i, j, shift)]
    return set(map(tuple, np.concatenate(cols, 1).tolist()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with open(args.out, "a") as out_file:
        def write(record):
            write_record(out_file, {"vesin": vesin.__version__, **record})

        for n in args.sizes:
            box = liquid_box(n, device=dev)
            host_nl, dev_nl = _builder(set())(box.pos, box), _builder({dev.type})(box.pos, box)
            same = all(torch.equal(getattr(host_nl, f), getattr(dev_nl, f))
                       for f in ("nbr", "src_atom", "src_shift", "num_neighbors"))
            for name, tables in (("host-table", set()), ("device-table", {dev.type})):
                call = _builder(tables)
                write({"probe": "neighbor-list", "n_atoms": n, "builder": name, "device": dev.type,
                       "ms": _median_ms(lambda: call(box.pos, box), args.repeats), "tables_equal": same,
                       "edges": host_nl.num_edges})
            points = box.pos.detach().cpu().double()
            cell = box.cell[0].detach().cpu().double()
            cpu_pairs = _vesin_pairs(points.numpy(), cell.numpy())
            write({"probe": "vesin-pairs", "n_atoms": n, "device": "cpu", "pairs": len(cpu_pairs[0]),
                   "ms": _median_ms(lambda: _vesin_pairs(points.numpy(), cell.numpy()), args.repeats)})
            if dev.type == "cuda":
                record = {"probe": "vesin-pairs", "n_atoms": n, "device": "cuda"}
                try:
                    gpu_pairs = _vesin_pairs(points.to(dev), cell.to(dev))
                    record.update(pairs=len(gpu_pairs[0]), same_pairs=_pair_set(*gpu_pairs) == _pair_set(*cpu_pairs),
                                  ms=_median_ms(lambda: _vesin_pairs(points.to(dev), cell.to(dev)), args.repeats))
                except Exception as exc:  # a backend that does not load is a result too
                    record["error"] = f"{type(exc).__name__}: {exc}"[:300]
                write(record)


if __name__ == "__main__":
    main()
