// BatchNorm with batch statistics, then ReLU, on (R, C) float32 rows, as XLA FFI handlers:
// the forward pass (statistics, normalization and ReLU in two passes over x) and its gradient
// (two passes over x, the output and its cotangent), rows split over XLA's CPU threads.
//
// Forward: mean = E[x], var = max(0, E[x^2] - mean^2) (flax's fast variance, on x less its first
// row; sums in double),
// z = max(0, (x - mean) * scale / sqrt(var + eps) + bias).
// Backward, with gr = g where z > 0 else 0 and xhat = (x - mean) / sqrt(var + eps):
// dbias = sum(gr), dscale = sum(gr * xhat), dx = scale / sqrt(var + eps) *
// (gr - dbias / R - xhat * dscale / R).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "parts.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Rows [first, last) of part `part` of `parts` over `rows` rows.
struct Rows {
  int64_t first, last;
};
Rows PartRows(int64_t rows, int64_t parts, int64_t part) {
  return {rows * part / parts, rows * (part + 1) / parts};
}

// One part per pool thread, at most one per row.
int64_t RowParts(const ffi::ThreadPool& pool, int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), rows));
}

constexpr int64_t kBlock = 256;  // Rows summed in float before adding to the double totals.

// The loops over rows, compiled for AVX-512, AVX2 and baseline x86-64 (chosen at load time).
#if defined(__x86_64__)
#define SEGJAX_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SEGJAX_CLONES
#endif

