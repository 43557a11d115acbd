// Runs the CUDA kernels of csrc/cuda/ on the CPU, compiled by the host compiler, to check their
// index math, masking, online softmax and reductions on a machine without a GPU
// (tests/test_cuda_gpu.py builds it with torch.utils.cpp_extension.load). One OS thread per CUDA
// thread; std::barrier stands in for __syncthreads and for warp shuffles; shared memory is a
// global buffer filled with 0xFF before each block. Without __CUDA_ARCH__ the GEMMs take the
// plain loop path, so the WMMA code is NOT exercised here; everything else (tile shapes of every
// dtype included) is. Not part of the built extension (setup.py compiles csrc/cuda/*.{cu,cpp}).
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cmath>
#include <algorithm>
using std::min; using std::max;
struct EDim3 { unsigned x = 0, y = 0, z = 0; };
thread_local EDim3 threadIdx;
EDim3 blockIdx;
EDim3 blockDim;
std::barrier<>* g_bar;
std::barrier<>* g_warp_bar[8];
alignas(16) unsigned char g_xbuf[8][32][8];
inline void __syncthreads() { g_bar->arrive_and_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T x, int off) {
  int w = threadIdx.x / 32, l = threadIdx.x % 32;
  std::memcpy(g_xbuf[w][l], &x, sizeof(T));
  g_warp_bar[w]->arrive_and_wait();
  T y; std::memcpy(&y, g_xbuf[w][l ^ off], sizeof(T));
  g_warp_bar[w]->arrive_and_wait();
  return y;
}
namespace aanet_kernels::cuda::detail { alignas(128) unsigned char smem[300000]; }
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
#include "../attention_2d_bwd.cuh"
#include "../attention_2d_fwd.cuh"
#include <torch/extension.h>
using namespace aanet_kernels::cuda;

template <class F> void run_grid(F kernel, EDim3 grid, int nt, const Attention2dParams& p) {
  for (unsigned z = 0; z < grid.z; ++z) for (unsigned y = 0; y < grid.y; ++y) for (unsigned x = 0; x < grid.x; ++x) {
    blockIdx = {x, y, z}; blockDim = {(unsigned)nt, 1, 1};
    std::memset(aanet_kernels::cuda::detail::smem, 0xFF, sizeof(aanet_kernels::cuda::detail::smem));  // NaN-ish garbage
    std::barrier<> bar(nt); g_bar = &bar;
    std::vector<std::unique_ptr<std::barrier<>>> wb;
    for (int w = 0; w < (nt + 31) / 32; ++w) { wb.emplace_back(new std::barrier<>(std::min(32, nt - 32 * w))); g_warp_bar[w] = wb.back().get(); }
    std::vector<std::thread> ts;
    for (int t = 0; t < nt; ++t) ts.emplace_back([&, t] { threadIdx = {(unsigned)t, 0, 0}; kernel(p); });
    for (auto& t : ts) t.join();
  }
}
Tensor4 v4(const at::Tensor& t) { Tensor4 r; if (!t.defined()) return r; r.ptr = t.data_ptr(); for (int d = 0; d < 4; ++d) r.stride[d] = t.stride(d); return r; }
int pad(int a, int b) { int m = std::max(a, b); for (int s : {16, 32, 64, 128}) if (m <= s) return s; return -1; }

