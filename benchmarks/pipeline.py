"""Ingest throughput and memory: Ray Data against a single-process pandas run of the same transform.

  python -m benchmarks.pipeline                 # 0.25M, 1M, 4M events + the bounded-memory run
  python -m benchmarks.pipeline --users 1000 --skip-scaling --skip-bounded   # a quick look
  python -m benchmarks.pipeline --only-bounded --bounded-reduces 0 1 0 1     # the reduce cap, alternated

Both variants read the same simulator log from Parquet and write the same
outputs (identical fingerprints are checked), each in its own subprocess so
peak memory is clean: the sum of PSS over the process tree (driver, Ray's
raylet, GCS and workers; the object store's shared pages are counted once),
sampled every 0.2 s. The second part ingests an input about 3x larger than a
deliberately small object store and reports peak memory and bytes spilled, with what a
memory-bound ingest sets: 32 partitions and one reduce (and one write) in flight
(`data.max_parallel_reduces: 1`); `--bounded-partitions` and `--bounded-reduces` change them.

Prints a table and writes benchmarks/out/pipeline.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT = Path("benchmarks/out")


def _role(p, root: int) -> str:
    """Which part of the process tree a process is: the driver, Ray's daemons, or a worker."""
    if p.pid == root:
        return "driver"
    cmd = " ".join(p.cmdline())
    for key, role in (("SpillWorker", "spill/restore workers"), ("RestoreWorker", "spill/restore workers"),
                      ("raylet", "raylet"), ("gcs_server", "gcs"), ("dashboard", "dashboard/agents"),
                      ("DashboardAgent", "dashboard/agents"), ("RuntimeEnvAgent", "dashboard/agents"),
                      ("autoscaler", "autoscaler monitor"),
                      ("runtime_env", "dashboard/agents"), ("log_monitor", "log monitor"),
                      ("_StatsActor", "ray data actors"), ("AutoscalingRequester", "ray data actors"),
                      ("Coordinator", "ray data actors")):
        if key in cmd:
            return role
    return "task workers" if "ray::" in cmd or "default_worker" in cmd else "other"


def _tree_pss(pid: int) -> dict[str, int]:
    """PSS bytes per role over the process tree of `pid`."""
    import psutil

    total: dict[str, int] = {}
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return total
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            role = _role(p, pid)
            total[role] = total.get(role, 0) + p.memory_full_info().pss
            total[f"n {role}"] = total.get(f"n {role}", 0) + 1
    return total


