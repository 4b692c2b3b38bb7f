"""The pass that turns wide max-pools into cheap ones with the same values.

A YOLO-style SPP block pools one tensor three times, 5×5, 9×9 and 13×13 at stride 1
("same" padding).  TVM legalizes each to a loop over its k² window: on the dense
detector the three pools took 2.1 ms per inference (the 13×13 alone 1.3 ms), more
than most of its convs.  Two identities make them cheap, both exact for a maximum
(no rounding, padding is −inf in every form):

* **separable**: a kh×kw window is a 1×kw pool then a kh×1 pool (kh + kw
  comparisons per output instead of kh·kw);
* **cascade** (YOLOv5's SPPF): for stride-1 same-padded pools,
  ``pool_a(pool_b(x)) == pool_(a+b-1)(x)``, so when the graph already pooled ``x``
  with a smaller window, the wider pool starts from that result.

TVM's own passes do neither (its pooling is one compute over the whole window);
this is the rewrite a hand-written SPPF makes in the model itself.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ._importer import emit_like

PASS_NAME = "precsearch.SeparableMaxPool"


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _same_stride1(attrs) -> int | None:
    """The window of a square, stride-1, undilated, same-padded pool (odd k, k // 2 on every side), else None."""
    kh, kw = _ints(attrs.pool_size)
    if kh != kw or kh % 2 == 0 or _ints(attrs.strides) != (1, 1) or _ints(attrs.dilation) != (1, 1):
        return None
    if _ints(attrs.padding) != (kh // 2,) * 4 or attrs.ceil_mode:
        return None
    return kh


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        # per pooled input: (window, var) of the same-padded stride-1 pools emitted so far
        self.same_pools: dict = {}

    def visit_var_binding_(self, binding):
        value = binding.value
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
                and value.op.name == "relax.nn.max_pool2d"):
            return super().visit_var_binding_(binding)
        attrs = value.attrs
        kh, kw = _ints(attrs.pool_size)
        if attrs.ceil_mode or _ints(attrs.dilation) != (1, 1) or kh * kw <= kh + kw:
            return super().visit_var_binding_(binding)
        source = data = self.visit_expr(value.args[0])
        strides, (top, left, bottom, right) = _ints(attrs.strides), _ints(attrs.padding)
        window = _same_stride1(attrs)
        if window is not None:
            earlier = [(k, var) for k, var in self.same_pools.get(source, []) if k < window]
            if earlier:  # cascade from the widest smaller pool of the same tensor
                k, var = max(earlier, key=lambda entry: entry[0])
                data, kh = var, window - k + 1
                kw, (top, left, bottom, right) = kh, (kh // 2,) * 4
        layout, out_layout = str(attrs.layout), str(attrs.out_layout)
        rows = self.builder_.emit(relax.op.nn.max_pool2d(
            data, (1, kw), (1, strides[1]), (0, left, 0, right), layout=layout, out_layout=layout))
        pooled = relax.op.nn.max_pool2d(rows, (kh, 1), (strides[0], 1), (top, 0, bottom, 0), layout=layout,
                                        out_layout=out_layout)
        new_var = emit_like(self.builder_, binding.var, pooled)
        if window is not None:
            self.same_pools.setdefault(source, []).append((window, new_var))
        self.set_var_remap(binding.var, new_var)


@tvm.transform.module_pass(opt_level=0, name=PASS_NAME)
class SeparableMaxPool:
    """Rewrite every 2-D max-pool of ``main`` whose window has more than kh + kw cells as a 1×kw then a kh×1
    pool, starting a stride-1 same-padded pool from a smaller one of the same tensor where the graph has one."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        gv = mod.get_global_var("main")
        rewriter.builder_.update_func(gv, rewriter.visit_expr(mod["main"]))
        return rewriter.builder_.get()
