"""benchmarks/compare_candidates.py: the verdict table gpu_check.sh prints for the kernel changes it tried."""
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import compare_candidates  # noqa: E402

HEADER = ("device=NVIDIA H200 backend=cuda torch=2.11.0+cu130 threads=16\n\n"
          "| B×T×d | dtype | kernel ms | kernel GB/s | copy GB/s (read+write) | kernel/copy | copy read GB/s | "
          "kernel/copy read | one eager launch ms |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n")


def table(ratios):
    rows = "".join(f"| {shape} | {dtype} | 0.038 | 2618.0 | 4080.0 | {r:.2f} | 2040.0 | {2 * r:.2f} | 0.050 |\n"
                   for (shape, dtype), r in ratios.items())
    return HEADER + rows + "\n24 layers of 128×35×1024 bfloat16 (wall, host path included): ...\n"


KEPT = {("64×128×1024", "float32"): 0.56, ("32×512×4096", "float32"): 0.84,
        ("32×512×4096", "bfloat16"): 0.64, ("32×512×4096", "float16"): 0.66}


def write(folder, name, ratios, tests="12 passed, 3 skipped in 9.1s"):
    (folder / f"candidate_{name}_kernels.md").write_text(table(ratios))
    (folder / f"candidate_{name}_tests.log").write_text(f"....\n{tests}\n")


def test_a_candidate_is_worth_applying_only_when_tested_at_target_and_nowhere_slower(tmp_path):
    (tmp_path / "kernels.md").write_text(table(KEPT))
    write(tmp_path, "1-good", {**KEPT, ("32×512×4096", "bfloat16"): 0.79, ("32×512×4096", "float16"): 0.81})
    write(tmp_path, "2-short", {**KEPT, ("32×512×4096", "bfloat16"): 0.69, ("32×512×4096", "float16"): 0.75})
    write(tmp_path, "3-slower", {**KEPT, ("32×512×4096", "bfloat16"): 0.9, ("32×512×4096", "float16"): 0.9,
                                 ("64×128×1024", "float32"): 0.50})
    write(tmp_path, "4-broken", {**KEPT, ("32×512×4096", "bfloat16"): 0.9, ("32×512×4096", "float16"): 0.9},
          tests="1 failed, 11 passed in 9.0s")
    write(tmp_path, "5-better", {**KEPT, ("32×512×4096", "bfloat16"): 0.85, ("32×512×4096", "float16"): 0.83})
    out = compare_candidates.compare(tmp_path, target=0.70, tolerance=0.03)
    assert "| 32×512×4096 | bfloat16 | 0.64 | 0.79 | 0.69 | 0.90 | 0.90 | 0.85 |" in out
    assert "**1-good: apply**" in out and "**5-better: apply**" in out
    assert "**2-short: do not apply** — tests passed; 16-bit 32×512×4096 bfloat16 0.69, float16 0.75" in out
    assert "**3-slower: do not apply**" in out and "slower: 64×128×1024 float32 0.56 → 0.50" in out
    assert "**4-broken: do not apply** — tests FAILED" in out
    assert "Best of those worth applying: **5-better** (its slower 16-bit row 0.83 of the copy)" in out


def test_nothing_to_compare_is_said_not_hidden(tmp_path):
    assert "nothing to compare" in compare_candidates.compare(tmp_path, 0.70, 0.03)
    (tmp_path / "kernels.md").write_text(table(KEPT))
    write(tmp_path, "1-cut-short", {("64×128×1024", "float32"): 0.57})  # the run ended before its 16-bit rows
    (tmp_path / "candidate_1-cut-short_tests.log").unlink()
    out = compare_candidates.compare(tmp_path, 0.70, 0.03)
    assert "**1-cut-short: do not apply** — tests not run; 16-bit 32×512×4096 not measured" in out
    assert "3 row(s) not measured" in out and "Best of" not in out