class PeakMemory:
    """The peak of the tree's summed PSS, sampled every 0.2 s, and its breakdown by role at that peak."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.at_peak, self._stop = pid, 0, {}, threading.Event()
        self.t0, self.t_peak = time.perf_counter(), 0.0
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            roles = _tree_pss(self.pid)
            now = sum(v for k, v in roles.items() if not k.startswith("n "))
            if now > self.peak:
                self.peak, self.at_peak, self.t_peak = now, roles, time.perf_counter() - self.t0
            time.sleep(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def make_input(users: int, root: Path) -> dict:
    """A simulator log (small-world shape) written as Parquet, generated once per size."""
    import pandas as pd

    from configs import load_config
    from pipeline.simulator import simulate_local

    root.mkdir(parents=True, exist_ok=True)
    meta = root / "meta.json"
    if meta.exists():
        return json.loads(meta.read_text())
    cfg = load_config("configs/small.yaml", [f"world.num_users={users}"])
    ev, items, us = simulate_local(cfg.world)
    n_files = max(1, len(ev) // 250_000)
    for k in range(n_files):
        ev.iloc[k::n_files].to_parquet(root / f"events-{k:03d}.parquet", index=False)
    items.to_parquet(root / "items.parquet", index=False)
    us.to_parquet(root / "users.parquet", index=False)
    import pyarrow.parquet as pq

    info = {"events": len(ev), "users": users,
            "arrow_bytes": sum(pq.read_table(f).nbytes for f in root.glob("events-*.parquet"))}
    meta.write_text(json.dumps(info))
    del pd
    return info


def run_variant(variant: str, input_dir: str, output: str, object_store: int, partitions: int,
                max_reduces: int = 0) -> dict:
    """Runs inside the child process. `seconds` is the ingest itself (for Ray: on a cluster that is
    up, as `ray job submit` finds it); `seconds_with_start` adds starting the local cluster."""
    import pandas as pd

    from configs import load_config
    from pipeline.readers import RawTables

    cfg = load_config("configs/small.yaml", [f"data.output={output}", "data.progress=false"])
    items = pd.read_parquet(Path(input_dir) / "items.parquet")
    users = pd.read_parquet(Path(input_dir) / "users.parquet")
    files = sorted(str(p) for p in Path(input_dir).glob("events-*.parquet"))
    t0 = time.perf_counter()
    if variant == "pandas":
        from pipeline.ingest import run_ingest_local

        events = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        stats = run_ingest_local(cfg, events, RawTables(None, items, users, True, "simulator"))
        spilled, t_up = 0, t0
    else:
        import ray

        from jobs.common import ray_startup_env
        from pipeline.ingest import run_ingest
        from pipeline.readers import read_parquet_files

        ray_startup_env()
        ray.init(num_cpus=2, object_store_memory=object_store or None, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        t_up = time.perf_counter()
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_partitions=partitions,
                                                                max_parallel_reduces=max_reduces))
        raw = RawTables(read_parquet_files(files, partitions), items, users, True, "simulator")
        stats = run_ingest(cfg, raw)
        spilled = _spilled_bytes()
        ray.shutdown()
    t1 = time.perf_counter()
    return {"seconds": t1 - t_up, "seconds_with_start": t1 - t0, "fingerprint": stats["fingerprint"],
            "events": stats["input_rows"]["events"], "spilled_bytes": spilled, "partitions": partitions,
            "stage_seconds": stats["stage_seconds"], "max_parallel_reduces": max_reduces}


def _spilled_bytes() -> int:
    try:
        from ray._private.internal_api import memory_summary

        text = memory_summary(stats_only=True)
        for line in text.splitlines():
            if "Spilled" in line and "MiB" in line:
                return int(float(line.split("Spilled")[1].split("MiB")[0].strip()) * 2**20)
    except Exception:
        return -1
    return 0


def _stage_at(res: dict, t: float) -> str:
    """The ingest stage running `t` seconds after the child started (its stage clock starts once
    the cluster is up: `seconds_with_start - seconds` after the start), to within the child's own
    import time (~2 s), which the parent's clock also counts."""
    clock = res["seconds_with_start"] - res["seconds"]
    if t < clock:
        return "start-up"
    for name, dt in res["stage_seconds"].items():
        clock += dt
        if t < clock:
            return name
    return "after the ingest"


