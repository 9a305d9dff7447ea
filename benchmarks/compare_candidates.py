"""One table for the kernel changes gpu_check.sh tried: each candidate's kernel/copy beside the kept kernel's.

    python benchmarks/compare_candidates.py $OUT/gpu_check      (gpu_check.sh runs it at the end)

Reads the folder gpu_check.sh writes: `kernels.md` (the kept kernel's `kernels.py` table) and, per patch in
benchmarks/candidates/, `candidate_<name>_kernels.md` and `candidate_<name>_tests.log`. Each kernel/copy
ratio was measured against a copy timed in the same process, so ratios from separate runs compare. The
verdict follows issue 3's target and the candidates README: a candidate is worth applying when its tests
passed, its 16-bit rows on the DRAM-sized batch reach `--target` of the copy, and no row is more than
`--tolerance` below the kept kernel's.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

Row = Tuple[str, str]  # (B×T×d, dtype)
TARGET_SHAPE = "32×512×4096"


def kernel_ratios(path: Path) -> Dict[Row, float]:
    """kernel/copy per (shape, dtype) from a `kernels.py` table; empty when the file is missing."""
    if not path.exists():
        return {}
    ratios: Dict[Row, float] = {}
    header: Optional[list] = None
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if set(cells[0]) <= set("-: ") or "kernel/copy" not in header:
            continue
        try:
            ratios[(cells[0], cells[1])] = float(cells[header.index("kernel/copy")])
        except (ValueError, IndexError):
            continue
    return ratios


def tests_outcome(path: Path) -> str:
    """'passed', 'FAILED', or 'not run', from a pytest log's last summary line."""
    if not path.exists():
        return "not run"
    summary = [line for line in path.read_text().splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if not summary:
        return "not run"
    return "FAILED" if re.search(r"\d+ (failed|error)", summary[-1]) else "passed"


def compare(folder: Path, target: float, tolerance: float) -> str:
    kept = kernel_ratios(folder / "kernels.md")
    names = sorted(p.name[len("candidate_"):-len("_kernels.md")] for p in folder.glob("candidate_*_kernels.md"))
    if not kept or not names:
        return f"compare_candidates: nothing to compare in {folder} (kept table: {bool(kept)}, candidates: {len(names)})"
    candidates = {name: kernel_ratios(folder / f"candidate_{name}_kernels.md") for name in names}
    lines = ["| B×T×d | dtype | kept | " + " | ".join(names) + " |",
             "|---|---|---:|" + "---:|" * len(names)]
    for row, ratio in kept.items():
        cells = [f"{candidates[n][row]:.2f}" if row in candidates[n] else "–" for n in names]
        lines.append(f"| {row[0]} | {row[1]} | {ratio:.2f} | " + " | ".join(cells) + " |")
    lines.append("")
    worth = {}
    for name in names:
        ratios, tests = candidates[name], tests_outcome(folder / f"candidate_{name}_tests.log")
        sixteen_bit = {row: r for row, r in ratios.items() if row[0] == TARGET_SHAPE and row[1] in ("bfloat16", "float16")}
        reaches = bool(sixteen_bit) and all(r >= target for r in sixteen_bit.values())
        losses = [f"{row[0]} {row[1]} {kept[row]:.2f} → {r:.2f}" for row, r in ratios.items()
                  if row in kept and r < kept[row] - tolerance]
        missing = [row for row in kept if row not in ratios]
        verdict = "apply" if tests == "passed" and reaches and not losses and not missing else "do not apply"
        reasons = [f"tests {tests}",
                   f"16-bit {TARGET_SHAPE} " + (", ".join(f"{d} {r:.2f}" for (_, d), r in sorted(sixteen_bit.items()))
                                                if sixteen_bit else "not measured")
                   + f" (target ≥ {target:.2f})"]
        if losses:
            reasons.append("slower: " + "; ".join(losses))
        if missing:
            reasons.append(f"{len(missing)} row(s) not measured")
        lines.append(f"* **{name}: {verdict}** — " + "; ".join(reasons))
        if verdict == "apply":
            worth[name] = min(sixteen_bit.values())
    if worth:
        best = max(worth, key=worth.get)
        lines.append(f"\nBest of those worth applying: **{best}** (its slower 16-bit row {worth[best]:.2f} of the copy); "
                     "candidates that include another (numbered after it) replace it, so apply exactly one.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="gpu_check.sh's log folder ($OUT/gpu_check)")
    parser.add_argument("--target", type=float, default=0.70, help="kernel/copy the 16-bit rows must reach")
    parser.add_argument("--tolerance", type=float, default=0.03, help="how far below the kept kernel a row may be")
    args = parser.parse_args()
    print(compare(args.folder, args.target, args.tolerance))


if __name__ == "__main__":
    main()
