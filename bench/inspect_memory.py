"""Peak RSS and wall time of `mergesmith inspect` against `mergesmith merge` of the same config, on the three
Qwen2-0.5B-shaped models of bench/speed.py (made once by its generator, in its cache folder).

    nice -n 5 python bench/inspect_memory.py [--runs 3] [--methods ties task_arithmetic]

Each command runs in a fresh process through speed.py's launcher (its own peak RSS, dirty pages flushed
first); runs alternate between the two commands. Prints the median of each and their ratios; exits 1 if
inspect's peak RSS is not below the merge's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the generator and the measuring launcher)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=["ties", "task_arithmetic"])
    args = ap.parse_args()
    root = speed.make_models(speed.SHAPE["layers"])
    work = speed.CACHE / "inspect-runs"
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "mergesmith"]
    worse = False
    print("| method | merge | peak RSS | inspect | peak RSS | time ratio | RSS ratio |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        cfg = work / f"{method}.yml"
        cfg.write_text(speed.METHODS[method].format(b=root / "base", f1=root / "ft1", f2=root / "ft2"))
        out, report = work / "out", work / "inspect.json"
        merge_runs, inspect_runs = [], []
        for _ in range(args.runs):
            shutil.rmtree(out, ignore_errors=True)
            merge_runs.append(speed.run_measured([*cli, "merge", str(cfg), str(out), "-q"]))
            inspect_runs.append(
                speed.run_measured([*cli, "inspect", str(cfg), "-q", "--json", str(report), "--overwrite"])
            )
        mt, mr = (statistics.median(x[k] for x in merge_runs) for k in (0, 1))
        it, ir = (statistics.median(x[k] for x in inspect_runs) for k in (0, 1))
        worse |= ir >= mr
        print(
            f"| {method} | {mt:.1f} s | {mr:.0f} MiB | {it:.1f} s | {ir:.0f} MiB | {it / mt:.2f} | {ir / mr:.2f} |"
        )
    shutil.rmtree(work / "out", ignore_errors=True)
    return 1 if worse else 0


if __name__ == "__main__":
    raise SystemExit(main())