def measure(variant: str, input_dir: Path, object_store: int = 0, partitions: int = 4, max_reduces: int = 0) -> dict:
    out_dir = OUT / f"ingest-{variant}"
    res_file = OUT / f"result-{variant}.json"
    env = {**os.environ, "RAY_TMPDIR": str((OUT / "ray").resolve()), "PYTHONUNBUFFERED": "1"}
    (OUT / "ray").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.pipeline", "--child", variant, "--input", str(input_dir),
           "--output", str(out_dir), "--object-store", str(object_store), "--result", str(res_file),
           "--partitions", str(partitions), "--max-reduces", str(max_reduces)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as mem:
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{err[-3000:]}")
    res = json.loads(res_file.read_text())
    res["peak_pss_bytes"] = mem.peak
    res["peak_by_role"] = mem.at_peak
    res["peak_stage"] = _stage_at(res, mem.t_peak)
    res["events_per_s"] = res["events"] / res["seconds"]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=5000, help="simulator users (5000 ≈ 1M events)")
    p.add_argument("--skip-bounded", action="store_true")
    p.add_argument("--skip-scaling", action="store_true", help="only --users, not also /4 and x4")
    p.add_argument("--only-bounded", action="store_true", help="only the bounded-memory run")
    p.add_argument("--bounded-partitions", type=int, default=32,
                   help="data.num_partitions of the bounded-memory run (more partitions, smaller groups)")
    p.add_argument("--bounded-reduces", type=int, nargs="+", default=[1],
                   help="data.max_parallel_reduces of the bounded-memory run, one run per value in this order "
                        "(0 = no cap; e.g. 0 1 0 1 alternates the two, side by side)")
    p.add_argument("--max-reduces", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["pandas", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--object-store", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--partitions", type=int, default=4, help="data.num_partitions of the Ray runs (1M events)")
    args = p.parse_args(argv)
    if args.child:
        res = run_variant(args.child, args.input, args.output, args.object_store, args.partitions, args.max_reduces)
        Path(args.result).write_text(json.dumps(res))
        return 0

    OUT.mkdir(parents=True, exist_ok=True)
    sizes = [] if args.only_bounded else [args.users] if args.skip_scaling else sorted(
        {args.users // 4, args.users, args.users * 4})
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "command": "python -m benchmarks.pipeline " + " ".join(argv or sys.argv[1:]), "sizes": {}}
    for users in sizes:
        info = make_input(users, OUT / f"input-{users}")
        print(f"input: {info['events']:,} events ({info['arrow_bytes'] / 2**20:.0f} MiB in Arrow), {users:,} users")
        rows = {}
        for v in ("pandas", "ray"):
            print(f"  running {v} ...", flush=True)
            rows[v] = measure(v, OUT / f"input-{users}", partitions=args.partitions)
        result["sizes"][users] = {"input": info, "variants": rows,
                                  "same_output": rows["pandas"]["fingerprint"] == rows["ray"]["fingerprint"],
                                  "ray_over_pandas_throughput": rows["pandas"]["seconds"] / rows["ray"]["seconds"],
                                  "ray_over_pandas_with_start": rows["pandas"]["seconds"] / rows["ray"]["seconds_with_start"],
                                  "ray_over_pandas_peak_memory": rows["ray"]["peak_pss_bytes"] / rows["pandas"]["peak_pss_bytes"]}
    if not args.skip_bounded:
        big_users = args.users * 4  # ~3x the 80 MiB object store at the default size
        big = make_input(big_users, OUT / f"input-{big_users}")
        store = max(80 * 2**20, big["arrow_bytes"] // 3)
        result["bounded_runs"] = []
        for cap in args.bounded_reduces:
            print(f"  bounded: {big['events']:,} events ({big['arrow_bytes'] / 2**20:.0f} MiB) through a "
                  f"{store / 2**20:.0f} MiB object store, {args.bounded_partitions} partitions, "
                  f"max_parallel_reduces {cap} ...", flush=True)
            result["bounded_runs"].append(measure("ray", OUT / f"input-{big_users}", object_store=store,
                                                  partitions=args.bounded_partitions, max_reduces=cap) | {
                "object_store_bytes": store, "input_arrow_bytes": big["arrow_bytes"]})
        result["bounded"] = result["bounded_runs"][0]
    (OUT / "pipeline.json").write_text(json.dumps(result, indent=2))

    print(f"\n{'events':>10} {'variant':<8}{'seconds':>9}{'+start':>8}{'events/s':>11}{'peak MiB':>10}  fingerprint")
    for r in result["sizes"].values():
        for v, x in r["variants"].items():
            start = f"{x['seconds_with_start']:8.1f}" if v == "ray" else f"{'':8}"
            print(f"{x['events']:>10,} {v:<8}{x['seconds']:>9.1f}{start}{x['events_per_s']:>11,.0f}"
                  f"{x['peak_pss_bytes'] / 2**20:>10.0f}  {x['fingerprint']}")
        print(f"{'':>10} ray/pandas throughput {r['ray_over_pandas_throughput']:.2f}x "
              f"({r['ray_over_pandas_with_start']:.2f}x counting the cluster start), peak memory "
              f"{r['ray_over_pandas_peak_memory']:.2f}x, same output: {r['same_output']}")
    for r in result["sizes"].values():
        for v, x in r["variants"].items():
            print(f"stages {x['events']:,} {v}: " + ", ".join(f"{k} {t:.1f}" for k, t in x["stage_seconds"].items()))
            print("  at its peak, MiB by process role: " + ", ".join(
                f"{k} {b / 2**20:.0f}" for k, b in sorted(x["peak_by_role"].items(), key=lambda kv: -kv[1])
                if not k.startswith("n ")))
    for b in result.get("bounded_runs", []):
        print(f"bounded: {b['events']:,} events, input {b['input_arrow_bytes'] / 2**20:.0f} MiB vs object store "
              f"{b['object_store_bytes'] / 2**20:.0f} MiB ({b['input_arrow_bytes'] / b['object_store_bytes']:.1f}x), "
              f"{b['partitions']} partitions, max_parallel_reduces {b['max_parallel_reduces']}: "
              f"{b['seconds']:.1f}s, peak {b['peak_pss_bytes'] / 2**20:.0f} MiB, "
              f"spilled {b['spilled_bytes'] / 2**20:.0f} MiB, fingerprint {b['fingerprint']}")
        print("stages bounded: " + ", ".join(f"{k} {t:.1f}" for k, t in b["stage_seconds"].items()))
        roles = b["peak_by_role"]
        print(f"the peak fell in: {b['peak_stage']}; at the peak, MiB by process role: " + ", ".join(
            f"{k} {v / 2**20:.0f} ({roles.get('n ' + k, 0)})" for k, v in sorted(roles.items(), key=lambda kv: -kv[1])
            if not k.startswith("n ")))
    print(f"wrote {OUT / 'pipeline.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
