// oneDNN convolutions called from a Relax graph (R.call_dps_packed), see _onednn.py:
// float32, and int8 (u8 activations × s8 per-channel weights) with the requantization
// inside the primitive (its scales and zero points), as MLAS's QLinearConv does it.
//
// Written by hand because the TVM wheel has no DNNL codegen (its BYOC path needs a
// TVM source build); a packed function compiled against the PyPI oneDNN build is
// the route that works with the wheel.  One primitive is created per distinct
// config and cached; weights arrive already in the primitive's own blocked format,
// packed once at build time by pack_weights, so a call does no reorder.

#include <dnnl.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <omp.h>

namespace {

// The int64 config tensor, field by field (kept in sync with _onednn.py CONFIG_FIELDS).
enum Field {
  kN, kIC, kIH, kIW, kOC, kKH, kKW, kOH, kOW, kSH, kSW, kPT, kPL, kPB, kPR, kDH, kDW, kGroups,
  kSrcBlock, kDstBlock, kPostOp, kThreads, kLayer, kDtype, kSrcZero, kDstZero, kVariant, kMidZero, kBf16Src,
  kBf16Dst, kResidual, kNumFields
};
// kDtype: what the conv reads and writes.
// kBf16: float32 in and out, the conv itself on bf16 activations and weights (f32 accumulation); with kBf16Src
// it reads bf16 (another bf16 conv's output) and with kBf16Dst it writes bf16 (read only by bf16 convs).
// kResidual (float32 / bf16 convs): a float32 tensor of the output's shape and layout is added after the
// post-op (a residual connection, y = act(conv + bias) + r), as a binary post-op: conv2d_add.
enum Dtype { kFloat = 0, kInt8 = 1, kInt8FloatOut = 2, kBf16 = 3 };
// The float32 post tensor: [alpha, beta] and, for int8, [src_scale, dst_scale, weight_scale[oc]...], then, for an
// int8 conv with an activation after its own output quantization (kMidZero >= 0), that quantization's scale.
enum PostField { kAlpha = 0, kBeta = 1, kSrcScale = 2, kDstScale = 3, kWeightScales = 4 };
// Post-op codes; alpha/beta come from the float32 post tensor.
enum PostOp { kNone = 0, kRelu = 1, kClip = 2, kSwish = 3, kHardSwish = 4, kSigmoid = 5 };

using dnnl::memory;
using tag = memory::format_tag;

struct Conv {
  dnnl::convolution_forward primitive;
  memory::desc weights_desc;
  std::string impl;
  memory src, weights, bias, dst;
  // set when the primitive writes a staging buffer in its own layout that a reorder turns into dst
  bool staged = false;
  memory staging;
  dnnl::reorder to_plain;
  // set when the primitive reads its own layout (int8: nhwc), filled from src by a reorder
  bool src_staged = false;
  memory src_staging;
  dnnl::reorder from_plain;
  // where from_plain writes: src_staging itself, or (an int8 conv with its padding made explicit) the interior of it
  memory src_target;
  // int8: the quantization arguments, fixed per layer
  std::unordered_map<int, memory> quantization;
  // the residual added by a binary post-op (kResidual), its handle set per call
  bool has_residual = false;
  memory residual;
  // every argument of the primitive (memory objects are shared handles: set_data_handle on src/dst reaches them)
  std::unordered_map<int, memory> args;
};

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& cpu_stream() {
  static dnnl::stream stream(cpu_engine());
  return stream;
}

// The first element (VM constants can sit at an offset inside a pooled buffer).
void* address(const tvm::ffi::Tensor& t) {
  const DLTensor* d = t.GetDLTensorPtr();
  return static_cast<char*>(d->data) + d->byte_offset;
}

// A channel block of 16 or 8 is the pipeline's NCHW<b>c, 0 its NCHW and -1 its NHWC.
tag activation_tag(int64_t block) {
  if (block == -1) return tag::nhwc;
  if (block == 16) return tag::nChw16c;
  if (block == 8) return tag::nChw8c;
  TVM_FFI_ICHECK(block == 0) << "oneDNN conv: unsupported channel block " << block;
  return tag::nchw;
}

std::vector<int64_t> read_config(const tvm::ffi::Tensor& config) {
  TVM_FFI_ICHECK(config.ndim() == 1 && config.shape()[0] == kNumFields && config.dtype().code == kDLInt &&
                 config.dtype().bits == 64)
      << "oneDNN conv: config must hold " << kNumFields << " int64 fields, got ndim " << config.ndim()
      << " dtype code " << int(config.dtype().code) << " bits " << int(config.dtype().bits);
  const int64_t* fields = static_cast<const int64_t*>(address(config));
  return std::vector<int64_t>(fields, fields + kNumFields);
}

std::vector<float> read_post(const tvm::ffi::Tensor& post) {
  const float* values = static_cast<const float*>(address(post));
  return std::vector<float>(values, values + post.shape()[0]);
}

Conv& get_conv(const std::vector<int64_t>& c, const std::vector<float>& post) {
  static std::mutex lock;
  static std::unordered_map<std::string, std::unique_ptr<Conv>> cache;
  std::string key(reinterpret_cast<const char*>(c.data()), c.size() * sizeof(int64_t));
  key.append(reinterpret_cast<const char*>(post.data()), post.size() * sizeof(float));
  std::lock_guard<std::mutex> guard(lock);
  auto found = cache.find(key);
  if (found != cache.end()) return *found->second;

  static int64_t threads_set = 0;
  if (c[kThreads] > 0 && c[kThreads] != threads_set) {
    omp_set_num_threads(static_cast<int>(c[kThreads]));
    threads_set = c[kThreads];
  }
  const auto f32 = memory::data_type::f32;
  const bool int8 = c[kDtype] == kInt8 || c[kDtype] == kInt8FloatOut;
  const bool bf16 = c[kDtype] == kBf16;
  TVM_FFI_ICHECK(c[kDtype] >= kFloat && c[kDtype] <= kBf16) << "oneDNN conv: unknown dtype " << c[kDtype];
  const auto src_dt = int8 ? memory::data_type::u8 : bf16 ? memory::data_type::bf16 : f32;
  const auto bf16_dt = memory::data_type::bf16;
  const auto dst_dt = c[kDtype] == kInt8 ? memory::data_type::u8 : bf16 && c[kBf16Dst] ? bf16_dt : f32;
  const auto weights_dt = int8 ? memory::data_type::s8 : bf16 ? memory::data_type::bf16 : f32;
  const int64_t groups = c[kGroups];
  // kVariant 1 on an int8 conv: no zero points in the primitive (see fold_zero below)
  const bool fold_zero = int8 && c[kVariant] == 1;
  const bool pad_src = fold_zero && c[kSrcZero] != 0 && (c[kPT] || c[kPL] || c[kPB] || c[kPR]);
  memory::dims src_dims{c[kN], c[kIC], c[kIH], c[kIW]};
  memory::dims dst_dims{c[kN], c[kOC], c[kOH], c[kOW]};
  memory::dims weight_dims = groups > 1
      ? memory::dims{groups, c[kOC] / groups, c[kIC] / groups, c[kKH], c[kKW]}
      : memory::dims{c[kOC], c[kIC], c[kKH], c[kKW]};
  // What the graph hands over (float32 for a bf16 conv, unless a bf16 conv wrote it) and what the primitive reads.
  memory::desc src_desc(src_dims, bf16 && !c[kBf16Src] ? f32 : src_dt, activation_tag(c[kSrcBlock]));
  memory::desc conv_src_desc(src_dims, src_dt, activation_tag(c[kSrcBlock]));
  memory::desc dst_desc(dst_dims, dst_dt, activation_tag(c[kDstBlock]));
  memory::desc any_weights(weight_dims, weights_dt, tag::any);
  memory::desc bias_desc({c[kOC]}, f32, tag::x);

  dnnl::post_ops ops;
  const float alpha = post.size() > kAlpha ? post[kAlpha] : 0.f, beta = post.size() > kBeta ? post[kBeta] : 0.f;
  // An int8 conv whose output the model quantizes, dequantizes and then activates (conv → Q → DQ → SiLU → Q):
  // the first Q/DQ pair as post-ops before the activation, so the chain is one primitive and the activation sees
  // exactly the dequantized u8 values: x/s, round half to even, clamp to the u8 range around the zero point, ×s.
  const bool mid = int8 && c[kMidZero] >= 0;
  if (mid) {
    const float mid_scale = post.back();
    const float mid_zero = static_cast<float>(c[kMidZero]);
    ops.append_eltwise(dnnl::algorithm::eltwise_linear, 1.f / mid_scale, 0.f);
    ops.append_eltwise(dnnl::algorithm::eltwise_round, 0.f, 0.f);
    ops.append_eltwise(dnnl::algorithm::eltwise_clip, -mid_zero, 255.f - mid_zero);
    ops.append_eltwise(dnnl::algorithm::eltwise_linear, mid_scale, 0.f);
  }
  switch (c[kPostOp]) {
    case kNone: break;
    case kRelu: ops.append_eltwise(dnnl::algorithm::eltwise_relu, alpha, 0.f); break;
    case kClip: ops.append_eltwise(dnnl::algorithm::eltwise_clip, alpha, beta); break;
    case kSwish: ops.append_eltwise(dnnl::algorithm::eltwise_swish, 1.f, 0.f); break;
    case kHardSwish: ops.append_eltwise(dnnl::algorithm::eltwise_hardswish, 1.f / 6.f, 0.5f); break;
    case kSigmoid: ops.append_eltwise(dnnl::algorithm::eltwise_logistic, 0.f, 0.f); break;
    default: TVM_FFI_THROW(ValueError) << "oneDNN conv: unknown post-op " << c[kPostOp];
  }
  // fold_zero: the output zero point as post-ops, in MLAS's order (round half to even, then + zero point; the
  // conversion to u8 saturates), instead of oneDNN's dst scale and zero point.
  const bool dst_zero_as_ops = fold_zero && c[kDtype] == kInt8 && c[kDstZero] != 0;
  if (dst_zero_as_ops) {
    ops.append_eltwise(dnnl::algorithm::eltwise_linear, 1.f / post[kDstScale], 0.f);
    ops.append_eltwise(dnnl::algorithm::eltwise_round, 0.f, 0.f);
    ops.append_eltwise(dnnl::algorithm::eltwise_linear, 1.f, static_cast<float>(c[kDstZero]));
  }
  // The residual add comes after the activation, as in the graph: one read of r instead of a pass of its own.
  // r: float32, in the graph's layout of the output
  const memory::desc residual_desc(dst_dims, f32, activation_tag(c[kDstBlock]));
  if (c[kResidual]) {
    TVM_FFI_ICHECK(!int8) << "oneDNN conv: a residual add is fused into float32 and bf16 convs only";
    ops.append_binary(dnnl::algorithm::binary_add, residual_desc);
  }
  dnnl::primitive_attr attr;
  attr.set_post_ops(ops);
  auto conv = std::make_unique<Conv>();
  if (int8) {
    // dst = saturate(round_half_even((src_scale·w_scale[c]·conv(src - src_zero, w) + bias) / dst_scale) + dst_zero)
    TVM_FFI_ICHECK(post.size() == static_cast<size_t>(kWeightScales + c[kOC] + (mid ? 1 : 0)))
        << "oneDNN int8 conv: post tensor must hold 4 + " << c[kOC] << (mid ? " + 1" : "") << " values, got "
        << post.size();
    auto scalar = [&](float value, memory::data_type dt) {
      memory m({{1}, dt, tag::x}, cpu_engine());
      if (dt == f32) *static_cast<float*>(m.get_data_handle()) = value;
      else *static_cast<int32_t*>(m.get_data_handle()) = static_cast<int32_t>(value);
      return m;
    };
    attr.set_scales_mask(DNNL_ARG_SRC, 0);
    attr.set_scales_mask(DNNL_ARG_WEIGHTS, groups > 1 ? 3 : 1);  // per output channel
    conv->quantization[DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC] = scalar(post[kSrcScale], f32);
    memory weight_scales({{c[kOC]}, f32, tag::x}, cpu_engine());
    std::memcpy(weight_scales.get_data_handle(), post.data() + kWeightScales, c[kOC] * sizeof(float));
    conv->quantization[DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS] = weight_scales;
    // A zero point costs oneDNN a slower kernel: set only when there is one.  With one, oneDNN 3.2 runs its
    // older jit kernels (AMX: 323 GMAC/s on a 96->96 3x3 at 52x52, against 1097 for brgconv in bf16), so
    // fold_zero leaves them out: the input's zero point becomes explicit padding (a staging buffer whose border
    // holds it) plus a bias term -src_zero*sum(w) folded in at build time (_onednn.folded_bias), the output's
    // zero point the post-ops above.
    if (c[kSrcZero] != 0 && !fold_zero) {
      attr.set_zero_points_mask(DNNL_ARG_SRC, 0);
      conv->quantization[DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC] = scalar(c[kSrcZero], memory::data_type::s32);
    }
    if (c[kDtype] == kInt8 && !dst_zero_as_ops) {
      attr.set_scales_mask(DNNL_ARG_DST, 0);
      conv->quantization[DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST] = scalar(post[kDstScale], f32);
      if (c[kDstZero] != 0 && !fold_zero) {
        attr.set_zero_points_mask(DNNL_ARG_DST, 0);
        conv->quantization[DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_DST] = scalar(c[kDstZero], memory::data_type::s32);
      }
    }
  }
  // pad_src: the primitive reads the input already padded (with the zero point), so it pads nothing itself
  const memory::dims pad_left = pad_src ? memory::dims{0, 0} : memory::dims{c[kPT], c[kPL]};
  const memory::dims pad_right = pad_src ? memory::dims{0, 0} : memory::dims{c[kPB], c[kPR]};
  auto make = [&](const memory::desc& in_desc, const memory::desc& out_desc) {
    return dnnl::convolution_forward::primitive_desc(
        cpu_engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, in_desc,
        any_weights, bias_desc, out_desc, {c[kSH], c[kSW]}, {c[kDH] - 1, c[kDW] - 1}, pad_left, pad_right, attr);
  };
  auto slow = [](const std::string& impl) {
    return impl.find("gemm") != std::string::npos || impl.rfind("ref", 0) == 0;
  };
  const memory::desc padded_src_desc(
      {c[kN], c[kIC], c[kIH] + c[kPT] + c[kPB], c[kIW] + c[kPL] + c[kPR]}, src_dt, tag::nhwc);
  auto pd = make(pad_src ? padded_src_desc : conv_src_desc, dst_desc);
  // oneDNN's int8 (VNNI / AMX) kernels read and write nhwc only: on the pipeline's
  // blocked or plain layout it has just its reference loops.  Reordering in and out
  // costs two passes over u8 activations, far less than the conv it unlocks.  Its
  // AMX bf16 kernels too are nhwc only; its blocked bf16 ones (AVX512-BF16) ran
  // slower than float32 (96→96 3x3 at 52x52, 2 threads: 106 GMAC/s against 164,
  // AMX nhwc with both reorders 617), so an AMX kernel is worth the reorders.
  auto has_amx = [](const std::string& impl) { return impl.find("amx") != std::string::npos; };
  // (Where the graph's layout is nhwc already, there is nothing to reorder to.)
  const bool graph_nhwc = c[kSrcBlock] == -1 && c[kDstBlock] == -1;
  if (pad_src) {
    // The border is written once, here; each call's reorder fills the interior only.
    memory::desc dst_nhwc(dst_dims, dst_dt, tag::nhwc);
    if (c[kDstBlock] != -1) pd = make(padded_src_desc, dst_nhwc);
    conv->src_staging = memory(padded_src_desc, cpu_engine());
    std::memset(conv->src_staging.get_data_handle(), static_cast<int>(c[kSrcZero]), padded_src_desc.get_size());
    const memory::desc interior = padded_src_desc.submemory_desc(src_dims, {0, 0, c[kPT], c[kPL]});
    conv->src_target = memory(interior, cpu_engine(), conv->src_staging.get_data_handle());
    conv->from_plain = dnnl::reorder(memory(src_desc, cpu_engine(), DNNL_MEMORY_NONE), conv->src_target);
    conv->src_staged = true;
    if (c[kDstBlock] != -1) {
      conv->staging = memory(dst_nhwc, cpu_engine());
      conv->to_plain = dnnl::reorder(conv->staging, memory(dst_desc, cpu_engine(), DNNL_MEMORY_NONE));
      conv->staged = true;
    }
  } else if (!graph_nhwc && ((int8 && slow(pd.impl_info_str())) || (bf16 && !has_amx(pd.impl_info_str())))) {
    memory::desc src_nhwc(src_dims, src_dt, tag::nhwc), dst_nhwc(dst_dims, dst_dt, tag::nhwc);
    auto nhwc_pd = make(src_nhwc, dst_nhwc);
    const std::string nhwc_impl = nhwc_pd.impl_info_str();
    bool use_nhwc = int8 ? !slow(nhwc_impl) : (has_amx(nhwc_impl) || slow(pd.impl_info_str()));
    // A bf16 conv's variant, when the build chose one by timing (choose_variant): 0 the graph's
    // layout, 1 nhwc; -1 the rule above.
    if (bf16 && c[kVariant] >= 0 && !slow(pd.impl_info_str())) use_nhwc = c[kVariant] == 1 && !slow(nhwc_impl);
    if (use_nhwc) {
      pd = nhwc_pd;
      conv->src_staging = memory(src_nhwc, cpu_engine());
      conv->from_plain = dnnl::reorder(memory(src_desc, cpu_engine(), DNNL_MEMORY_NONE), conv->src_staging);
      conv->src_target = conv->src_staging;
      conv->src_staged = true;
      conv->staging = memory(dst_nhwc, cpu_engine());
      conv->to_plain = dnnl::reorder(conv->staging, memory(dst_desc, cpu_engine(), DNNL_MEMORY_NONE));
      conv->staged = true;
    }
  }
  // A plain-layout float output sends oneDNN to im2col + GEMM (10x slower on a 3-channel
  // first conv); writing a blocked output and reordering it is far faster.
  if (!int8 && c[kDstBlock] == 0 && std::string(pd.impl_info_str()).find("gemm") != std::string::npos) {
    for (int64_t block : {16, 8}) {
      memory::desc blocked_desc(dst_dims, dst_dt, activation_tag(block));
      auto blocked_pd = make(conv_src_desc, blocked_desc);
      std::string impl = blocked_pd.impl_info_str();
      if (!slow(impl)) {
        pd = blocked_pd;
        conv->staging = memory(blocked_desc, cpu_engine());
        conv->to_plain = dnnl::reorder(conv->staging, memory(dst_desc, cpu_engine(), DNNL_MEMORY_NONE));
        conv->staged = true;
        break;
      }
    }
  }
  if (bf16 && !conv->src_staged && src_desc != conv_src_desc) {  // float32 activations rounded to bf16 in place
    conv->src_staging = memory(conv_src_desc, cpu_engine());
    conv->from_plain = dnnl::reorder(memory(src_desc, cpu_engine(), DNNL_MEMORY_NONE), conv->src_staging);
    conv->src_target = conv->src_staging;
    conv->src_staged = true;
  }
  conv->primitive = dnnl::convolution_forward(pd);
  conv->weights_desc = pd.weights_desc();
  conv->impl = std::string(conv->src_staged ? "reorder+" : "") + pd.impl_info_str() + (conv->staged ? "+reorder" : "");
  conv->src = memory(src_desc, cpu_engine(), DNNL_MEMORY_NONE);
  conv->weights = memory(conv->weights_desc, cpu_engine(), DNNL_MEMORY_NONE);
  conv->bias = memory(bias_desc, cpu_engine(), DNNL_MEMORY_NONE);
  conv->dst = memory(dst_desc, cpu_engine(), DNNL_MEMORY_NONE);
  conv->args = conv->quantization;
  conv->args[DNNL_ARG_SRC] = conv->src_staged ? conv->src_staging : conv->src;
  conv->args[DNNL_ARG_WEIGHTS] = conv->weights;
  conv->args[DNNL_ARG_BIAS] = conv->bias;
  conv->args[DNNL_ARG_DST] = conv->staged ? conv->staging : conv->dst;
  if (c[kResidual]) {
    // the binary post-op reads r in the graph's layout: the primitive must write that layout too
    TVM_FFI_ICHECK(!conv->staged) << "oneDNN conv: a residual add needs the conv to write the graph's layout";
    conv->has_residual = true;
    conv->residual = memory(residual_desc, cpu_engine(), DNNL_MEMORY_NONE);
    conv->args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(ops.len() - 1) | DNNL_ARG_SRC_1] = conv->residual;
  }
  Conv& result = *conv;
  cache.emplace(std::move(key), std::move(conv));
  return result;
}

