// Runs the CUDA kernels of csrc/cuda/ on the CPU, compiled by the host compiler, to check their
// index math, masking, online softmax and reductions on a machine without a GPU
// (tests/test_cuda_gpu.py builds it with torch.utils.cpp_extension.load). One OS thread per CUDA
// thread; std::barrier stands in for __syncthreads and for warp shuffles; shared memory is a
// global buffer filled with 0xFF before each block. Between two __syncthreads the warps of a
// block take turns, one whole warp at a time, in ascending or descending order (WarpTurns), so
// that a missing barrier between one warp's shared-memory write and another's read (or the
// other way round) gives wrong data in one of the two orders instead of passing by luck. The register-resident fp16/bf16 kernels run
// their mma.sync fragments through emulated_mma_m16n8k16 below, which gathers a warp's fragments
// and multiplies them by the PTX ISA's fragment layout, and their ldmatrix.trans loads through
// emulated_ldmatrix_trans, so their fragment index math is checked too; the fp32/fp64 kernels
// run as they would on a GPU (FMA loops). Not part of the built extension (setup.py compiles
// csrc/cuda/*.{cu,cpp}).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

// --- The CUDA built-ins the kernels use, for one block at a time. ---------------------------
using std::max;
using std::min;

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local EmulatedDim3 threadIdx;  // per emulated thread
EmulatedDim3 blockIdx;                // shared by the threads of the running block
EmulatedDim3 blockDim;

constexpr int kMaxWarps = 8;
std::barrier<>* g_block_barrier = nullptr;
std::barrier<>* g_warp_barrier[kMaxWarps] = {};
alignas(16) unsigned char g_shuffle[kMaxWarps][32][8];

// The warps of the running block take turns between barriers: warp order[position] runs (all
// its lanes at once, since they meet at warp barriers), and when every lane of it has reached
// the next __syncthreads (or the end of the kernel) the turn passes to the next warp of the
// order; the last one's hands it back to the first for the next stretch. On a GPU any
// interleaving may happen; these two orders are the extremes for every pair of warps.
struct WarpTurns {
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<int> order;      // warps, in the order they run each stretch
  size_t position = 0;         // index into order of the warp whose turn it is
  std::vector<int> lanes;      // lanes per warp
  std::vector<int> remaining;  // lanes of each warp still running in this stretch

  WarpTurns(int threads, bool descending) {
    for (int w = 0; w * 32 < threads; ++w) {
      lanes.push_back(std::min(32, threads - 32 * w));
      order.push_back(w);
    }
    if (descending) {
      std::reverse(order.begin(), order.end());
    }
    remaining = lanes;
  }

  void begin() {
    std::unique_lock<std::mutex> lock(mutex);
    const int warp = threadIdx.x / 32;
    changed.wait(lock, [&] { return order[position] == warp; });
  }

  void end() {
    std::lock_guard<std::mutex> lock(mutex);
    const int warp = threadIdx.x / 32;
    if (--remaining[warp] == 0) {
      remaining[warp] = lanes[warp];
      position = (position + 1) % order.size();
      changed.notify_all();
    }
  }
};
WarpTurns* g_warp_turns = nullptr;
bool g_descending_warps = false;  // the order of the next launches (forward_backward sets it)

inline void __syncthreads() {
  g_warp_turns->end();
  g_block_barrier->arrive_and_wait();
  g_warp_turns->begin();
}

// Every lane publishes its value, the warp meets, each lane reads its partner's, the warp meets
// again before the buffer can be reused.
template <class T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  std::memcpy(g_shuffle[warp][lane], &value, sizeof(T));
  g_warp_barrier[warp]->arrive_and_wait();
  T partner;
  std::memcpy(&partner, g_shuffle[warp][lane ^ lane_mask], sizeof(T));
  g_warp_barrier[warp]->arrive_and_wait();
  return partner;
}

// mma.sync.m16n8k16 (fp32 accumulators) for one warp: every lane publishes its A and B registers,
// the warp meets, each lane computes its four D values from the gathered fragments, the warp
// meets again. Layout, from the PTX ISA's fragment tables (lane = 4 * group + quad):
//   A[row][k] is half k % 2 of register (row / 8) + 2 (k / 8) of lane 4 (row % 8) + (k % 8) / 2;
//   B[k][n] is half k % 2 of register k / 8 of lane 4 n + (k % 8) / 2;
//   D value v of a lane is D[group + 8 (v / 2)][2 quad + v % 2].
uint32_t g_mma_a[kMaxWarps][32][4];
uint32_t g_mma_b[kMaxWarps][32][2];

template <class T>
float emulated_half(uint32_t reg, int which) {
  const uint16_t bits = static_cast<uint16_t>(which ? reg >> 16 : reg & 0xFFFFu);
  T value;
  std::memcpy(&value, &bits, sizeof(bits));
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(value);
  } else {
    return __bfloat162float(value);
  }
}

