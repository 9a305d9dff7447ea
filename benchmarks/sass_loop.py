"""What the CUDA kernel's token loop executes, read from its SASS: no GPU needed.

Compiles csrc/pool_fold_cuda.cu for sm_90 (nvcc -cubin), disassembles it (cuobjdump -sass) and, for every
kernel instantiation, finds the token loop — the loop that loads the most bytes from global memory (LDG, or
LDGSTS for asynchronous copies) — and counts what one pass of it issues: instructions per 16 bytes loaded,
widenings (F2F), float64 FMAs, integer work, local-memory (spill) accesses. Registers and spills come from
ptxas. Each patch named on the command line (e.g. benchmarks/candidates/*.patch) is applied to a copy of
csrc/ and read the same way, so a kernel change can be weighed before a GPU runs it:

    python benchmarks/sass_loop.py benchmarks/candidates/*.patch

Needs nvcc, cuobjdump and nvdisasm (CUDA toolkit, or `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`;
--cuobjdump names one).
The counts are static — what the loop issues, not where it stalls; ncu on a GPU says that
(benchmarks/ncu_case.py).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORAGE_NAMES = {"f": "float32", "d": "float64", "NS_4HalfE": "float16", "NS_8BFloat16E": "bfloat16"}
INTEGER_OPS = {"IMAD", "IADD3", "ISETP", "LOP3", "LEA", "SHF", "PRMT", "VIADD", "SEL", "IABS", "IMNMX", "VIMNMX"}


@dataclass
class Loop:
    kernel: str            # e.g. "bfloat16 16-byte"
    registers: int
    spill_bytes: int       # spill stores + loads, as ptxas reports them
    instructions: int      # in one pass of the token loop
    loaded_bytes: int      # per thread, by its global loads (or asynchronous copies)
    ops: collections.Counter
    listing: list[str]     # the loop's SASS, one instruction per line

    @property
    def per_16_bytes(self) -> float:
        return 16 * self.instructions / max(self.loaded_bytes, 1)


def find_cuobjdump(given: str | None) -> str:
    candidates = [given, os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    # pip's nvidia-cuda-cuobjdump wheel: site-packages/nvidia/cu*/bin/cuobjdump
    candidates += sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "bin", "cuobjdump")))
    without_nvdisasm = None
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            # cuobjdump -sass runs nvdisasm, from beside it or from PATH
            if os.access(os.path.join(os.path.dirname(path), "nvdisasm"), os.X_OK) or shutil.which("nvdisasm"):
                return path
            without_nvdisasm = without_nvdisasm or path
    if without_nvdisasm:
        sys.exit(f"sass_loop.py: {without_nvdisasm} needs nvdisasm beside it or on PATH "
                 "(pip install nvidia-cuda-nvdisasm)")
    sys.exit("sass_loop.py: no cuobjdump found; install the CUDA toolkit's, `pip install nvidia-cuda-cuobjdump "
             "nvidia-cuda-nvdisasm`, or pass --cuobjdump PATH")


def kernel_label(mangled: str) -> str:
    match = re.search(r"pool_fold_kernelI(.+?)Lb([01])EEEv", mangled)
    if not match:
        return mangled
    storage = STORAGE_NAMES.get(match.group(1), match.group(1))
    return f"{storage} {'16-byte' if match.group(2) == '1' else 'generic'}"


def compile_and_read(csrc: Path, cuobjdump: str, arch: str) -> list[Loop]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        build = subprocess.run(["nvcc", "-std=c++17", "-O3", f"-arch={arch}", "-cubin", "-DHSVFAST_WITH_CUDA",
                                f"-I{csrc}", "-Xptxas", "-v", "-o", cubin, str(csrc / "pool_fold_cuda.cu")],
                               capture_output=True, text=True)
        if build.returncode:
            sys.exit(f"nvcc failed on {csrc}:\n{build.stderr}")
        # cuobjdump runs nvdisasm: look for it beside cuobjdump too (pip's wheels install both there)
        env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + os.pathsep + os.environ.get("PATH", ""))
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, env=env)
        if sass.returncode:
            sys.exit(f"cuobjdump failed: {sass.stderr.strip()}")
    resources = parse_ptxas(build.stderr)
    loops = []
    for mangled, instructions in parse_sass(sass.stdout).items():
        registers, spills = resources.get(mangled, (0, 0))
        loops.append(token_loop(kernel_label(mangled), instructions, registers, spills))
    return sorted(loops, key=lambda loop: loop.kernel)


def parse_ptxas(log: str) -> dict[str, tuple[int, int]]:
    """Registers and spilled bytes (stores + loads) per mangled kernel name, from `ptxas -v`."""
    out, name, spills = {}, None, 0
    for line in log.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            name = m.group(1)
        elif (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)) and name:
            spills = int(m.group(1)) + int(m.group(2))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            out[name] = (int(m.group(1)), spills)
            name = None
    return out


def parse_sass(sass: str) -> dict[str, list[tuple[int, str]]]:
    """(address, instruction text with its predicate guard, without the encoding comment) per kernel."""
    kernels: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = kernels.setdefault(m.group(1), [])
        elif current is not None and (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*/\*", line)):
            current.append((int(m.group(1), 16), m.group(2).rstrip(" ;")))
    return kernels


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0]


def loaded_bytes(op: str) -> int:
    """Bytes a global load (LDG) or asynchronous global-to-shared copy (LDGSTS) moves per thread."""
    if not op.startswith("LDG"):
        return 0
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return size
    return 4


def token_loop(label: str, instructions: list[tuple[int, str]], registers: int, spills: int) -> Loop:
    """The backward branch whose body loads the most bytes (the shortest such body on a tie), with no barrier
    or exit in it."""
    best = None
    for address, text in instructions:
        m = re.search(r"\bBRA\s+(?:`\()?[^0-9]*0x([0-9a-f]+)", text)
        if not m or "BRA.DIV" in text:
            continue
        target = int(m.group(1), 16)
        if target >= address:
            continue
        span = [(a, t) for a, t in instructions if target <= a <= address]
        body = [opcode(t) for _, t in span]
        if any(op.startswith(("BAR", "EXIT")) for op in body):  # a branch back around the epilogue, not the loop
            continue
        loads = sum(loaded_bytes(op) for op in body)
        if best is None or (loads, -len(body)) > (best[0], -len(best[1])):
            best = (loads, body, span)
    if best is None:
        return Loop(label, registers, spills, 0, 0, collections.Counter(), [])
    loads, body, span = best
    return Loop(label, registers, spills, len(body), loads, collections.Counter(op.split(".")[0] for op in body),
                [f"{a:#06x}  {t}" for a, t in span])


def table(name: str, loops: list[Loop]) -> str:
    rows = [f"### {name}", "",
            "| kernel | registers | spilled bytes | loop instructions | bytes loaded | per 16 bytes | F2F | DFMA "
            "| integer | local (spill) accesses |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for loop in loops:
        integer = sum(n for op, n in loop.ops.items() if op in INTEGER_OPS)
        local = loop.ops["LDL"] + loop.ops["STL"]
        rows.append(f"| {loop.kernel} | {loop.registers} | {loop.spill_bytes} | {loop.instructions} "
                    f"| {loop.loaded_bytes} | {loop.per_16_bytes:.1f} | {loop.ops['F2F']} | {loop.ops['DFMA']} "
                    f"| {integer} | {local} |")
    return "\n".join(rows)


def patched_csrc(patch: Path, into: Path) -> Path:
    """A copy of the repository's csrc/ with `patch` applied (git apply works outside a repository)."""
    shutil.copytree(REPO / "csrc", into / "csrc")
    subprocess.run(["git", "apply", "--include=csrc/*", str(patch.resolve())], cwd=into, check=True)
    return into / "csrc"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("patches", nargs="*", type=Path, help="kernel patches to read beside the kept kernel")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--cuobjdump", help="path of cuobjdump (default: CUDA toolkit, PATH or pip's wheel)")
    parser.add_argument("--all", action="store_true", help="the generic (strided) kernels too")
    parser.add_argument("--show", metavar="KERNEL", help='print the token loop of this kernel, e.g. "bfloat16 16-byte"')
    args = parser.parse_args()
    if shutil.which("nvcc") is None:
        sys.exit("sass_loop.py: nvcc is not on PATH")
    cuobjdump = find_cuobjdump(args.cuobjdump)
    keep = (lambda loop: True) if args.all else (lambda loop: "16-byte" in loop.kernel)
    print(f"Token loops in SASS ({args.arch}, nvcc {nvcc_version()}): one pass, per thread; bytes loaded counts "
          "every global load (token weights too)\n")
    def report(name: str, loops: list[Loop]) -> None:
        print(table(name, [loop for loop in loops if keep(loop)]))
        for loop in loops:
            if loop.kernel == args.show:
                print(f"\n{name}, {loop.kernel}, token loop:\n" + "\n".join(loop.listing))

    report("kept kernel (csrc/)", compile_and_read(REPO / "csrc", cuobjdump, args.arch))
    for patch in args.patches:
        with tempfile.TemporaryDirectory() as tmp:
            loops = compile_and_read(patched_csrc(patch, Path(tmp)), cuobjdump, args.arch)
        print()
        report(patch.name, loops)


def nvcc_version() -> str:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "?"


if __name__ == "__main__":
    main()
