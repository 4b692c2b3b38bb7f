"""Applying tuning records to a plan's kernels: the ApplyTuning pass and record replay.

A record found by anchor-block equality was tuned on another kernel with the
same conv; it is replayed with MetaSchedule's anchor-trace replay, which fails
for some pairs, so several records are tried before a kernel keeps TVM's
default schedule.
"""

from __future__ import annotations

import logging

import tvm
import tvm.tirx
import tvm_ffi
from tvm.s_tir import meta_schedule as ms

from ._build_report import BuildReport
from ._fallback_schedule import parallel_schedule, target_cores
from ._naming import kernel_layer
from ._trace import tvm_error_line
from ._tune_database import TuningDatabase

logger = logging.getLogger(__name__)


@tvm.transform.module_pass(opt_level=0, name="precsearch.ApplyTuning")
class ApplyTuning:
    """Schedule every kernel the database has a record for; count what it scheduled.

    What TVM's ``MetaScheduleApplyDatabase`` does, one kernel at a time: a
    record found by anchor-block equality is replayed with MetaSchedule's
    anchor-trace replay, which can fail on a kernel whose fused neighbours differ
    from the tuned one (a check in the trace replay fires). TVM's pass then fails
    the whole build; here other records are tried (:func:`best_schedule`), and a
    kernel no record applies to keeps TVM's default schedule and is reported;
    its outer spatial loops are then run in parallel (:func:`parallel_schedule`),
    since the default schedule is one serial loop nest. Tuning files that
    fallback schedule, measured, among each tuned kernel's records, so the
    fastest record is a MetaSchedule schedule only where it beat the fallback.

    Parameters
    ----------
    database : TuningDatabase or None
        None applies no record (every kernel gets the fallback) and only counts kernels.
    target : tvm.target.Target
    layer_ids : sequence of str
        Layer id by index, to name the convs left untuned.
    report : BuildReport, optional
        Gets ``kernels_tuned``, ``not_applied``, ``untuned_convs`` and ``fallback_scheduled``.
    parallel_fallback : bool
        Give kernels without a record the fallback schedule (False: TVM's serial default).
    fallback_inline : bool
        Whether that schedule inlines elementwise producers.
    fallback_partition_selects : bool
        Whether that schedule cuts a concat's vector loop where its inputs meet.
    """

    def __init__(self, database: TuningDatabase | None, target: tvm.target.Target, layer_ids=(),
                 report: BuildReport | None = None, parallel_fallback: bool = True,
                 fallback_inline: bool = True, fallback_partition_selects: bool = True):
        self.database = database
        self.target = target
        self.layer_ids = tuple(layer_ids)
        self.report = report if report is not None else BuildReport()
        self.cores = target_cores(target)  # as tuning measured the fallback (its record must replay to the same)
        self.parallel_fallback = parallel_fallback
        self.fallback_inline = fallback_inline
        self.fallback_partition_selects = fallback_partition_selects

    def transform_module(self, mod, ctx):
        untuned: set[int] = set()
        for gvar, func in list(mod.functions.items()):
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            name = gvar.name_hint
            tuned = self._schedule(name, func) if self.database is not None else None
            self.report.kernels_tuned[name] = tuned is not None
            if tuned is not None:
                mod[gvar] = tuned
                continue
            fallback = parallel_schedule(func, self.cores, inline=self.fallback_inline,
                                         partition_selects=self.fallback_partition_selects) \
                if self.parallel_fallback else None
            if fallback is not None:
                mod[gvar] = fallback
                self.report.fallback_scheduled += 1
            index = kernel_layer(name, func)
            if index is not None and index < len(self.layer_ids):
                untuned.add(index)
        self.report.untuned_convs = tuple(self.layer_ids[i] for i in sorted(untuned))
        return mod

    def _schedule(self, name: str, func):
        from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

        body, failure = best_schedule(self.database, _normalize_mod(func), self.target)
        if body is None:
            if failure:
                self.report.not_applied[name] = failure
                logger.warning("no tuning record applies to %s (%s); it keeps the default schedule", name, failure)
            return None
        # keep the original attributes (global symbol, precsearch.layer), as TVM's pass does
        return tvm.tirx.PrimFunc(body.params, body.body, body.ret_type, func.attrs).with_attr(
            "tirx.is_scheduled", True)


def best_schedule(database: TuningDatabase, kernel: tvm.IRModule, target, top_k: int = 16):
    """The fastest record of ``kernel``'s anchor block that replays on it: (scheduled PrimFunc, "") or (None, why).

    Records of this very kernel (in the exact database) come first and replay
    their trace; then records of its anchor block, tuned on another kernel, are
    replayed with MetaSchedule's anchor-trace replay, which fails for some pairs
    (a reduction fused differently), so up to ``top_k`` of them are tried.
    A kernel's records include its measured fallback schedule (see
    ``_tune_tasks.commit_fallback_record``), which wins where tuning found nothing faster.
    """
    records = []
    for ms_database in (database.exact_database, database.ms_database):
        if ms_database.has_workload(kernel):
            records += ms_database.get_top_k(ms_database.commit_workload(kernel), top_k)
    if not records:
        return None, ""
    failure = ""
    for record in records:
        try:
            schedule = replay(record, kernel, target)
            return schedule.mod["main"], ""
        except Exception as exc:  # noqa: BLE001 — try the next record
            failure = tvm_error_line(exc)
    return None, failure or "no records"


def replay(record, kernel: tvm.IRModule, target):
    """``record``'s schedule on ``kernel``: its own trace, or the anchor-trace replay for another kernel."""
    from tvm.s_tir.meta_schedule.trace_apply import schedule_using_anchor_trace

    if tvm_ffi.structural_equal(kernel, record.workload.mod):
        schedule = tvm.s_tir.Schedule(record.workload.mod)
        record.trace.apply_to_schedule(schedule, remove_postproc=False)
    else:
        schedule = tvm.s_tir.Schedule(kernel)
        schedule_using_anchor_trace(schedule, record.trace, target)
    return schedule


def pin_anchor_record(database: TuningDatabase, kernel: tvm.IRModule, target, top_k: int = 16) -> bool:
    """File, in the exact database, the replayed schedule of the fastest anchor record that works on ``kernel``.

    Whether an anchor record replays can change as faster records of other
    kernels join the anchor workload and push it out of the top k; pinning the
    replayed trace under this very kernel keeps it found.
    """
    ms_database = database.ms_database
    if not ms_database.has_workload(kernel):
        return False
    for record in ms_database.get_top_k(ms_database.commit_workload(kernel), top_k):
        try:
            schedule = replay(record, kernel, target)
        except Exception:  # noqa: BLE001 — try the next record
            continue
        exact = database.exact_database
        exact.commit_tuning_record(ms.database.TuningRecord(
            trace=schedule.trace, workload=exact.commit_workload(kernel), run_secs=record.run_secs, target=target,
            args_info=ms.arg_info.ArgInfo.from_prim_func(kernel["main"])))
        return True
    return False