// One conv object serves every call with its config, so its handles are set per call, under this lock.
std::mutex& run_lock() {
  static std::mutex lock;
  return lock;
}

// One call: the input reordered into the primitive's layout (and rounded for bf16), the conv, the output back.
void run(Conv& conv, void* src, void* weights, void* bias, void* dst, void* residual = nullptr) {
  if (conv.has_residual) conv.residual.set_data_handle(residual);
  conv.src.set_data_handle(src);
  conv.weights.set_data_handle(weights);
  conv.bias.set_data_handle(bias);
  conv.dst.set_data_handle(dst);
  if (conv.src_staged) conv.from_plain.execute(cpu_stream(), conv.src, conv.src_target);
  conv.primitive.execute(cpu_stream(), conv.args);
  if (conv.staged) conv.to_plain.execute(cpu_stream(), conv.staging, conv.dst);
  cpu_stream().wait();
}

}  // namespace

// Bytes of the weights in the primitive's own format (the size pack_weights fills).
int64_t weights_bytes(tvm::ffi::Tensor config, tvm::ffi::Tensor post) {
  return static_cast<int64_t>(get_conv(read_config(config), read_post(post)).weights_desc.get_size());
}

// Reorders between the plain (g)oihw weights (float32, or int8 for an int8 conv) and the
// primitive's blocked format (for int8 this includes oneDNN's zero-point compensation).
void reorder_weights(tvm::ffi::Tensor config, tvm::ffi::Tensor post, tvm::ffi::Tensor oihw, tvm::ffi::Tensor packed,
                     bool to_blocked) {
  std::vector<int64_t> c = read_config(config);
  Conv& conv = get_conv(c, read_post(post));
  TVM_FFI_ICHECK(static_cast<size_t>(packed.shape()[0]) == conv.weights_desc.get_size())
      << "oneDNN conv: packed weight buffer has the wrong size";
  const int64_t groups = c[kGroups];
  memory::dims plain_dims = groups > 1
      ? memory::dims{groups, c[kOC] / groups, c[kIC] / groups, c[kKH], c[kKW]}
      : memory::dims{c[kOC], c[kIC], c[kKH], c[kKW]};
  // bf16 weights are given as float32 and rounded to bf16 by the reorder (round to nearest even)
  const auto plain_dt = c[kDtype] == kFloat || c[kDtype] == kBf16 ? memory::data_type::f32 : memory::data_type::s8;
  memory plain({plain_dims, plain_dt, groups > 1 ? tag::goihw : tag::oihw}, cpu_engine(),
               address(oihw));
  memory blocked(conv.weights_desc, cpu_engine(), address(packed));
  memory& from = to_blocked ? plain : blocked;
  memory& to = to_blocked ? blocked : plain;
  dnnl::reorder(from, to).execute(cpu_stream(), from, to);
  cpu_stream().wait();
}

