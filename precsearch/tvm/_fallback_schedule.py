"""A schedule for kernels no tuning record covers: each loop nest's outer spatial loops run in parallel.

Without a record, TVM 0.27's CPU pipeline lowers a kernel exactly as LegalizeOps
wrote it: one serial loop nest per block.  On the dense detector that made an
untuned all-float build 75x slower than ONNX Runtime, most of it in layout
transforms, slices and elementwise kernels that any schedule would split across
cores.  MetaSchedule's ParallelizeVectorizeUnroll rule gives the same loops, but
building a design space took tens of seconds per kernel here, so this applies
that one step directly.  Nothing is inlined: an inlined producer lets LLVM fuse a
multiply and an add into one FMA, which rounds the int8 requantization
differently from the separate steps ONNX Runtime computes (measured: a
MobileNetV3 all-int8 build fell from 100 % to 87.5 % agreement); running a loop
in parallel changes no arithmetic.
"""

from __future__ import annotations

import logging

import tvm

logger = logging.getLogger(__name__)

# Parallel chunks per core: enough that an uneven last chunk costs little.
_CHUNKS_PER_CORE = 4


def _extent(sch, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tvm.tirx.IntImm) else None


def _spatial_prefix(sch, block) -> list:
    """The leading loops of ``block`` that bind only its spatial iterators (safe to run in parallel).

    Kernels straight from LegalizeOps have one loop per block iterator, spatial
    ones first; anything else (already split or reordered) gets no parallel loop.
    """
    loops = sch.get_loops(block)
    kinds = [int(iter_var.iter_type) for iter_var in sch.get(block).iter_vars]  # 0: spatial
    spatial = kinds.count(0)
    if len(loops) != len(kinds) or kinds != sorted(kinds) or any(kind not in (0, 2) for kind in kinds):
        return []
    return list(loops[:spatial])


def parallel_schedule(func: tvm.tirx.PrimFunc, cores: int) -> tvm.tirx.PrimFunc | None:
    """``func`` with each loop nest's outer spatial loops parallel.

    None when nothing could be parallelized (the caller keeps the function as it was).
    """
    sch = tvm.s_tir.Schedule(func)
    root = sch.get_sblock("root")
    changed = False
    wanted = cores * _CHUNKS_PER_CORE
    for block in sch.get_child_blocks(root):
        prefix = _spatial_prefix(sch, block)
        chosen, product = [], 1
        for loop in prefix:
            extent = _extent(sch, loop)
            if extent is None:
                break
            chosen.append(loop)
            product *= extent
            if product >= wanted:
                break
        if product < 2 * cores:
            continue
        fused = sch.fuse(*chosen) if len(chosen) > 1 else chosen[0]
        sch.parallel(fused)
        changed = True
    return sch.mod["main"] if changed else None
