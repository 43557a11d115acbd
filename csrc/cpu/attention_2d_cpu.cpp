// Fused 2D relative-position attention on the CPU, forward and backward, flash style.
//
// Work is cut into query blocks (kBlockM queries) and key blocks made of whole key rows of the
// feature map, so that a key block's bias is "bias_h[i, y] + bias_w[i, x]" over a rectangle and its
// bias gradients reduce along contiguous runs. Tile products go through torch's BLAS
// (at::native::cpublas::gemm); exp/max/sum through at::vec. Nothing of size L x L is allocated:
// per thread, two kBlockM x (key block) tiles.
//
// half and bfloat16 inputs are converted to float32 at the boundary and computed in float32;
// float64 is computed in float64 (that is what gradcheck needs).

// Use the widest vector unit this file is compiled for (setup.py passes -march=native unless
// AANET_KERNELS_PORTABLE=1). A namespace of our own keeps these inline definitions apart from
// torch's copies of the same templates.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#define CPU_CAPABILITY aanet_kernels_native

#include "../attention_2d.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace aanet_kernels {
namespace {

using at::vec::Vectorized;

constexpr int64_t kBlockM = 64;
// Key blocks hold whole key rows, about this many keys (at least one row).
constexpr int64_t kKeyBlockTarget = 128;

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// The Fortran BLAS that libtorch links and exports (MKL on x86-64 wheels, OpenBLAS elsewhere).
// torch's own typed cpublas::gemm wrappers that call it are not exported to extensions.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const float* alpha, const float* a, const int* lda, const float* b,
                      const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const double* alpha, const double* a, const int* lda, const double* b,
                      const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C = alpha * op(A) @ op(B) + beta * C. BLAS is column-major, and a row-major matrix is
// its transpose seen column-major, so this computes C^T = op(B)^T op(A)^T. Every size and leading
// dimension here is kBlockM, dkh, dvh or a key block's length (at most max(width, 128)), which
// check_blas_sizes holds to int.
template <typename T>
void gemm_row_major(
    bool trans_a,
    bool trans_b,
    int64_t m,
    int64_t n,
    int64_t k,
    T alpha,
    const T* a,
    int64_t lda,
    const T* b,
    int64_t ldb,
    T beta,
    T* c,
    int64_t ldc) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int m_ = static_cast<int>(n), n_ = static_cast<int>(m), k_ = static_cast<int>(k);
  const int lda_ = static_cast<int>(ldb), ldb_ = static_cast<int>(lda);
  const int ldc_ = static_cast<int>(ldc);
  blas_gemm(&ta, &tb, &m_, &n_, &k_, &alpha, b, &lda_, a, &ldb_, &beta, c, &ldc_);
}

// Maximum of x[0:n] that propagates NaN (so a NaN logit poisons its row, as in the reference).
template <typename T>
T row_max(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(kNegInf<T>);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    acc = at::vec::maximum(acc, Vec::loadu(x + j));  // NaN-propagating, unlike std::max
  }
  T lanes[Vec::size()];
  acc.store(lanes);
  T result = kNegInf<T>;
  for (int64_t l = 0; l < Vec::size(); ++l) {
    result = (lanes[l] > result || lanes[l] != lanes[l]) ? lanes[l] : result;
  }
  for (; j < n; ++j) {
    result = (x[j] > result || x[j] != x[j]) ? x[j] : result;
  }
  return result;
}

// x[j] = exp((x[j] - shift) - shift_lo) in place; returns the sum. exp(-inf) is 0. The shift
// in two parts is the backward's fp64 lse split into fp32 (lse_dtype in attention_2d.h): x - shift
// is exact where x is near the shift, so the small part is not lost to rounding at |x| >> 1.
template <typename T>
T exp_shifted_sum(T* x, int64_t n, T shift, T shift_lo = T(0)) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp((x[j] - shift) - shift_lo);
    sum += x[j];
  }
  return sum;
}

