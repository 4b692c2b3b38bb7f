"""A schedule for kernels no tuning record covers: outer spatial loops in parallel, the innermost vectorized.

Without a record, TVM 0.27's CPU pipeline lowers a kernel exactly as LegalizeOps
wrote it: one serial loop nest per block.  On the dense detector that made an
untuned all-float build 75x slower than ONNX Runtime, most of it in layout
transforms, slices and elementwise kernels that any schedule would split across
cores.  MetaSchedule's ParallelizeVectorizeUnroll rule gives the same loops, but
building a design space took tens of seconds per kernel here, so this applies
that one step directly.  Nothing is inlined: an inlined producer lets LLVM fuse a
multiply and an add into one FMA, which rounds the int8 requantization
differently from the separate steps ONNX Runtime computes (measured: a
MobileNetV3 all-int8 build fell from 100 % to 87.5 % agreement).  So producers
are inlined into their consumers except where that would put a multiply
directly under an add or subtract (the one pair LLVM contracts): an elementwise
chain such as dequantize → SiLU → quantize is then one pass over memory instead of
eleven (the dense detector's int8 build spent 48 of its 64 ms in such chains).
Running a loop in parallel changes no arithmetic, and neither does running the
innermost spatial loop as SIMD lanes.
"""

from __future__ import annotations

import logging

import tvm

from ._select_partition import operands, partition_vector_loop

logger = logging.getLogger(__name__)

# Parallel chunks per core: enough that an uneven last chunk costs little.
_CHUNKS_PER_CORE = 4
# Innermost spatial loops up to this extent become one vector loop (LLVM splits it into
# registers); longer ones are split by _VECTOR_LANES first.
_MAX_VECTOR_EXTENT = 64
_VECTOR_LANES = 16
# A gathering innermost loop up to this extent is unrolled instead of vectorized.
_MAX_UNROLL_EXTENT = 16


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


# tvm.tirx.BufferLoad is a constructor function in 0.27; the node type is tvm.ir.expr.TensorLoad.
_LOAD = tvm.ir.expr.TensorLoad


def _strip_casts(expr):
    while isinstance(expr, tvm.tirx.Cast):
        expr = expr.value
    return expr


def _loads_under_add(expr, buffer) -> bool:
    """Whether ``expr`` has an add or subtract with a direct (maybe cast) load of ``buffer`` as an operand."""
    if isinstance(expr, (tvm.tirx.Add, tvm.tirx.Sub)):
        for operand in (expr.a, expr.b):
            operand = _strip_casts(operand)
            if isinstance(operand, _LOAD) and operand.source.same_as(buffer):
                return True
    return any(_loads_under_add(child, buffer) for child in operands(expr))


def _store(sch, block):
    body = sch.get(block).body
    return body if isinstance(body, tvm.tirx.BufferStore) else None


def _inline_producers(sch, root) -> bool:
    """Inline every elementwise producer into its consumers, unless that would contract a multiply-add."""
    changed = False
    for block in list(sch.get_child_blocks(root))[:-1]:  # the last block writes the kernel's output
        store = _store(sch, block)
        if store is None:
            continue
        consumers = sch.get_consumers(block)
        if not consumers:
            continue
        if isinstance(_strip_casts(store.value), tvm.tirx.Mul):
            consumer_stores = [_store(sch, consumer) for consumer in consumers]
            if any(c is None or _loads_under_add(c.value, store.buffer) for c in consumer_stores):
                continue
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001 — TVM raises ScheduleError for a block it cannot inline: keep its nest
            continue
        changed = True
    return changed


def target_cores(target: tvm.target.Target) -> int:
    """The core count the fallback schedule splits loops for: the target's ``num-cores`` (1 when unset)."""
    return int(target.attrs.get("num-cores", 1)) if "num-cores" in target.attrs else 1


def parallel_schedule(func: tvm.tirx.PrimFunc, cores: int, *, inline: bool = True,
                      partition_selects: bool = True) -> tvm.tirx.PrimFunc | None:
    """``func`` with elementwise producers inlined (see the module note), outer spatial loops parallel and the
    innermost one vectorized.

    None when nothing could be changed (the caller keeps the function as it was).
    """
    sch = fallback_schedule(func, cores, inline=inline, partition_selects=partition_selects)
    return sch.mod["main"] if sch is not None else None


