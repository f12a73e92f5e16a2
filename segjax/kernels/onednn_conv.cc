// 2-D convolutions (forward, input gradient, kernel gradient) by oneDNN, as XLA FFI handlers.
//
// Layouts are segjax's: activations NHWC, kernels HWIO (flax.linen.Conv's), float32. The
// activations stay NHWC (oneDNN has direct NHWC kernels); kernels are reordered to the layout
// oneDNN chooses for the shape, and the kernel gradient back to HWIO.

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  memory::desc src, weights, dst;  // NHWC, HWIO, NHWC.
  memory::desc weights_any;        // The kernel in the layout oneDNN prefers.
  memory::dims strides, dilation, pad_lo, pad_hi;
};

// x: (N, H, W, C), kernel: (KH, KW, C, O), y: (N, HO, WO, O); oneDNN's dims are N, C, H, W and
// O, I, KH, KW whatever the memory layout; its dilation counts the zeros between taps.
ffi::ErrorOr<Geometry> MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                                    ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
                                    ffi::Span<const int64_t> padding,
                                    ffi::Span<const int64_t> dilation) {
  if (x.size() != 4 || kernel.size() != 4 || y.size() != 4 || strides.size() != 2 ||
      padding.size() != 4 || dilation.size() != 2) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("oneDNN conv: expected NHWC/HWIO ranks and 2-D attributes"));
  }
  if (x[3] != kernel[2] || y[3] != kernel[3] || x[0] != y[0]) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("oneDNN conv: channel or batch sizes disagree"));
  }
  const auto f32 = memory::data_type::f32;
  Geometry g;
  g.src = memory::desc({x[0], x[3], x[1], x[2]}, f32, Tag::nhwc);
  g.dst = memory::desc({y[0], y[3], y[1], y[2]}, f32, Tag::nhwc);
  memory::dims weight_dims = {kernel[3], kernel[2], kernel[0], kernel[1]};
  g.weights = memory::desc(weight_dims, f32, Tag::hwio);
  g.weights_any = memory::desc(weight_dims, f32, Tag::any);
  g.strides = {strides[0], strides[1]};
  g.dilation = {dilation[0] - 1, dilation[1] - 1};
  g.pad_lo = {padding[0], padding[2]};
  g.pad_hi = {padding[1], padding[3]};
  return g;
}

// Every primitive takes its scratchpad from the caller: XLA runs custom calls of several
// devices (pmap, sharded jit) at once, and oneDNN's own scratchpad is one per process.
const dnnl::primitive_attr& Attr() {
  static const dnnl::primitive_attr attr = [] {
    dnnl::primitive_attr a;
    a.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return a;
  }();
  return attr;
}

// Buffers this thread reuses from call to call: a fresh allocation per call costs more in page
// faults than the work it holds (a 256x256x3x3 kernel's reorder: 3.6 ms against 0.3).
enum Slot { kKernel, kScratchpad, kNumSlots };
memory ThreadBuffer(Slot slot, const memory::desc& desc) {
  thread_local std::vector<char> buffers[kNumSlots];
  std::vector<char>& buffer = buffers[slot];
  if (buffer.size() < desc.get_size()) buffer.resize(desc.get_size());
  return memory(desc, Engine(), buffer.data());
}

template <typename PrimitiveDesc, typename Primitive>
void Execute(dnnl::stream& stream, const PrimitiveDesc& pd, std::unordered_map<int, memory> args) {
  args.insert({DNNL_ARG_SCRATCHPAD, ThreadBuffer(kScratchpad, pd.scratchpad_desc())});
  Primitive(pd).execute(stream, args);
}

