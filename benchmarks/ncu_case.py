"""Three pool_fold launches on one DRAM-sized batch (32×512×4096), each beside a copy of the tensor, for ncu:

    cd benchmarks && ncu --clock-control none -k regex:pool_fold_kernel --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy python3 ncu_case.py bfloat16

(run 7's profile of the H200's bf16 kernel, benchmarks/RESULTS.md).
"""
import argparse

import torch

from hsvfast import _kernels
from kernels import make

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("dtype", choices=("bfloat16", "float16", "float32"))
dtype = getattr(torch, parser.parse_args().dtype)
act, weights, labels, out_rows, state = make(32, 512, 4096, dtype, "cuda")
target = torch.empty_like(act)
for _ in range(3):
    _kernels.pool_fold(act, weights, state["out"], labels=labels, out_rows=out_rows, shift=state["shift"],
                       sums=state["sums"], sqnorms=state["sqnorms"], nonfinite=state["nonfinite"])
    target.copy_(act)
torch.cuda.synchronize()