template <class T>
void emulated_mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  std::memcpy(g_mma_a[warp][lane], a, sizeof(a));
  std::memcpy(g_mma_b[warp][lane], b, sizeof(b));
  g_warp_barrier[warp]->arrive_and_wait();
  for (int v = 0; v < 4; ++v) {
    const int row = lane / 4 + 8 * (v / 2);
    const int col = 2 * (lane % 4) + v % 2;
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) {
      const float x = emulated_half<T>(
          g_mma_a[warp][4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2);
      const float y = emulated_half<T>(g_mma_b[warp][4 * col + (k % 8) / 2][k / 8], k % 2);
      sum += x * y;
    }
    d[v] += sum;
  }
  g_warp_barrier[warp]->arrive_and_wait();
}

// ldmatrix.sync.aligned.m8n8.xN.trans.b16 for one warp: every lane publishes its row address,
// the warp meets, each lane reads its registers through the gathered addresses, the warp meets
// again. Matrix m's row r is at the address of lane 8 m + r; with .trans, register m of lane
// 4 g + q holds elements (2q, g) and (2q + 1, g) of matrix m, the lower row in the low half.
// Addresses must be 16-byte aligned, as on the GPU; run_grid fails the launch when one is not.
const unsigned char* g_ldmatrix_rows[kMaxWarps][32];
std::atomic<bool> g_ldmatrix_misaligned{false};

template <int N>
void emulated_ldmatrix_trans(uint32_t (&r)[N], const void* row) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
    g_ldmatrix_misaligned = true;
  }
  g_ldmatrix_rows[warp][lane] = static_cast<const unsigned char*>(row);
  g_warp_barrier[warp]->arrive_and_wait();
  for (int m = 0; m < N; ++m) {
    uint16_t halves[2];
    for (int e = 0; e < 2; ++e) {
      const unsigned char* matrix_row = g_ldmatrix_rows[warp][8 * m + 2 * (lane % 4) + e];
      std::memcpy(&halves[e], matrix_row + 2 * (lane / 4), sizeof(uint16_t));
    }
    r[m] = static_cast<uint32_t>(halves[0]) | (static_cast<uint32_t>(halves[1]) << 16);
  }
  g_warp_barrier[warp]->arrive_and_wait();
}

namespace aanet_kernels::cuda::detail {
alignas(128) unsigned char smem[300000];  // the kernels' `extern __shared__` buffer
}

// CUDA qualifiers mean nothing to the host compiler.
#undef __device__
#undef __global__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#undef __host__
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(x)
#define AANET_KERNELS_HOST_EMULATION
#include "../attention_2d_bwd.cuh"
#include "../attention_2d_fwd.cuh"

#include "../attention_2d_params.h"

#include <torch/extension.h>

namespace {

using aanet_kernels::cuda::Attention2dParams;
namespace detail = aanet_kernels::cuda::detail;

// Runs the launch `plan` block after block, with one OS thread per CUDA thread. The buffer past
// the dynamic shared memory the plan asks for is filled with a second pattern and checked after
// each block, since a GPU would fault (or corrupt another block's memory) where the emulation's
// larger buffer does not.
void run_launch(const detail::KernelLaunch& plan, const Attention2dParams& p) {
  const int threads = static_cast<int>(plan.threads);
  const size_t smem_bytes = plan.smem_bytes;
  TORCH_CHECK(threads <= 32 * kMaxWarps, "emulation: too many threads per block");
  TORCH_CHECK(smem_bytes <= sizeof(detail::smem), "emulation: shared buffer too small");
  constexpr unsigned char kBeyond = 0xA5;
  for (unsigned z = 0; z < plan.grid.z; ++z) {
    for (unsigned y = 0; y < plan.grid.y; ++y) {
      for (unsigned x = 0; x < plan.grid.x; ++x) {
        blockIdx = {x, y, z};
        blockDim = {plan.threads, 1, 1};
        std::memset(detail::smem, 0xFF, smem_bytes);  // garbage, NaN as floats
        std::memset(detail::smem + smem_bytes, kBeyond, sizeof(detail::smem) - smem_bytes);
        std::barrier<> block_barrier(threads);
        g_block_barrier = &block_barrier;
        WarpTurns turns(threads, g_descending_warps);
        g_warp_turns = &turns;
        std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
        for (int w = 0; w * 32 < threads; ++w) {
          warp_barriers.emplace_back(new std::barrier<>(std::min(32, threads - 32 * w)));
          g_warp_barrier[w] = warp_barriers.back().get();
        }
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = {static_cast<unsigned>(t), 0, 0};
            turns.begin();
            plan.kernel(p);
            turns.end();
          });
        }
        for (auto& thread : pool) {
          thread.join();
        }
        TORCH_CHECK(!g_ldmatrix_misaligned.exchange(false),
                    "emulation: an ldmatrix row address is not 16-byte aligned");
        for (size_t o = smem_bytes; o < sizeof(detail::smem); ++o) {
          TORCH_CHECK(detail::smem[o] == kBeyond, "emulation: a block wrote shared memory at byte ",
                      o, ", past the ", smem_bytes, " bytes its launch asks for");
        }
      }
    }
  }
}