def fallback_schedule(func: tvm.tirx.PrimFunc, cores: int, *, inline: bool = True,
                      partition_selects: bool = True) -> tvm.s_tir.Schedule | None:
    """The schedule :func:`parallel_schedule` makes, or None when it changes nothing.

    Tuning needs the Schedule, not just the function: its trace is committed as a tuning record
    next to MetaSchedule's (see ``_tune_tasks``), so a record is applied only when it measured faster.
    """
    sch = tvm.s_tir.Schedule(func)
    root = sch.get_sblock("root")
    changed = _inline_producers(sch, root) if inline else False
    wanted = cores * _CHUNKS_PER_CORE
    for block in sch.get_child_blocks(root):
        changed = _loops_in_write_order(sch, block) or changed
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
        vector_loop = _vectorizable_innermost(sch, block, prefix, chosen)
        if product >= 2 * cores:
            fused = sch.fuse(*chosen) if len(chosen) > 1 else chosen[0]
            sch.parallel(fused)
            changed = True
        if vector_loop is not None and _gathers(sch, block):
            # Lanes of a gather (a take's index read from a buffer) each compute their own int64 div/mod
            # chain, which AVX-512 has no vector form of: the int8 detector's Focus stem ran 4.3 ms vectorized
            # and 0.6 ms unrolled.  A short loop is unrolled instead.
            if _extent(sch, vector_loop) <= _MAX_UNROLL_EXTENT:
                sch.unroll(vector_loop)
                changed = True
            continue
        if vector_loop is not None and partition_selects and _partition_selects(sch, block, vector_loop):
            changed = True
            continue
        if vector_loop is not None:
            extent = _extent(sch, vector_loop)
            if extent > _MAX_VECTOR_EXTENT:
                if extent % _VECTOR_LANES:
                    continue
                _, vector_loop = sch.split(vector_loop, [None, _VECTOR_LANES])
            sch.vectorize(vector_loop)
            changed = True
    return sch if changed else None


def _bound_iterator(sch, block, loop):
    """The block iterator bound to exactly ``loop``'s variable, or None."""
    realize = _realize(sch, block)
    if realize is None:
        return None
    loop_var = sch.get(loop).loop_var
    return next((iter_var.var for iter_var, value in zip(sch.get(block).iter_vars, realize.iter_values)
                 if value.same_as(loop_var)), None)


def _partition_selects(sch, block, loop) -> bool:
    """Vectorize ``loop`` in pieces cut at a concat's boundaries (see ``_select_partition``)."""
    store = _store(sch, block)
    var = _bound_iterator(sch, block, loop)
    return store is not None and var is not None and \
        partition_vector_loop(sch, block, loop, store.value, var, _VECTOR_LANES)


def _gathers(sch, block) -> bool:
    """Whether the block stores a value loaded at an index that is itself loaded from a buffer."""
    store = _store(sch, block)
    if store is None:
        return False
    pending = [(store.value, False)]
    while pending:
        node, inside_index = pending.pop()
        if isinstance(node, _LOAD):
            if inside_index:
                return True
            pending.extend((index, True) for index in node.indices)
            continue
        pending.extend((child, inside_index) for child in operands(node))
    return False


def _realize(sch, block):
    """The SBlockRealize of ``block`` (its iterators' bindings to the loops), found under the kernel's root."""
    wanted = sch.get(block)
    pending = [sch.get(sch.get_sblock("root")).body]
    while pending:
        stmt = pending.pop()
        if isinstance(stmt, tvm.s_tir.stmt.SBlockRealize):
            if stmt.block.same_as(wanted):
                return stmt
        elif isinstance(stmt, tvm.tirx.For):
            pending.append(stmt.body)
        elif isinstance(stmt, tvm.tirx.SeqStmt):
            pending.extend(stmt.seq)
    return None


def _loops_in_write_order(sch, block) -> bool:
    """Put a spatial block's loops in the order of the indices it writes, when those are its loops permuted.

    Why: LegalizeOps writes a layout transform or a transpose as a loop over its *source*, so the innermost
    loop writes with a stride (NCHW → NHWC with 12 channels: every 12th float) and its vector lanes scatter;
    the dense detector's Focus stem ran at 2.7 GB/s that way.  Looping in the destination's order makes the
    writes contiguous (the reads take the stride), the same values in another order.
    """
    store, realize = _store(sch, block), _realize(sch, block)
    loops = sch.get_loops(block)
    if store is None or realize is None or any(int(v.iter_type) != 0 for v in sch.get(block).iter_vars):
        return False
    loop_vars = [sch.get(loop).loop_var for loop in loops]
    # each block iterator bound to exactly one loop (LegalizeOps' T.axis.remap), or to a constant
    loop_of = {}
    for iter_var, value in zip(sch.get(block).iter_vars, realize.iter_values):
        index = next((i for i, var in enumerate(loop_vars) if value.same_as(var)), None)
        if index is not None:
            loop_of[iter_var.var] = index
        elif not isinstance(value, tvm.tirx.IntImm):
            return False
    order = []
    for index in store.indices:
        if isinstance(index, tvm.tirx.IntImm):
            continue
        position = next((loop_of[var] for var in loop_of if index.same_as(var)), None)
        if position is None:
            return False
        order.append(position)
    if sorted(order) != list(range(len(loops))) or order == sorted(order):
        return False
    sch.reorder(*(loops[i] for i in order))
    return True


def _vectorizable_innermost(sch, block, prefix: list, parallel: list):
    """The block's innermost loop when it is spatial, constant, not one of the parallel loops, and its body is
    straight-line (no nested loop, no reduction), else None."""
    loops = sch.get_loops(block)
    if not loops or not prefix or len(prefix) != len(loops):  # a reduction loop is innermost
        return None
    innermost = loops[-1]
    if any(sch.get(innermost).same_as(sch.get(loop)) for loop in parallel):
        return None
    extent = _extent(sch, innermost)
    if extent is None or extent < 4:
        return None
    return innermost