// OIHW weights → the primitive's blocked format, once at build time.
void pack_weights(tvm::ffi::Tensor config, tvm::ffi::Tensor post, tvm::ffi::Tensor oihw,
                  tvm::ffi::Tensor packed) {
  reorder_weights(config, post, oihw, packed, true);
}

// The inverse of pack_weights, so the build can check a layer's packed weights are its own.
void unpack_weights(tvm::ffi::Tensor config, tvm::ffi::Tensor post, tvm::ffi::Tensor packed,
                    tvm::ffi::Tensor oihw) {
  reorder_weights(config, post, oihw, packed, false);
}

// Which oneDNN implementation the primitive of this config runs ("ref:any" is the slow reference one).
tvm::ffi::String implementation(tvm::ffi::Tensor config, tvm::ffi::Tensor post) {
  Conv& conv = get_conv(read_config(config), read_post(post));
  return tvm::ffi::String(conv.impl);
}

// The conv itself: dst = post_op(conv(src, weights) + bias), requantized for int8.
void conv2d(tvm::ffi::Tensor src, tvm::ffi::Tensor weights, tvm::ffi::Tensor bias,
            tvm::ffi::Tensor config, tvm::ffi::Tensor post, tvm::ffi::Tensor dst) {
  Conv& conv = get_conv(read_config(config), read_post(post));
  TVM_FFI_ICHECK(!conv.has_residual) << "oneDNN conv: a config with a residual add is called through conv2d_add";
  std::lock_guard<std::mutex> guard(run_lock());
  run(conv, address(src), address(weights), address(bias), address(dst));
}