template <>
float exp_shifted_sum<float>(float* x, int64_t n, float shift, float shift_lo) {
  using Vec = Vectorized<float>;
  const Vec vshift(shift);
  const Vec vshift_lo(shift_lo);
  const Vec neg_inf(kNegInf<float>);
  Vec vsum(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec in = Vec::loadu(x + j);
    // exp_u20 is torch's fast float exp (the one its flash-attention CPU kernel uses); the
    // blend makes exp(-inf) exactly 0 whatever its polynomial does at the clamp.
    Vec e = ((in - vshift) - vshift_lo).exp_u20();
    e = Vec::blendv(e, Vec(0.f), in == neg_inf);
    e.store(x + j);
    vsum = vsum + e;
  }
  float lanes[Vec::size()];
  vsum.store(lanes);
  float sum = 0.f;
  for (int64_t l = 0; l < Vec::size(); ++l) {
    sum += lanes[l];
  }
  for (; j < n; ++j) {
    x[j] = std::exp((x[j] - shift) - shift_lo);
    sum += x[j];
  }
  return sum;
}

// The inputs of one call as raw pointers: q, k, v contiguous (B, Nh, L, d); each bias a
// (B, Nh, L, size) view with a contiguous last dim and any other strides (0 where broadcast).
template <typename T>
struct Problem {
  int64_t batch, heads, length, height, width, dk, dv;
  T scale;
  const T* q;
  const T* k;
  const T* v;
  const T* bias_h;  // nullptr when absent
  const T* bias_w;
  int64_t bias_h_strides[3];  // batch, head, query
  int64_t bias_w_strides[3];

  int64_t rows_per_key_block() const {
    return std::max<int64_t>(1, kKeyBlockTarget / width);
  }
  int64_t num_query_blocks() const {
    return (length + kBlockM - 1) / kBlockM;
  }
  const T* bias_h_row(int64_t b, int64_t h, int64_t i) const {
    return bias_h + b * bias_h_strides[0] + h * bias_h_strides[1] + i * bias_h_strides[2];
  }
  const T* bias_w_row(int64_t b, int64_t h, int64_t i) const {
    return bias_w + b * bias_w_strides[0] + h * bias_w_strides[1] + i * bias_w_strides[2];
  }

  // scores[r, :] = scale * q[i0 + r] . k[j] (+ biases) for the key block of rows [y0, y0 + rows).
  void logits_tile(int64_t b, int64_t h, int64_t i0, int64_t bm, int64_t y0, int64_t rows,
                   T* scores) const {
    const int64_t bh = b * heads + h;
    const int64_t bn = rows * width;
    gemm_row_major<T>(
        false, true, bm, bn, dk, scale, q + (bh * length + i0) * dk, dk,
        k + (bh * length + y0 * width) * dk, dk, T(0), scores, bn);
    if (bias_h == nullptr && bias_w == nullptr) {
      return;
    }
    for (int64_t r = 0; r < bm; ++r) {
      const T* row_bias = bias_h ? bias_h_row(b, h, i0 + r) + y0 : nullptr;
      const T* col_bias = bias_w ? bias_w_row(b, h, i0 + r) : nullptr;
      for (int64_t yy = 0; yy < rows; ++yy) {
        T* s = scores + r * bn + yy * width;
        const T hb = row_bias ? row_bias[yy] : T(0);
        if (col_bias) {
          for (int64_t x = 0; x < width; ++x) {
            s[x] += hb + col_bias[x];
          }
        } else {
          for (int64_t x = 0; x < width; ++x) {
            s[x] += hb;
          }
        }
      }
    }
  }
};