template <class T, int D>
std::vector<at::Tensor> run(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor bh, at::Tensor bw, int64_t H, int64_t W, double scale, at::Tensor dout) {
  using namespace aanet_kernels::cuda::detail;
  Attention2dParams p;
  p.q = v4(q); p.k = v4(k); p.v = v4(v);
  at::Tensor bhe = bh.defined() ? bh.expand({q.size(0), q.size(1), q.size(2), H}) : bh;
  at::Tensor bwe = bw.defined() ? bw.expand({q.size(0), q.size(1), q.size(2), W}) : bw;
  p.bias_h = v4(bhe); p.bias_w = v4(bwe);
  p.batch = q.size(0); p.heads = q.size(1); p.length = q.size(2); p.height = H; p.width = W; p.dkh = q.size(3); p.dvh = v.size(3); p.scale = scale;
  auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::full({q.size(0), q.size(1), q.size(2), v.size(3)}, NAN, q.options());
  at::Tensor lse = at::full({q.size(0), q.size(1), q.size(2)}, NAN, q.options().dtype(acc));
  p.out = out.data_ptr(); p.lse = lse.data_ptr();
  using S = FwdSmem<T, D>;
  EDim3 grid{(unsigned)((p.length + S::BM - 1) / S::BM), (unsigned)p.heads, (unsigned)p.batch};
  run_grid(attention_2d_fwd_kernel<T, D>, grid, Tiles<T, D>::kThreads, p);
  at::Tensor dq = at::full_like(q, NAN).contiguous(), dk = at::full_like(k, NAN).contiguous(), dv = at::full_like(v, NAN).contiguous();
  at::Tensor dbh = bh.defined() ? at::zeros({q.size(0), q.size(1), q.size(2), H}, q.options().dtype(acc)) : at::Tensor();
  at::Tensor dbw = bw.defined() ? at::zeros({q.size(0), q.size(1), q.size(2), W}, q.options().dtype(acc)) : at::Tensor();
  at::Tensor delta = at::full({q.size(0), q.size(1), q.size(2)}, NAN, q.options().dtype(acc));
  p.grad_out = v4(dout); p.out_in = v4(out); p.delta = delta.data_ptr();
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  p.dbias_h = dbh.defined() ? dbh.data_ptr() : nullptr; p.dbias_w = dbw.defined() ? dbw.data_ptr() : nullptr;
  int64_t rows = (int64_t)p.batch * p.heads * p.length;
  run_grid(attention_2d_delta_kernel<T>, EDim3{(unsigned)((rows + 255) / 256), 1, 1}, 256, p);
  using SKV = BwdSmem<T, D, true>;
  run_grid(attention_2d_bwd_dkdv_kernel<T, D>, EDim3{(unsigned)((p.length + SKV::BN - 1) / SKV::BN), (unsigned)p.heads, (unsigned)p.batch}, Tiles<T, D>::kThreads, p);
  using SQ = BwdSmem<T, D, false>;
  run_grid(attention_2d_bwd_dq_kernel<T, D>, EDim3{(unsigned)((p.length + SQ::BM - 1) / SQ::BM), (unsigned)p.heads, (unsigned)p.batch}, Tiles<T, D>::kThreads, p);
  return {out, lse, dq, dk, dv, dbh.defined() ? dbh : at::empty({0}), dbw.defined() ? dbw : at::empty({0})};
}

template <class T>
std::vector<at::Tensor> run_t(at::Tensor q, at::Tensor k, at::Tensor v, c10::optional<at::Tensor> bh, c10::optional<at::Tensor> bw, int64_t H, int64_t W, double scale, at::Tensor dout) {
  at::Tensor h = bh.has_value() ? *bh : at::Tensor(), w = bw.has_value() ? *bw : at::Tensor();
  switch (pad(q.size(3), v.size(3))) {
    case 16: return run<T, 16>(q, k, v, h, w, H, W, scale, dout);
    case 32: return run<T, 32>(q, k, v, h, w, H, W, scale, dout);
    case 64: return run<T, 64>(q, k, v, h, w, H, W, scale, dout);
    default: return run<T, 128>(q, k, v, h, w, H, W, scale, dout);
  }
}
std::vector<at::Tensor> emu(at::Tensor q, at::Tensor k, at::Tensor v, c10::optional<at::Tensor> bh, c10::optional<at::Tensor> bw, int64_t H, int64_t W, double scale, at::Tensor dout) {
  if (q.scalar_type() == at::kDouble) return run_t<double>(q, k, v, bh, bw, H, W, scale, dout);
  if (q.scalar_type() == at::kFloat) return run_t<float>(q, k, v, bh, bw, H, W, scale, dout);
  if (q.scalar_type() == at::kHalf) return run_t<__half>(q, k, v, bh, bw, H, W, scale, dout);
  return run_t<__nv_bfloat16>(q, k, v, bh, bw, H, W, scale, dout);
}
// Returns out, lse, dq, dk, dv, dbias_h, dbias_w (bias grads in the accumulator dtype, full size).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_backward", &emu);
}
