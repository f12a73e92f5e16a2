// 2-D convolutions (forward, input gradient, kernel gradient) by oneDNN, as XLA FFI handlers.
//
// Layouts are segjax's: activations NHWC, kernels HWIO (flax.linen.Conv's), float32. The
// activations stay NHWC (oneDNN has direct NHWC kernels); kernels are reordered to the layout
// oneDNN chooses for the shape, and the kernel gradient back to HWIO.
//
// Threads: XLA runs its thunks, these calls included, on its intra-op pool (one thread per
// core). A call splits its batch into one part per pool thread, each part a single-threaded
// oneDNN call; the calling thread and tasks on the pool take the parts in turn. Left to its
// own OpenMP threads instead, every pool thread that calls oneDNN leads a team of its own, and
// two calls at once (an input and a kernel gradient) put twice as many busy threads as cores.
// A batch that does not split evenly runs whole, on oneDNN's OpenMP threads.

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "parts.h"
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
  memory::desc src, weights, dst;  // NHWC, HWIO, NHWC, of one part: `batch` images.
  memory::desc weights_any;        // The kernel in the layout oneDNN prefers.
  memory::dims strides, dilation, pad_lo, pad_hi;
  int64_t batch;
  int64_t image_in, image_out;  // Floats per image of x and y.
};

// x: (N, H, W, C), kernel: (KH, KW, C, O), y: (N, HO, WO, O), in `parts` parts of N / parts
// images; oneDNN's dims are N, C, H, W and O, I, KH, KW whatever the memory layout; its
// dilation counts the zeros between taps.
ffi::ErrorOr<Geometry> MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                                    ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
                                    ffi::Span<const int64_t> padding,
                                    ffi::Span<const int64_t> dilation, int64_t parts) {
  if (x.size() != 4 || kernel.size() != 4 || y.size() != 4 || strides.size() != 2 ||
      padding.size() != 4 || dilation.size() != 2) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("oneDNN conv: expected NHWC/HWIO ranks and 2-D attributes"));
  }
  if (x[3] != kernel[2] || y[3] != kernel[3] || x[0] != y[0]) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("oneDNN conv: channel or batch sizes disagree"));
  }
  const auto f32 = memory::data_type::f32;
  const int64_t batch = x[0] / parts;
  Geometry g;
  g.src = memory::desc({batch, x[3], x[1], x[2]}, f32, Tag::nhwc);
  g.dst = memory::desc({batch, y[3], y[1], y[2]}, f32, Tag::nhwc);
  memory::dims weight_dims = {kernel[3], kernel[2], kernel[0], kernel[1]};
  g.weights = memory::desc(weight_dims, f32, Tag::hwio);
  g.weights_any = memory::desc(weight_dims, f32, Tag::any);
  g.strides = {strides[0], strides[1]};
  g.dilation = {dilation[0] - 1, dilation[1] - 1};
  g.pad_lo = {padding[0], padding[2]};
  g.pad_hi = {padding[1], padding[3]};
  g.batch = batch;
  g.image_in = x[1] * x[2] * x[3];
  g.image_out = y[1] * y[2] * y[3];
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

// How many parts the batch of `x` (N, H, W, C) splits into: one per pool thread, all the same
// size; else 1.
int64_t Parts(const ffi::ThreadPool& pool, ffi::Span<const int64_t> x) {
  int64_t threads = pool.num_threads();
  return threads > 1 && x.size() == 4 && x[0] % threads == 0 ? threads : 1;
}