template <typename T>
void forward_kernel(const Problem<T>& p, T* out, double* lse) {
  const int64_t q_blocks = p.num_query_blocks();
  const int64_t rows_per_block = p.rows_per_key_block();
  const int64_t max_bn = std::min(rows_per_block, p.height) * p.width;
  at::parallel_for(0, p.batch * p.heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(kBlockM * max_bn);
    std::vector<T> acc(kBlockM * p.dv);
    std::vector<T> run_max(kBlockM), run_sum(kBlockM);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_blocks;
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const int64_t i0 = (task % q_blocks) * kBlockM;
      const int64_t bm = std::min(kBlockM, p.length - i0);
      std::fill(run_max.begin(), run_max.end(), kNegInf<T>);
      std::fill(run_sum.begin(), run_sum.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t y0 = 0; y0 < p.height; y0 += rows_per_block) {
        const int64_t rows = std::min(rows_per_block, p.height - y0);
        const int64_t bn = rows * p.width;
        p.logits_tile(b, h, i0, bm, y0, rows, scores.data());
        for (int64_t r = 0; r < bm; ++r) {
          T* s = scores.data() + r * bn;
          const T tile_max = row_max(s, bn);  // NaN stays NaN: std::max would drop it
          const T new_max = tile_max > run_max[r] || tile_max != tile_max ? tile_max : run_max[r];
          if (new_max == kNegInf<T>) {  // every key so far masked: contributes nothing
            std::fill(s, s + bn, T(0));
            continue;
          }
          const T correction = std::exp(run_max[r] - new_max);
          run_sum[r] = run_sum[r] * correction + exp_shifted_sum(s, bn, new_max);
          run_max[r] = new_max;
          if (correction != T(1)) {
            T* a = acc.data() + r * p.dv;
            for (int64_t d = 0; d < p.dv; ++d) {
              a[d] *= correction;
            }
          }
        }
        gemm_row_major<T>(
            false, false, bm, p.dv, bn, T(1), scores.data(), bn,
            p.v + (bh * p.length + y0 * p.width) * p.dv, p.dv, T(1), acc.data(), p.dv);
      }
      for (int64_t r = 0; r < bm; ++r) {
        const int64_t i = bh * p.length + i0 + r;
        // A fully masked row has run_sum 0: its output is 0 and its lse -inf.
        const T inv = run_sum[r] == T(0) ? T(0) : T(1) / run_sum[r];
        for (int64_t d = 0; d < p.dv; ++d) {
          out[i * p.dv + d] = acc[r * p.dv + d] * inv;
        }
        // Summed in fp64: rounded to fp32, m + log(l) would lose what the backward needs.
        lse[i] = run_sum[r] == T(0)
            ? kNegInf<double>
            : static_cast<double>(run_max[r]) + static_cast<double>(std::log(run_sum[r]));
      }
    }
  });
}

// Gradients of one (batch, head) pair are owned by one thread and accumulated in a fixed order,
// so results are deterministic and need no atomics.
template <typename T>
void backward_kernel(const Problem<T>& p, const T* grad_out, const T* out, const double* lse,
                     T* dq, T* dk, T* dv, T* dbias_h, T* dbias_w) {
  const int64_t rows_per_block = p.rows_per_key_block();
  const int64_t max_bn = std::min(rows_per_block, p.height) * p.width;
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> probs(kBlockM * max_bn), dscores(kBlockM * max_bn);
    std::vector<T> delta(p.length);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const int64_t base = bh * p.length;
      for (int64_t i = 0; i < p.length; ++i) {  // delta_i = dO_i . O_i
        T sum = 0;
        for (int64_t d = 0; d < p.dv; ++d) {
          sum += grad_out[(base + i) * p.dv + d] * out[(base + i) * p.dv + d];
        }
        delta[i] = sum;
      }
      for (int64_t i0 = 0; i0 < p.length; i0 += kBlockM) {
        const int64_t bm = std::min(kBlockM, p.length - i0);
        const T* q_tile = p.q + (base + i0) * p.dk;
        const T* do_tile = grad_out + (base + i0) * p.dv;
        for (int64_t y0 = 0; y0 < p.height; y0 += rows_per_block) {
          const int64_t rows = std::min(rows_per_block, p.height - y0);
          const int64_t bn = rows * p.width;
          const int64_t j0 = y0 * p.width;
          p.logits_tile(b, h, i0, bm, y0, rows, probs.data());
          for (int64_t r = 0; r < bm; ++r) {  // P = exp(S - lse); fully masked rows give 0
            T* s = probs.data() + r * bn;
            const double row_lse = lse[base + i0 + r];
            if (row_lse == kNegInf<double>) {
              std::fill(s, s + bn, T(0));
            } else {
              const T hi = static_cast<T>(row_lse);
              exp_shifted_sum(s, bn, hi, static_cast<T>(row_lse - hi));
            }
          }
          // dV_j += P^T dO_i ;  dP = dO_i V_j^T
          gemm_row_major<T>(true, false, bn, p.dv, bm, T(1), probs.data(), bn, do_tile, p.dv,
                            T(1), dv + (base + j0) * p.dv, p.dv);
          gemm_row_major<T>(false, true, bm, bn, p.dv, T(1), do_tile, p.dv,
                            p.v + (base + j0) * p.dv, p.dv, T(0), dscores.data(), bn);
          for (int64_t r = 0; r < bm; ++r) {  // dS = P * (dP - delta), and the bias gradients
            const int64_t i = i0 + r;
            T* ds = dscores.data() + r * bn;
            const T* pr = probs.data() + r * bn;
            for (int64_t j = 0; j < bn; ++j) {
              ds[j] = pr[j] * (ds[j] - delta[i]);
            }
            if (dbias_h) {
              T* grad_row = dbias_h + (base + i) * p.height + y0;
              for (int64_t yy = 0; yy < rows; ++yy) {
                T sum = 0;
                for (int64_t x = 0; x < p.width; ++x) {
                  sum += ds[yy * p.width + x];
                }
                grad_row[yy] = sum;
              }
            }
            if (dbias_w) {
              T* grad_col = dbias_w + (base + i) * p.width;
              for (int64_t yy = 0; yy < rows; ++yy) {
                for (int64_t x = 0; x < p.width; ++x) {
                  grad_col[x] += ds[yy * p.width + x];
                }
              }
            }
          }
          // dQ_i += scale dS K_j ;  dK_j += scale dS^T Q_i
          gemm_row_major<T>(false, false, bm, p.dk, bn, p.scale, dscores.data(), bn,
                            p.k + (base + j0) * p.dk, p.dk, T(1), dq + (base + i0) * p.dk, p.dk);
          gemm_row_major<T>(true, false, bn, p.dk, bm, p.scale, dscores.data(), bn, q_tile, p.dk,
                            T(1), dk + (base + j0) * p.dk, p.dk);
        }
      }
    }
  });
}

