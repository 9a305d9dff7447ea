"""benchmarks/sass_loop.py, which reads the CUDA kernel's token loop from its SASS to weigh kernel changes
before a GPU runs them: its parsing on a listing in cuobjdump's format, and on the real kernel where the
CUDA tools are installed."""
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import sass_loop  # noqa: E402

KERNEL = "_ZN7hsvfast50_GLOBAL__N__1_pool_fold_cuda_cu_2f16pool_fold_kernelINS_8BFloat16ELb1EEEvNS0_12LayersLaunchE"


def listing(instructions):
    """A kernel's SASS as `cuobjdump -sass` prints it: address, instruction, encoding (two lines each)."""
    lines = [f"\t\tFunction : {KERNEL}", '\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"']
    for address, text in enumerate(instructions):
        lines.append(f"        /*{address * 16:04x}*/                   {text} ;    /* 0x000000000000000000 */")
        lines.append("                                                 /* 0x000fc00000000000 */")
    return "\n".join(lines)


def test_the_token_loop_is_the_branch_back_that_loads_most_and_holds_no_barrier():
    sass = listing([
        "LDC R1, c[0x0][0x28]",                              # 0x000
        "LDG.E R7, desc[UR4][R4.64]",                        # 0x010  loop A: one 4-byte load
        "@P0 BRA 0x10",                                      # 0x020
        "LDG.E.128.CONSTANT R16, desc[UR4][R2.64]",          # 0x030  loop B (the token loop)
        "@!P1 LDG.E.128.CONSTANT R20, desc[UR4][R8.64]",     # 0x040
        "F2F.F64.F32 R10, R16",                              # 0x050
        "DFMA R12, R10, R10, R12",                           # 0x060
        "LDL R30, [R1]",                                     # 0x070  a spilled value
        "IMAD.U32 R11, R17, 0x10000, RZ",                    # 0x080
        "@!P2 BRA 0x30",                                     # 0x090
        "BAR.SYNC.DEFER_BLOCKING 0x0",                       # 0x0a0
        "LDG.E.64 R2, desc[UR4][R6.64]",                     # 0x0b0
        "BRA 0x30",                                          # 0x0c0  loop C: more bytes, but a barrier in it
        "EXIT",                                              # 0x0d0
    ])
    (name, instructions), = sass_loop.parse_sass(sass).items()
    assert name == KERNEL and len(instructions) == 14
    loop = sass_loop.token_loop(sass_loop.kernel_label(name), instructions, registers=56, spills=0)
    assert loop.kernel == "bfloat16 16-byte"
    assert loop.instructions == 7 and loop.loaded_bytes == 32
    assert loop.per_16_bytes == pytest.approx(3.5)
    assert (loop.ops["F2F"], loop.ops["DFMA"], loop.ops["LDL"], loop.ops["IMAD"]) == (1, 1, 1, 1)
    assert loop.listing[0].startswith("0x0030") and loop.listing[-1].endswith("@!P2 BRA 0x30")


def test_asynchronous_copies_count_as_loads_and_labels_name_the_path():
    assert sass_loop.loaded_bytes("LDGSTS.E.BYPASS.128") == 16
    assert sass_loop.loaded_bytes("LDG.E.U16.CONSTANT") == 2
    assert sass_loop.loaded_bytes("LDG.E") == 4
    assert sass_loop.loaded_bytes("LDS.128") == 0  # shared memory: not a load from global memory
    assert sass_loop.kernel_label("x16pool_fold_kernelIfLb0EEEvNS0_12LayersLaunchE") == "float32 generic"
    assert sass_loop.kernel_label("x16pool_fold_kernelIdLb1EEEvNS0_12LayersLaunchE") == "float64 16-byte"
    assert sass_loop.kernel_label("x16pool_fold_kernelINS_4HalfELb1EEEvNS0_12LayersLaunchE") == "float16 16-byte"


def test_ptxas_resources_are_read_per_kernel():
    log = "\n".join([
        "ptxas info    : Compiling entry function 'k1' for 'sm_90'",
        "ptxas info    : Function properties for k1",
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
        "ptxas info    : Used 56 registers, used 1 barriers, 16512 bytes smem",
        "ptxas info    : Function properties for k2",
        "    48 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads",
        "ptxas info    : Used 48 registers, used 1 barriers, 16512 bytes smem",
    ])
    assert sass_loop.parse_ptxas(log) == {"k1": (56, 0), "k2": (48, 32)}


def cuda_tools_present():
    if shutil.which("nvcc") is None:
        return False
    try:
        sass_loop.find_cuobjdump(None)
    except SystemExit:
        return False
    return True


@pytest.mark.skipif(not cuda_tools_present(), reason="needs nvcc and cuobjdump (pip install nvidia-cuda-cuobjdump "
                                                     "nvidia-cuda-nvdisasm)")
def test_the_kept_kernels_token_loops_are_found():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sass_loop.py")], capture_output=True,
                         text=True, check=True).stdout
    for dtype in ("bfloat16", "float16", "float32", "float64"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {dtype} 16-byte |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        loaded = int(cells[4])
        assert loaded >= 4 * 16, row  # kUnroll 16-byte loads per pass, at least