// Forward then backward, through the launch plans the launchers in ../*.cuh use. Outputs start
// as NaN, so a value a kernel should write and does not shows.
template <class T, int D>
std::vector<at::Tensor> forward_backward_tiles(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias_h,
    const at::Tensor& bias_w, int64_t height, int64_t width, double scale,
    const at::Tensor& grad_out) {
  const auto sizes = [&](int64_t n) { return std::vector<int64_t>{q.size(0), q.size(1), q.size(2), n}; };
  Attention2dParams p = aanet_kernels::cuda::input_params(
      q, k, v, bias_h.defined() ? bias_h.expand(sizes(height)) : bias_h,
      bias_w.defined() ? bias_w.expand(sizes(width)) : bias_w, height, width, scale);
  const auto acc = q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const std::vector<int64_t> rows{q.size(0), q.size(1), q.size(2)};
  at::Tensor out = at::full(sizes(v.size(3)), NAN, q.options());
  at::Tensor lse = at::full(rows, NAN, q.options().dtype(detail::kTensorCore<T> ? at::kFloat : at::kDouble));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  run_launch(detail::forward_launch<T, D>(p), p);

  at::Tensor dq = at::full(q.sizes(), NAN, q.options());
  at::Tensor dk = at::full(k.sizes(), NAN, q.options());
  at::Tensor dv = at::full(v.sizes(), NAN, q.options());
  at::Tensor dbias_h = bias_h.defined() ? at::zeros(sizes(height), acc) : at::empty({0});
  at::Tensor dbias_w = bias_w.defined() ? at::zeros(sizes(width), acc) : at::empty({0});
  at::Tensor delta = at::full(rows, NAN, acc);
  p.grad_out = aanet_kernels::cuda::view4(grad_out);
  p.out_in = aanet_kernels::cuda::view4(out);
  p.delta = delta.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dbias_h = bias_h.defined() ? dbias_h.data_ptr() : nullptr;
  p.dbias_w = bias_w.defined() ? dbias_w.data_ptr() : nullptr;
  for (const detail::KernelLaunch& plan : detail::backward_launches<T, D>(p)) {
    run_launch(plan, p);
  }
  return {out, lse, dq, dk, dv, dbias_h, dbias_w};
}

template <class T>
std::vector<at::Tensor> forward_backward_typed(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias_h, const std::optional<at::Tensor>& bias_w,
    int64_t height, int64_t width, double scale, const at::Tensor& grad_out) {
  const at::Tensor h = bias_h.value_or(at::Tensor());
  const at::Tensor w = bias_w.value_or(at::Tensor());
  const int64_t needed = std::max(q.size(3), v.size(3));
  TORCH_CHECK(needed <= 128, "emulation: head dims up to 128");
  if (needed <= 16) {
    return forward_backward_tiles<T, 16>(q, k, v, h, w, height, width, scale, grad_out);
  }
  if (needed <= 32) {
    return forward_backward_tiles<T, 32>(q, k, v, h, w, height, width, scale, grad_out);
  }
  if (needed <= 64) {
    return forward_backward_tiles<T, 64>(q, k, v, h, w, height, width, scale, grad_out);
  }
  return forward_backward_tiles<T, 128>(q, k, v, h, w, height, width, scale, grad_out);
}

// Returns out, lse, dq, dk, dv, dbias_h, dbias_w (bias grads full size in the accumulator
// dtype, or empty when the bias is absent). CPU tensors; no input checks (tests only). The warps
// of every block take turns in descending order where descending_warps, else ascending.
std::vector<at::Tensor> forward_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias_h, const std::optional<at::Tensor>& bias_w,
    int64_t height, int64_t width, double scale, const at::Tensor& grad_out,
    bool descending_warps) {
  g_descending_warps = descending_warps;
  switch (q.scalar_type()) {
    case at::kDouble:
      return forward_backward_typed<double>(q, k, v, bias_h, bias_w, height, width, scale, grad_out);
    case at::kFloat:
      return forward_backward_typed<float>(q, k, v, bias_h, bias_w, height, width, scale, grad_out);
    case at::kHalf:
      return forward_backward_typed<__half>(q, k, v, bias_h, bias_w, height, width, scale, grad_out);
    default:
      return forward_backward_typed<__nv_bfloat16>(q, k, v, bias_h, bias_w, height, width, scale, grad_out);
  }
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_backward", &forward_backward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("bias_h"), py::arg("bias_w"), py::arg("height"), py::arg("width"),
        py::arg("scale"), py::arg("grad_out"), py::arg("descending_warps") = false);
}