// The conv with a residual added after its post-op: dst = post_op(conv(src, weights) + bias) + residual.
void conv2d_add(tvm::ffi::Tensor src, tvm::ffi::Tensor weights, tvm::ffi::Tensor bias, tvm::ffi::Tensor config,
                tvm::ffi::Tensor post, tvm::ffi::Tensor residual, tvm::ffi::Tensor dst) {
  Conv& conv = get_conv(read_config(config), read_post(post));
  TVM_FFI_ICHECK(conv.has_residual) << "oneDNN conv: conv2d_add needs a config with a residual add";
  std::lock_guard<std::mutex> guard(run_lock());
  run(conv, address(src), address(weights), address(bias), address(dst), address(residual));
}

// Median time of one call of a cached conv (its reorders included), on zeroed scratch buffers.
double time_conv(Conv& conv) {
  auto zeroed = [](const memory::desc& desc) {
    memory m(desc, cpu_engine());
    std::memset(m.get_data_handle(), 0, desc.get_size());
    return m;
  };
  memory src = zeroed(conv.src.get_desc()), weights = zeroed(conv.weights_desc), bias = zeroed(conv.bias.get_desc()),
         dst = zeroed(conv.dst.get_desc());
  memory residual = conv.has_residual ? zeroed(conv.residual.get_desc()) : memory();
  std::vector<double> times;
  for (int call = 0; call < 9; ++call) {
    auto started = std::chrono::steady_clock::now();
    run(conv, src.get_data_handle(), weights.get_data_handle(), bias.get_data_handle(), dst.get_data_handle(),
        conv.has_residual ? residual.get_data_handle() : nullptr);
    if (call >= 2) times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// For a bf16 conv, which variant runs faster here, timed once at build time: 0 (the graph's
// layout: oneDNN's AVX512-BF16 kernels) or 1 (nhwc: its AMX kernels, two reorders); the build
// writes it into the config, so the library runs what was measured.  AMX is not always the
// faster: on a 3-channel first conv at 416x416 it ran 3.5 ms against 1.8 ms in float32, and on
// small convs the reorders dominate.
// For an int8 conv with a zero point: 0 (oneDNN's zero points) or 1 (fold_zero: explicit padding, the
// compensation in the bias, the output zero point as post-ops), chosen by kernel, not by timing, so a plan
// builds the same way every time (the packed weights differ between the two): 1 when oneDNN runs another
// kernel without the zero points (3.2: brgconv, where with them it falls back to its older jit kernels; measured
// on AMX 1.0-1.6x faster).  -1 for other convs.
int64_t choose_variant(tvm::ffi::Tensor config, tvm::ffi::Tensor post) {
  std::vector<int64_t> c = read_config(config);
  const std::vector<float> p = read_post(post);
  const bool int8_with_zero = (c[kDtype] == kInt8 || c[kDtype] == kInt8FloatOut) &&
                              (c[kSrcZero] != 0 || (c[kDtype] == kInt8 && c[kDstZero] != 0));
  if (c[kDtype] != kBf16 && !int8_with_zero) return -1;
  c[kVariant] = 0;
  Conv& graph_layout = get_conv(c, p);
  c[kVariant] = 1;
  Conv& nhwc = get_conv(c, p);
  if (nhwc.impl == graph_layout.impl) return 0;  // no nhwc kernel worth having: the same primitive
  if (int8_with_zero) {  // (here "graph_layout" is the zero-point variant, "nhwc" the folded one)
    auto kernel = [](std::string impl) {  // without the staging reorders around it
      if (impl.rfind("reorder+", 0) == 0) impl = impl.substr(8);
      if (impl.size() >= 8 && impl.compare(impl.size() - 8, 8, "+reorder") == 0) impl.resize(impl.size() - 8);
      return impl;
    };
    return kernel(nhwc.impl) != kernel(graph_layout.impl) ? 1 : 0;
  }
  std::lock_guard<std::mutex> guard(run_lock());
  return time_conv(nhwc) < time_conv(graph_layout) ? 1 : 0;
}

// oneDNN's own per-primitive trace (level 2: creation and execution times), for profiling.
void set_verbose(int64_t level) { dnnl::set_verbose(static_cast<int>(level)); }

// Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX-BF16); elsewhere it emulates bf16 with
// float32 instructions, slower than float32 itself.  Asked of oneDNN, not of LLVM: LLVM names some
// virtualized CPUs after an older model (a Sapphire Rapids guest as "rocketlake") and drops their bf16.
bool has_native_bf16() {
  using isa = dnnl::cpu_isa;
  switch (dnnl::get_effective_cpu_isa()) {
    case isa::avx512_core_bf16:
    case isa::avx512_core_fp16:
    case isa::avx512_core_amx:
    case isa::avx512_core_amx_fp16:
      return true;
    default:
      return false;
  }
}

// TIR's parallel loops on this OpenMP pool instead of TVM's own (see _openmp_loops.py): oneDNN's OpenMP threads
// spin after each conv (GOMP_SPINCOUNT) while TVM's pool threads want the same two cores for the kernel that
// follows, and each side's idle threads slow the other.  These two functions have the signatures of TVM's
// TVMBackendParallelLaunch / TVMBackendParallelBarrier (tvm/runtime/c_backend_api.h), which a compiled
// TIR module calls through its __TVMBackendParallelLaunch / __TVMBackendParallelBarrier pointers.
namespace {
struct ParallelGroupEnv {
  void* sync_handle;
  int32_t num_task;
};
using ParallelLambda = int (*)(int task_id, ParallelGroupEnv* env, void* cdata);

int openmp_parallel_launch(ParallelLambda lambda, void* cdata, int num_task) {
  const int tasks = num_task > 0 ? num_task : omp_get_max_threads();
  int failed = 0;
#pragma omp parallel num_threads(tasks)
  {
    ParallelGroupEnv env{nullptr, omp_get_num_threads()};
    if (lambda(omp_get_thread_num(), &env, cdata) != 0) {
#pragma omp atomic write
      failed = 1;
    }
  }
  return failed ? -1 : 0;
}

int openmp_parallel_barrier(int, ParallelGroupEnv*) {
#pragma omp barrier
  return 0;
}
}  // namespace

// Addresses of the two functions above, for _openmp_loops to write into a loaded TIR module.
int64_t parallel_launch_address() { return reinterpret_cast<int64_t>(&openmp_parallel_launch); }
int64_t parallel_barrier_address() { return reinterpret_cast<int64_t>(&openmp_parallel_barrier); }