// Contiguous copy in the compute dtype (no copy when it already is one).
at::Tensor prepare(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

// The bias in the compute dtype with a contiguous last dim, expanded to (B, Nh, L, size).
at::Tensor prepare_bias(const std::optional<at::Tensor>& bias, const at::Tensor& q,
                        int64_t size, at::ScalarType dtype) {
  if (!bias.has_value()) {
    return at::Tensor();
  }
  at::Tensor b = bias->to(dtype);
  if (b.stride(-1) != 1) {
    b = b.contiguous();
  }
  return expand_bias(b, q, size);
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& bias_h, const at::Tensor& bias_w, int64_t height,
                        int64_t width, double scale) {
  Problem<T> p{};
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.length = q.size(2);
  p.height = height;
  p.width = width;
  p.dk = q.size(3);
  p.dv = v.size(3);
  p.scale = static_cast<T>(scale);
  p.q = q.const_data_ptr<T>();
  p.k = k.const_data_ptr<T>();
  p.v = v.const_data_ptr<T>();
  p.bias_h = bias_h.defined() ? bias_h.const_data_ptr<T>() : nullptr;
  p.bias_w = bias_w.defined() ? bias_w.const_data_ptr<T>() : nullptr;
  for (int d = 0; d < 3; ++d) {
    p.bias_h_strides[d] = bias_h.defined() ? bias_h.stride(d) : 0;
    p.bias_w_strides[d] = bias_w.defined() ? bias_w.stride(d) : 0;
  }
  return p;
}

void check_cpu(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), "q: expected a CPU tensor for the CPU kernel, got ",
              q.device());
}