// Runs `body(geometry, part, stream)` for each part of the batch (the whole batch as part 0 when
// it does not split); oneDNN's errors become XLA's.
template <typename Body>
ffi::Error Run(ffi::ThreadPool& pool, int64_t parts, ffi::Span<const int64_t> x,
               ffi::Span<const int64_t> kernel, ffi::Span<const int64_t> y,
               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
               ffi::Span<const int64_t> dilation, Body&& body) {
  auto geometry = MakeGeometry(x, kernel, y, strides, padding, dilation, parts);
  if (geometry.has_error()) return geometry.error();
  auto run_part = [&](int64_t part) {
    dnnl::stream stream(Engine());
    body(*geometry, part, stream);
    stream.wait();
  };
  std::string error;
  if (parts == 1) {
    try {
      run_part(0);
    } catch (const dnnl::error& e) {
      error = e.what();
    }
  } else {
    error = segjax::ForEachPart(pool, parts, run_part);
  }
  if (!error.empty()) return ffi::Error::Internal("oneDNN conv: " + error);
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation) {
  int64_t parts = Parts(pool, x.dimensions());
  return Run(pool, parts, x.dimensions(), kernel.dimensions(), y->dimensions(), strides, padding,
             dilation, [&](const Geometry& g, int64_t part, dnnl::stream& stream) {
    auto pd = ForwardDesc(g);
    memory src(g.src, Engine(), x.typed_data() + part * g.batch * g.image_in);
    memory weights(g.weights, Engine(), kernel.typed_data());
    memory dst(g.dst, Engine(), y->typed_data() + part * g.batch * g.image_out);
    memory weights_used = Reordered(stream, weights, pd.weights_desc());
    Execute<decltype(pd), dnnl::convolution_forward>(
        stream, pd, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights_used}, {DNNL_ARG_DST, dst}});
  });
}

ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                     ffi::ResultBuffer<ffi::F32> dx, ffi::Span<const int64_t> strides,
                     ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation) {
  int64_t parts = Parts(pool, dx->dimensions());
  return Run(pool, parts, dx->dimensions(), kernel.dimensions(), dy.dimensions(), strides,
             padding, dilation, [&](const Geometry& g, int64_t part, dnnl::stream& stream) {
    auto pd = BackwardDesc<dnnl::convolution_backward_data::primitive_desc>(g);
    memory diff_dst(g.dst, Engine(), dy.typed_data() + part * g.batch * g.image_out);
    memory weights(g.weights, Engine(), kernel.typed_data());
    memory diff_src(g.src, Engine(), dx->typed_data() + part * g.batch * g.image_in);
    memory weights_used = Reordered(stream, weights, pd.weights_desc());
    Execute<decltype(pd), dnnl::convolution_backward_data>(
        stream, pd,
        {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights_used}, {DNNL_ARG_DIFF_SRC, diff_src}});
  });
}

// Each part's kernel gradient goes to its own HWIO buffer (part 0's to the result), summed after.
ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dkernel, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation) {
  int64_t parts = Parts(pool, x.dimensions());
  int64_t size = dkernel->element_count();
  thread_local std::vector<float> buffer;  // The calling thread's; other threads write to it.
  buffer.resize(size * (parts - 1));
  float* part_grads = buffer.data();  // Parts 1 .. n - 1.
  float* result = dkernel->typed_data();
  ffi::Error error = Run(pool, parts, x.dimensions(), dkernel->dimensions(), dy.dimensions(),
                         strides, padding, dilation,
                         [&](const Geometry& g, int64_t part, dnnl::stream& stream) {
    auto pd = BackwardDesc<dnnl::convolution_backward_weights::primitive_desc>(g);
    memory src(g.src, Engine(), x.typed_data() + part * g.batch * g.image_in);
    memory diff_dst(g.dst, Engine(), dy.typed_data() + part * g.batch * g.image_out);
    float* grad = part == 0 ? result : part_grads + (part - 1) * size;
    memory diff_weights(g.weights, Engine(), grad);
    bool direct = pd.diff_weights_desc() == g.weights;
    memory computed = direct ? diff_weights : ThreadBuffer(kKernel, pd.diff_weights_desc());
    Execute<decltype(pd), dnnl::convolution_backward_weights>(
        stream, pd,
        {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, computed}});
    Reordered(stream, computed, g.weights, diff_weights);
  });
  if (error.success()) {
    for (int64_t part = 1; part < parts; ++part) {
      const float* grad = part_grads + (part - 1) * size;
      for (int64_t i = 0; i < size; ++i) result[i] += grad[i];
    }
  }
  return error;
}

}  // namespace

#define CONV_ATTRS                                    \
  .Attr<ffi::Span<const int64_t>>("strides")          \
      .Attr<ffi::Span<const int64_t>>("padding")      \
      .Attr<ffi::Span<const int64_t>>("dilation")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegjaxOnednnConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegjaxOnednnConvInputGrad, InputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegjaxOnednnConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
