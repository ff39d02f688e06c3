"""The daemon's drain rate and CPU per job, for two source trees measured alternately in one run.

    .venv/bin/python bench/ab_drain.py --before /tmp/old [--after .] [--rounds 6] [--batch-sizes 10,100]

Checking out the old tree:  mkdir /tmp/old && git archive <rev> | tar -x -C /tmp/old

Each measurement runs in a fresh process with PYTHONPATH set to its tree, through that tree's
own ``bench/queue_throughput.py`` (so any tree that has it can be compared): N pre-enqueued
no-op jobs drained by ``Worker.run``. Besides jobs/s it reports the CPU each job cost, in the
worker process and in the database's server processes (read from /proc, so PostgreSQL must
run on this machine). On a shared, noisy machine jobs/s swings by a third from run to run;
CPU per job swings far less, and the alternation puts both trees under the same conditions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

# Runs inside the measured tree. It times Worker.run and reads the CPU of this process and of
# every server process connected to the scratch database, before and after.
DRIVER = """
import json, os, sys, time
import anyio
sys.path.insert(0, "bench")
import queue_throughput as qt

TICK = os.sysconf("SC_CLK_TCK")
batch, jobs, url = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cpu = {}

async def server_cpu(pool):
    seconds = {}
    for (pid,) in await pool.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        seconds[pid] = (int(fields[11]) + int(fields[12])) / TICK
    return seconds

run = qt.Worker.run
async def measured_run(self):
    before, started = await server_cpu(self.pool), time.process_time()
    try:
        await run(self)
    finally:
        cpu["worker"] = time.process_time() - started
        after = await server_cpu(self.pool)
        cpu["server"] = sum(value - before.get(pid, 0.0) for pid, value in after.items())
qt.Worker.run = measured_run

config = qt.Config("wordclaw", batch, jobs, plan_size=10, daemon=True)
result = anyio.run(qt.measure_wordclaw, url, config, 300.0)
print(json.dumps({"jobs_per_second": result.jobs_per_second, **cpu}))
"""


def measure(tree: Path, batch: int, jobs: int, url: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(batch), str(jobs), url],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"the drain in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the tree to compare against")
    parser.add_argument("--after", type=Path, default=Path(__file__).resolve().parent.parent, help="default: this tree")
    parser.add_argument("--rounds", type=int, default=6, help="alternations per batch size (default 6)")
    parser.add_argument("--batch-sizes", default="10,100", help="comma-separated (default 10,100)")
    parser.add_argument("--jobs", type=int, default=20000, help="jobs per drain (default 20000)")
    parser.add_argument("--database-url", default=DEFAULT_URL, help=f"an admin URL (default {DEFAULT_URL})")
    args = parser.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    batches = [int(part) for part in args.batch_sizes.split(",") if part.strip()]
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for round_ in range(1, args.rounds + 1):
        for batch in batches:
            for name, tree in trees.items():
                result = measure(tree, batch, args.jobs, args.database_url)
                results.setdefault((name, batch), []).append(result)
                print(
                    f"round {round_} batch {batch:>3} {name:<6}: {result['jobs_per_second']:6.0f} jobs/s, "
                    f"{_per_job(result['worker'], args.jobs):4.0f} + {_per_job(result['server'], args.jobs):4.0f} "
                    "us CPU per job (worker + server)",
                    flush=True,
                )
    print()
    print(f"{'tree':<7} {'batch':>5} {'jobs/s':>8} {'worker us/job':>14} {'server us/job':>14} {'total us/job':>13}")
    for (name, batch), runs in results.items():
        worker = _per_job(statistics.median(r["worker"] for r in runs), args.jobs)
        server = _per_job(statistics.median(r["server"] for r in runs), args.jobs)
        total = _per_job(statistics.median(r["worker"] + r["server"] for r in runs), args.jobs)
        rate = statistics.median(r["jobs_per_second"] for r in runs)
        print(f"{name:<7} {batch:>5} {rate:>8.0f} {worker:>14.0f} {server:>14.0f} {total:>13.0f}")
    print("(medians)")
    print()
    for batch in batches:
        pairs = list(zip(results[("before", batch)], results[("after", batch)], strict=True))
        rate = statistics.median(a["jobs_per_second"] / b["jobs_per_second"] for b, a in pairs)
        cost = statistics.median((a["worker"] + a["server"]) / (b["worker"] + b["server"]) for b, a in pairs)
        print(f"batch {batch:>3}: after / before = {rate:.2f} in jobs/s, {cost:.2f} in CPU per job (median of pairs)")
    return 0


def _per_job(seconds: float, jobs: int) -> float:
    return 1e6 * seconds / jobs


if __name__ == "__main__":
    sys.exit(main())