// The tile products pass dkh, dvh and a key block's length (up to the map width) to BLAS as int:
// a larger one would wrap (2^32 + 1 to 1) and give a wrong answer without an error.
void check_blas_sizes(const at::Tensor& q, const at::Tensor& v, int64_t width) {
  constexpr int64_t int_max = std::numeric_limits<int>::max();
  TORCH_CHECK(q.size(3) <= int_max, "q: the CPU kernel takes head dims up to ", int_max,
              " (BLAS's int), got dkh=", q.size(3));
  TORCH_CHECK(v.size(3) <= int_max, "v: the CPU kernel takes head dims up to ", int_max,
              " (BLAS's int), got dvh=", v.size(3));
  TORCH_CHECK(width <= int_max, "width: the CPU kernel takes map widths up to ", int_max,
              " (BLAS's int), got ", width);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_2d_fwd_cpu(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& bias_h,
    const std::optional<at::Tensor>& bias_w,
    int64_t height,
    int64_t width,
    double scale) {
  check_attention_2d_inputs(q, k, v, bias_h, bias_w, height, width, scale);
  check_cpu(q);
  check_blas_sizes(q, v, width);
  const auto dtype = accumulator_dtype(q.scalar_type());
  const at::Tensor q_c = prepare(q, dtype), k_c = prepare(k, dtype), v_c = prepare(v, dtype);
  const at::Tensor bh = prepare_bias(bias_h, q, height, dtype);
  const at::Tensor bw = prepare_bias(bias_w, q, width, dtype);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q_c.options());
  // The kernel writes an fp64 lse for every dtype; half/bfloat16 keep an fp32 one.
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q_c.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(dtype, "attention_2d_fwd_cpu", [&] {
    const auto problem = make_problem<scalar_t>(q_c, k_c, v_c, bh, bw, height, width, scale);
    forward_kernel<scalar_t>(problem, out.mutable_data_ptr<scalar_t>(),
                             lse.mutable_data_ptr<double>());
  });
  return {out.to(q.scalar_type()), lse.to(lse_dtype(q.scalar_type()))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_2d_bwd_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& bias_h,
    const std::optional<at::Tensor>& bias_w,
    const at::Tensor& out,
    const at::Tensor& lse,
    int64_t height,
    int64_t width,
    double scale) {
  check_attention_2d_inputs(q, k, v, bias_h, bias_w, height, width, scale);
  check_cpu(q);
  check_attention_2d_backward_inputs(grad_out, q, v, out, lse);
  check_blas_sizes(q, v, width);
  const auto dtype = accumulator_dtype(q.scalar_type());
  const at::Tensor q_c = prepare(q, dtype), k_c = prepare(k, dtype), v_c = prepare(v, dtype);
  const at::Tensor do_c = prepare(grad_out, dtype), out_c = prepare(out, dtype);
  const at::Tensor lse_c = prepare(lse, at::kDouble);
  const at::Tensor bh = prepare_bias(bias_h, q, height, dtype);
  const at::Tensor bw = prepare_bias(bias_w, q, width, dtype);
  const auto opts = q_c.options();
  at::Tensor dq = at::zeros(q.sizes(), opts), dk = at::zeros(k.sizes(), opts);
  at::Tensor dv = at::zeros(v.sizes(), opts);
  at::Tensor dbias_h = bh.defined() ? at::zeros(bh.sizes(), opts) : at::empty({0}, opts);
  at::Tensor dbias_w = bw.defined() ? at::zeros(bw.sizes(), opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(dtype, "attention_2d_bwd_cpu", [&] {
    const auto problem = make_problem<scalar_t>(q_c, k_c, v_c, bh, bw, height, width, scale);
    backward_kernel<scalar_t>(
        problem, do_c.const_data_ptr<scalar_t>(), out_c.const_data_ptr<scalar_t>(),
        lse_c.const_data_ptr<double>(), dq.mutable_data_ptr<scalar_t>(),
        dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(),
        bh.defined() ? dbias_h.mutable_data_ptr<scalar_t>() : nullptr,
        bw.defined() ? dbias_w.mutable_data_ptr<scalar_t>() : nullptr);
  });
  const auto in_dtype = q.scalar_type();
  return {dq.to(in_dtype), dk.to(in_dtype), dv.to(in_dtype), dbias_h.to(in_dtype),
          dbias_w.to(in_dtype)};
}

TORCH_LIBRARY_IMPL(aanet_kernels, CPU, m) {
  m.impl("attention_2d_fwd", &attention_2d_fwd_cpu);
  m.impl("attention_2d_bwd", &attention_2d_bwd_cpu);
}

}  // namespace aanet_kernels