// `from` in the layout of `to_desc`: the same memory when the layouts agree, else a reorder
// into `to` (this thread's kernel buffer when absent).
memory Reordered(dnnl::stream& stream, const memory& from, const memory::desc& to_desc,
                 memory to = memory()) {
  if (from.get_desc() == to_desc) return from;
  if (!to) to = ThreadBuffer(kKernel, to_desc);
  dnnl::reorder::primitive_desc pd(from, to, Attr());
  Execute<dnnl::reorder::primitive_desc, dnnl::reorder>(
      stream, pd, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
  return to;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.src,
      g.weights_any, g.dst, g.strides, g.dilation, g.pad_lo, g.pad_hi, Attr());
}

// The input- or kernel-gradient primitive, with the forward one as its hint.
template <typename PrimitiveDesc>
PrimitiveDesc BackwardDesc(const Geometry& g) {
  return PrimitiveDesc(Engine(), dnnl::algorithm::convolution_direct, g.src, g.weights_any, g.dst,
                       g.strides, g.dilation, g.pad_lo, g.pad_hi, ForwardDesc(g), Attr());
}

// Runs `body(geometry, stream)` on the call's geometry; oneDNN's errors become XLA's.
template <typename Body>
ffi::Error Run(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
               ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation, Body&& body) {
  auto geometry = MakeGeometry(x, kernel, y, strides, padding, dilation);
  if (geometry.has_error()) return geometry.error();
  try {
    dnnl::stream stream(Engine());
    body(*geometry, stream);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation) {
  return Run(x.dimensions(), kernel.dimensions(), y->dimensions(), strides, padding, dilation,
             [&](const Geometry& g, dnnl::stream& stream) {
    auto pd = ForwardDesc(g);
    memory src(g.src, Engine(), x.typed_data());
    memory weights(g.weights, Engine(), kernel.typed_data());
    memory dst(g.dst, Engine(), y->typed_data());
    memory weights_used = Reordered(stream, weights, pd.weights_desc());
    Execute<decltype(pd), dnnl::convolution_forward>(
        stream, pd, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights_used}, {DNNL_ARG_DST, dst}});
  });
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                     ffi::ResultBuffer<ffi::F32> dx, ffi::Span<const int64_t> strides,
                     ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation) {
  return Run(dx->dimensions(), kernel.dimensions(), dy.dimensions(), strides, padding, dilation,
             [&](const Geometry& g, dnnl::stream& stream) {
    auto pd = BackwardDesc<dnnl::convolution_backward_data::primitive_desc>(g);
    memory diff_dst(g.dst, Engine(), dy.typed_data());
    memory weights(g.weights, Engine(), kernel.typed_data());
    memory diff_src(g.src, Engine(), dx->typed_data());
    memory weights_used = Reordered(stream, weights, pd.weights_desc());
    Execute<decltype(pd), dnnl::convolution_backward_data>(
        stream, pd,
        {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights_used}, {DNNL_ARG_DIFF_SRC, diff_src}});
  });
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dkernel, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation) {
  return Run(x.dimensions(), dkernel->dimensions(), dy.dimensions(), strides, padding, dilation,
             [&](const Geometry& g, dnnl::stream& stream) {
    auto pd = BackwardDesc<dnnl::convolution_backward_weights::primitive_desc>(g);
    memory src(g.src, Engine(), x.typed_data());
    memory diff_dst(g.dst, Engine(), dy.typed_data());
    memory diff_weights(g.weights, Engine(), dkernel->typed_data());
    bool direct = pd.diff_weights_desc() == g.weights;
    memory computed = direct ? diff_weights : ThreadBuffer(kKernel, pd.diff_weights_desc());
    Execute<decltype(pd), dnnl::convolution_backward_weights>(
        stream, pd,
        {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, computed}});
    Reordered(stream, computed, g.weights, diff_weights);
  });
}

}  // namespace

#define CONV_ATTRS                                    \
  .Attr<ffi::Span<const int64_t>>("strides")          \
      .Attr<ffi::Span<const int64_t>>("padding")      \
      .Attr<ffi::Span<const int64_t>>("dilation")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegjaxOnednnConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegjaxOnednnConvInputGrad, InputGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegjaxOnednnConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