// sums[0:C] += sum of x - pivot, sums[C:2C] += sum of (x - pivot)^2 over rows r (a pivot near
// the mean keeps E[x^2] - E[x]^2 from cancelling: the first row).
SEGJAX_CLONES void SumX(const float* __restrict__ xs, int64_t c, Rows r,
                        const float* __restrict__ pivot, float* __restrict__ acc1,
                        float* __restrict__ acc2, double* __restrict__ sums) {
  for (int64_t start = r.first; start < r.last; start += kBlock) {
    for (int64_t j = 0; j < c; ++j) acc1[j] = acc2[j] = 0.0f;
    int64_t end = std::min(r.last, start + kBlock);
    for (int64_t i = start; i < end; ++i) {
      const float* __restrict__ row = xs + i * c;
      for (int64_t j = 0; j < c; ++j) {
        float v = row[j] - pivot[j];
        acc1[j] += v;
        acc2[j] += v * v;
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      sums[j] += acc1[j];
      sums[c + j] += acc2[j];
    }
  }
}

// z = max(0, (x - mean) * mul + bias) over rows r.
SEGJAX_CLONES void NormRelu(const float* __restrict__ xs, float* __restrict__ zs, int64_t c, Rows r,
                            const float* __restrict__ mean, const float* __restrict__ mul,
                            const float* __restrict__ bias) {
  for (int64_t i = r.first; i < r.last; ++i) {
    const float* __restrict__ row = xs + i * c;
    float* __restrict__ out = zs + i * c;
    for (int64_t j = 0; j < c; ++j) {  // max(v, 0): a NaN stays NaN, as in XLA's ReLU.
      out[j] = std::max((row[j] - mean[j]) * mul[j] + bias[j], 0.0f);
    }
  }
}

// With gr = g where z > 0 else 0: sums[0:C] += sum of gr, sums[C:2C] += sum of gr * (x - mean).
SEGJAX_CLONES void SumGrad(const float* __restrict__ xs, const float* __restrict__ zs,
                           const float* __restrict__ gs, int64_t c, Rows r,
                           const float* __restrict__ mean, float* __restrict__ acc1,
                           float* __restrict__ acc2, double* __restrict__ sums) {
  for (int64_t start = r.first; start < r.last; start += kBlock) {
    for (int64_t j = 0; j < c; ++j) acc1[j] = acc2[j] = 0.0f;
    int64_t end = std::min(r.last, start + kBlock);
    for (int64_t i = start; i < end; ++i) {
      const float* __restrict__ xr = xs + i * c;
      const float* __restrict__ zr = zs + i * c;
      const float* __restrict__ gr = gs + i * c;
      for (int64_t j = 0; j < c; ++j) {
        float gv = gr[j];
        float gj = zr[j] > 0.0f ? gv : 0.0f;
        acc1[j] += gj;
        acc2[j] += gj * (xr[j] - mean[j]);
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      sums[j] += acc1[j];
      sums[c + j] += acc2[j];
    }
  }
}

// dx = a * gr + b * (x - mean) + d over rows r.
SEGJAX_CLONES void GradX(const float* __restrict__ xs, const float* __restrict__ zs,
                         const float* __restrict__ gs, float* __restrict__ dxs, int64_t c, Rows r,
                         const float* __restrict__ mean, const float* __restrict__ a,
                         const float* __restrict__ b, const float* __restrict__ d) {
  for (int64_t i = r.first; i < r.last; ++i) {
    const float* __restrict__ xr = xs + i * c;
    const float* __restrict__ zr = zs + i * c;
    const float* __restrict__ gr = gs + i * c;
    float* __restrict__ out = dxs + i * c;
    for (int64_t j = 0; j < c; ++j) {
      float gv = gr[j];
      float gj = zr[j] > 0.0f ? gv : 0.0f;
      out[j] = a[j] * gj + b[j] * (xr[j] - mean[j]) + d[j];
    }
  }
}

// Runs `pass(part)` for each of `parts` parts (on this thread alone when one).
ffi::Error Parallel(ffi::ThreadPool& pool, int64_t parts, const std::function<void(int64_t)>& pass) {
  if (parts == 1) {
    pass(0);
    return ffi::Error::Success();
  }
  std::string error = segjax::ForEachPart(pool, parts, pass);
  if (!error.empty()) return ffi::Error::Internal("BatchNorm + ReLU: " + error);
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> z,
                   ffi::ResultBuffer<ffi::F32> mean_out, ffi::ResultBuffer<ffi::F32> var_out,
                   float epsilon) {
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("BatchNorm + ReLU: x must be (R, C)");
  const int64_t rows = dims[0], c = dims[1];
  const int64_t parts = RowParts(pool, rows);
  const float* xs = x.typed_data();
  std::vector<double> sums(parts * 2 * c, 0.0);  // Per part: of x - pivot, then its square.
  ffi::Error error = Parallel(pool, parts, [&](int64_t part) {
    std::vector<float> acc(2 * c);
    SumX(xs, c, PartRows(rows, parts, part), xs, acc.data(), acc.data() + c,
         sums.data() + part * 2 * c);
  });
  if (error.failure()) return error;
  std::vector<float> mul(c);
  const float* scales = scale.typed_data();
  const float* biases = bias.typed_data();
  for (int64_t j = 0; j < c; ++j) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t part = 0; part < parts; ++part) {
      s1 += sums[part * 2 * c + j];
      s2 += sums[part * 2 * c + c + j];
    }
    double shift = rows > 0 ? s1 / rows : 0.0;  // mean - pivot.
    double mean = rows > 0 ? xs[j] + shift : 0.0;
    double var = rows > 0 ? std::max(s2 / rows - shift * shift, 0.0) : 0.0;  // NaN stays.
    mean_out->typed_data()[j] = static_cast<float>(mean);
    var_out->typed_data()[j] = static_cast<float>(var);
    mul[j] = static_cast<float>(scales[j] / std::sqrt(static_cast<float>(var) + epsilon));
  }
  float* zs = z->typed_data();
  return Parallel(pool, parts, [&](int64_t part) {
    NormRelu(xs, zs, c, PartRows(rows, parts, part), mean_out->typed_data(), mul.data(),
             biases);
  });
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> z,
                    ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> scale,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                    ffi::ResultBuffer<ffi::F32> dbias, float epsilon) {
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("BatchNorm + ReLU: x must be (R, C)");
  const int64_t rows = dims[0], c = dims[1];
  const int64_t parts = RowParts(pool, rows);
  const float *xs = x.typed_data(), *zs = z.typed_data(), *gs = g.typed_data();
  const float* means = mean.typed_data();
  std::vector<double> sums(parts * 2 * c, 0.0);  // Per part: sum of gr, then of gr * (x - mean).
  ffi::Error error = Parallel(pool, parts, [&](int64_t part) {
    std::vector<float> acc(2 * c);
    SumGrad(xs, zs, gs, c, PartRows(rows, parts, part), means, acc.data(), acc.data() + c,
            sums.data() + part * 2 * c);
  });
  if (error.failure()) return error;
  // dx = a * gr + b * (x - mean) + d, per channel.
  std::vector<float> a(c), b(c), d(c);
  for (int64_t j = 0; j < c; ++j) {
    double sg = 0.0, sgx = 0.0;
    for (int64_t part = 0; part < parts; ++part) {
      sg += sums[part * 2 * c + j];
      sgx += sums[part * 2 * c + c + j];
    }
    double invstd = 1.0 / std::sqrt(static_cast<double>(var.typed_data()[j]) + epsilon);
    double k = scale.typed_data()[j] * invstd;
    double slope = rows > 0 ? -k * invstd * invstd * sgx / rows : 0.0;
    double offset = rows > 0 ? -k * sg / rows : 0.0;
    a[j] = static_cast<float>(k);
    b[j] = static_cast<float>(slope);
    d[j] = static_cast<float>(offset);
    dbias->typed_data()[j] = static_cast<float>(sg);
    dscale->typed_data()[j] = static_cast<float>(sgx * invstd);
  }
  float* dxs = dx->typed_data();
  return Parallel(pool, parts, [&](int64_t part) {
    GradX(xs, zs, gs, dxs, c, PartRows(rows, parts, part), means, a.data(), b.data(), d.data());
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegjaxBatchNormReluForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegjaxBatchNormReluBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));
