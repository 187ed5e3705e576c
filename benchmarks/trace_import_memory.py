"""Peak memory and time of streaming imports: the Mooncake sample concatenated N times (default 50).

Builds the concatenated file (plain JSONL, ~22 MB for 50 copies) in a temporary directory, then
runs ``agentsim trace import mooncake`` and ``agentsim trace inspect`` on it, each in a fresh
subprocess, and reports that process's peak resident memory (``ru_maxrss`` of the child) and wall
time. The target (issue 4) is < 1 GiB peak for the import.

    python benchmarks/trace_import_memory.py [--copies 50] [--keep DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "traces" / "data" / "mooncake" / "conversation_first600s.jsonl.gz"
LIMIT_BYTES = 1 << 30


def run_child(args: list[str]) -> tuple[float, int, str]:
    """(wall s, peak RSS bytes, stdout) of ``python -m agentsim *args`` in its own process."""
    code = ("import resource, runpy, sys; sys.argv = ['agentsim'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('agentsim', run_name='__main__')\n"
            "finally:\n    print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"agentsim {' '.join(args)} failed:\n{p.stderr}")
    rss_kb = int(next(ln.split()[1] for ln in p.stderr.splitlines() if ln.startswith("MAXRSS")))
    return wall, rss_kb * 1024, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=50)
    ap.add_argument("--keep", type=Path, default=None, help="write the files here instead of a temp dir")
    a = ap.parse_args()
    with gzip.open(SAMPLE, "rb") as f:
        data = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        d = a.keep or Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        src = d / f"mooncake_x{a.copies}.jsonl"
        with open(src, "wb") as f:
            for _ in range(a.copies):
                f.write(data)
        n_lines = data.count(b"\n") * a.copies
        out = d / f"mooncake_x{a.copies}.parquet"
        baseline = run_child(["--help"])
        imp = run_child(["trace", "import", "mooncake", str(src), "-o", str(out)])
        ins = run_child(["trace", "inspect", str(out), "--json"])
        stats = json.loads(ins[2])
        result = {
            "copies": a.copies, "requests": n_lines, "input_bytes": src.stat().st_size,
            "parquet_bytes": out.stat().st_size,
            "baseline_peak_rss_mib": round(baseline[1] / 2**20, 1),
            "import_wall_s": round(imp[0], 2), "import_peak_rss_mib": round(imp[1] / 2**20, 1),
            "inspect_wall_s": round(ins[0], 2), "inspect_peak_rss_mib": round(ins[1] / 2**20, 1),
            "imported_programs": stats["num_programs"], "prefix_reuse": round(stats["prefix_reuse"], 4),
            "import_under_1_gib": imp[1] < LIMIT_BYTES,
        }
        print(json.dumps(result, indent=2))
        if not result["import_under_1_gib"]:
            sys.exit(1)


if __name__ == "__main__":
    main()
