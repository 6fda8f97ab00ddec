// CUDA implementations of fdiv_kernels_C::forward / fdiv_kernels_C::backward (schemas in ops.cpp), the kernel
// contract of docs/architecture.md. The divergence math and the per-pair head come from fdpo_math.h, shared with
// the CPU kernels.
//
// Forward: ONE kernel (plus a 4-byte cudaMemsetAsync of its block counter when the grid has more than one block).
//   * Grid = B pairs x C chunks of D, 1-D (block b: pair b / C, chunk b % C). C is chosen so that B*C fills
//     kFwdWaves waves of resident blocks (SM count x occupancy, read from the device and the kernel, cached), so
//     few long rows (video: 2B = 4) still use every SM; chunks are multiples of the vector width and no chunk is
//     shorter than one sweep of the block (256 threads x one vector).
//   * Each block reads the winner and the loser rows of its pair over its chunk, the shared [B, D] target (and
//     mask) row once, with 16-byte vector loads when every base pointer is 16-byte aligned and D is a multiple
//     of the vector width (else a scalar path), and accumulates in fp32 per row. Mixed storage dtypes (an fp32
//     model_pred beside a 16-bit target and reference, fdpo::mixed_storage_switch) take the same kernel with a
//     storage type per tensor and 8 elements per vector; other mixes a generic scalar kernel.
//       S = sum m (pred - t)^2,  R = sum m (ref - t)^2,  Q = sum m (ref - pred)(ref + pred - 2t),  M = sum m,
//     and with cross_term (never with a mask; the CROSS variants, compiled apart so that the default ones carry no
//     extra register) X = sum (pred_w - t_w)(pred_l - t_l), the pair's cross term (a shared target read once).
//     A warp-shuffle + shared-memory reduction in a fixed order gives the block's partials, written to a
//     workspace.
//   * Last-block-done: __threadfence + atomicAdd on a per-call int counter; the block that sees count == grid-1
//     combines the chunk partials of every pair in a FIXED order (fixed thread-to-chunk mapping, xor-shuffle
//     trees), runs fdpo_pair_head<float> per pair and reduces the per-pair losses (and cross terms) in a fixed
//     order. No float atomics anywhere: same inputs, same device, same bits.
//   Counter choice: the workspace (partials + counter) is allocated per call from PyTorch's caching allocator on
//   the current stream and only its 4-byte counter is zeroed by cudaMemsetAsync on that stream. This is safe
//   under any number of concurrent streams, graphs replayed on several streams and torch.compile's cudagraph
//   trees (no state shared between calls), costs one memset node, and needs no host sync, so the call is CUDA-
//   graph capturable (the allocation comes from the graph's pool during capture). A grid of one block needs no
//   counter and skips the memset.
//
// Backward: ONE elementwise kernel over (chunk, row), rows fastest (a shared target row is read from DRAM once):
// grad = grad_coef[row] * G[pair] * m * (pred - target), in model_pred's dtype; 16-byte loads and stores (8
// bf16/fp16 or 4 fp32, 8 per vector for the mixed-dtype variants) when aligned, 4 vectors of model_pred in
// flight per thread, scalar path otherwise. G (0-dim for mean/sum, [B] for reduction none) is read on the device.
//
// All offsets are int64 (tensors over 2^31 elements work); the current CUDA stream and device are used, every
// launch is checked, nothing synchronizes with the host. Inputs are fp32/fp16/bf16 (fp64 is rejected: it runs on
// backend="cpu" or "torch").

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>

#include "fdpo_math.h"
#include "fdpo_op.h"
#include "static_switch.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kNQ = 8;        // partials per pair and chunk: S_w R_w Q_w M_w S_l R_l Q_l M_l (then X with CROSS)
constexpr int kBwdIters = 4;  // vectors in flight per thread in the backward
constexpr int kPairSums = 4;  // per-pair values the tail reduces: loss, win, e_w + e_l, eref_w + eref_l (then X)

// Partials per pair and chunk, and per-pair sums of the tail, of a forward variant: one more of each with CROSS.
__host__ __device__ constexpr int fwd_nq(bool cross) { return cross ? kNQ + 1 : kNQ; }
__host__ __device__ constexpr int fwd_pair_sums(bool cross) { return cross ? kPairSums + 1 : kPairSums; }

template <typename T>
__host__ __device__ __forceinline__ T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// VEC elements of T, 16 bytes when VEC * sizeof(T) == 16: one LDG.128 / STG.128.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* __restrict__ p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

// One 16-byte pack as a single streaming store (STG.E.EF.128: evict-first, the gradient is not read again by this
// kernel). A plain struct store compiled to one 32-bit plus six 16-bit stores (cuobjdump), ~2.5x the L2 write
// requests. Packs of other sizes (the scalar path) keep a plain store.
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* __restrict__ p, const Pack<T, VEC>& v) {
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&v));
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(p) = v;
  }
}

// N consecutive elements of T held as raw packs (converted element by element when read): 16-byte packs when
// N * sizeof(T) >= 16 (8 fp32 = two LDG.128, 8 bf16/fp16 = one), else one narrower pack (the scalar path, N = 1).
// The same loop then serves same-dtype tensors (N = 16 / sizeof(T)) and mixed ones (N = 8: fp32 beside 16-bit).
template <typename T, int N>
struct Vec {
  static constexpr int kPackElems = N * static_cast<int>(sizeof(T)) > 16 ? 16 / static_cast<int>(sizeof(T)) : N;
  static constexpr int kPacks = N / kPackElems;
  Pack<T, kPackElems> p[kPacks];
  __device__ __forceinline__ float operator[](int k) const {
    return static_cast<float>(p[k / kPackElems].v[k % kPackElems]);
  }
  __device__ __forceinline__ void set(int k, float x) { p[k / kPackElems].v[k % kPackElems] = static_cast<T>(x); }
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* __restrict__ p) {
  using V = Vec<T, N>;
  V r;
#pragma unroll
  for (int i = 0; i < V::kPacks; ++i) r.p[i] = load_pack<T, V::kPackElems>(p + i * V::kPackElems);
  return r;
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const Vec<T, N>& v) {
  using V = Vec<T, N>;
#pragma unroll
  for (int i = 0; i < V::kPacks; ++i) store_pack<T, V::kPackElems>(p + i * V::kPackElems, v.p[i]);
}

// Vectors in flight per thread in the backward: kBwdIters 16-byte vectors of model_pred (the scalar path: kBwdIters
// elements), so a mixed kernel (8 fp32 elements per vector) makes 2 iterations of 2 vectors. Host and device.
template <typename TP, int VEC>
constexpr int bwd_iters() {
  return VEC == 1 ? kBwdIters : (kBwdIters * 16 / static_cast<int>(sizeof(TP)) + VEC - 1) / VEC;
}

__device__ __forceinline__ float warp_sum(float v) {  // result in lane 0; fixed order
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Block-wide sum of N values per thread; the totals land in thread 0. Fixed order (deterministic).
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* smem /* [N * kWarps] */) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) smem[k * kWarps + warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = warp_sum(lane < kWarps ? smem[k * kWarps + lane] : 0.0f);
  }
  __syncthreads();  // smem may be reused by the caller
}

struct FwdArgs {
  const void* pred;
  const void* ref;     // nullptr: ref_err path
  const void* target;  // [2B, D] or [B, D]
  const void* mask;    // nullptr: no mask
  const float* ref_err;
  const float* pair_weight;
  int64_t D, B;
  int64_t chunks, chunk_len;
  bool interleaved, target_shared, mask_shared;
  int err_reduction;                                    // fdpo::ErrReduction
  int pred_dtype, ref_dtype, target_dtype, mask_dtype;  // fdpo::InputDtype, read by the mixed-dtype kernels
  float inv_d;                                          // 1/D (0 if D == 0)
  fdpo::HeadParams hp;
  float* loss;       // [] or [B]
  float* logits;     // [B]
  float* stats;      // [4, 2B]
  float* summary;    // [kSummaryLen]: implicit_acc, mean e, mean e_ref, X (0 unless cross_term)
  float* coef;       // [2B]
  float* partials;   // [B * chunks * NQ], NQ = fwd_nq(cross_term)
  float* combined;   // [B * NQ]
  float* pair_sums;  // [fwd_pair_sums(cross_term) * B]: per-pair loss, win, e_w + e_l, eref_w + eref_l (, X)
  bool strict_ties;
  unsigned int* counter;  // nullptr when the grid is one block
};

// The last block: combine chunk partials (fixed order), per-pair head, fixed-order loss reduction.
template <bool HAS_REF, bool HAS_MASK, bool CROSS>
__device__ void forward_tail(const FwdArgs& a, float* smem) {
  constexpr int NQ = fwd_nq(CROSS), NS = fwd_pair_sums(CROSS);
  const int64_t B = a.B, C = a.chunks;
  // 1. combined[p*NQ+q] = sum_c partials[(p*C+c)*NQ+q]: groups of L lanes (a power of two <= 32) per (pair, q),
  //    lane li of a group sums chunks li, li+L, ... in order, then an xor tree inside the group. The loop bounds
  //    are uniform across the block so every lane reaches every shuffle.
  const int64_t ncomb = B * NQ;
  int L = 32;  // the largest power of two with ncomb * L <= kThreads: 32 lanes per sum for B = 1, 1 for B >= 32
  while (L > 1 && ncomb * L > kThreads) L >>= 1;
  const int groups = kThreads / L;
  const int g = threadIdx.x / L, li = threadIdx.x % L;
  for (int64_t base = 0; base < ncomb; base += groups) {
    const int64_t k = base + g;
    float v = 0.0f;
    if (k < ncomb) {
      const int64_t p = k / NQ, q = k % NQ;
      const float* src = a.partials + p * C * NQ + q;
      // Four independent accumulators (four L2 loads in flight per lane, not one dependent chain), summed in a
      // fixed order: the same bits every run.
      float v0 = 0.0f, v1 = 0.0f, v2 = 0.0f, v3 = 0.0f;
      int64_t c = li;
      for (; c + 3 * L < C; c += 4 * L) {
        v0 += __ldcg(src + c * NQ);
        v1 += __ldcg(src + (c + L) * NQ);
        v2 += __ldcg(src + (c + 2 * L) * NQ);
        v3 += __ldcg(src + (c + 3 * L) * NQ);
      }
      for (; c < C; c += L) v0 += __ldcg(src + c * NQ);
      v = (v0 + v1) + (v2 + v3);
    }
    for (int m = L / 2; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    if (k < ncomb && li == 0) a.combined[k] = v;
  }
  __syncthreads();

  // 2. per-pair head, one thread per pair (the epilogue shared with the CPU kernels, fdpo_math.h).
  const fdpo::PairOutputs<float> out{a.loss, a.logits, a.stats, a.coef};
  for (int64_t p = threadIdx.x; p < B; p += kThreads) {
    const float* v = a.combined + p * NQ;  // S, R, Q, M of the winner, then of the loser (then X)
    const int64_t rw = fdpo::winner_row(p, B, a.interleaved), rl = fdpo::loser_row(p, B, a.interleaved);
    const auto errors = [&](const float* s, int64_t row) {
      const float scale = fdpo::error_scale(a.err_reduction, HAS_MASK, s[3], a.inv_d);
      return fdpo::sample_errors<float>(s[0], s[1], s[2], scale, HAS_REF, HAS_REF ? 0.0f : a.ref_err[row]);
    };
    const fdpo::SampleErrors<float> ew = errors(v, rw), el = errors(v + 4, rl);
    const float w = a.pair_weight != nullptr ? a.pair_weight[p] : 1.0f;
    const fdpo::PairHead<float> h = fdpo::pair_epilogue<float>(a.hp, p, rw, rl, ew, el, w, out);
    a.pair_sums[p] = h.loss;
    a.pair_sums[B + p] = fdpo::implicit_win(h.logit, a.strict_ties);
    a.pair_sums[2 * B + p] = ew.e + el.e;
    a.pair_sums[3 * B + p] = ew.e_ref + el.e_ref;
    if constexpr (CROSS) a.pair_sums[4 * B + p] = v[kNQ];
  }
  __syncthreads();

  // 3. the reduced loss and the summary statistics, fixed order.
  float s[NS];
#pragma unroll
  for (int k = 0; k < NS; ++k) s[k] = 0.0f;
  for (int64_t p = threadIdx.x; p < B; p += kThreads) {
#pragma unroll
    for (int k = 0; k < NS; ++k) s[k] += a.pair_sums[k * B + p];
  }
  block_sum<NS>(s, smem);
  if (threadIdx.x == 0) fdpo::store_reduced(a.hp, s[0], s[1], s[2], s[3], CROSS ? s[NS - 1] : 0.0f, a.loss, a.summary);
}

// One element of a pair's two rows into the partial sums S, R, Q, M (winner in acc[0..3], loser in acc[4..7];
// with CROSS, X in acc[8]).
template <bool HAS_REF, bool HAS_MASK, bool CROSS>
__device__ __forceinline__ void accumulate_element(float (&acc)[fwd_nq(CROSS)], float pw_, float pl_, float tw_,
                                                   float tl_, float qw_, float ql_, float mw_, float ml_) {
  static_assert(!(CROSS && HAS_MASK), "the cross term is defined without a mask");
  const float rw_ = pw_ - tw_, rl_ = pl_ - tl_;
  if constexpr (CROSS) acc[kNQ] += rw_ * rl_;
  acc[0] += mw_ * (rw_ * rw_);
  acc[4] += ml_ * (rl_ * rl_);
  if (HAS_REF) {
    const float sw = qw_ - tw_, sl = ql_ - tl_;
    acc[1] += mw_ * (sw * sw);
    acc[5] += ml_ * (sl * sl);
    // e_ref - e accumulated directly: (ref - pred) * (ref + pred - 2 t), no cancellation of two sums.
    acc[2] += mw_ * ((qw_ - pw_) * (qw_ + pw_ - 2.0f * tw_));
    acc[6] += ml_ * ((ql_ - pl_) * (ql_ + pl_ - 2.0f * tl_));
  }
  if (HAS_MASK) {
    acc[3] += mw_;
    acc[7] += ml_;
  }
}

// The block's partials to the workspace; the last block to finish runs the tail (last-block-done, see the top).
template <bool HAS_REF, bool HAS_MASK, bool CROSS>
__device__ __forceinline__ void finish_forward_block(const FwdArgs& a, float (&acc)[fwd_nq(CROSS)], float* smem) {
  constexpr int NQ = fwd_nq(CROSS);
  __shared__ bool is_last;
  block_sum<NQ>(acc, smem);
  if (threadIdx.x == 0) {
    float* dst = a.partials + static_cast<int64_t>(blockIdx.x) * NQ;
#pragma unroll
    for (int k = 0; k < NQ; ++k) dst[k] = acc[k];
    if (a.counter == nullptr) {
      is_last = true;
    } else {
      __threadfence();  // publish the partials before counting this block as done
      const unsigned int done = atomicAdd(a.counter, 1u);
      is_last = (done == gridDim.x - 1);
    }
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();  // acquire: every other block's partials are visible (read with __ldcg, bypassing L1)
  forward_tail<HAS_REF, HAS_MASK, CROSS>(a, smem);
}

// Element i of an input stored as `dtype` (fdpo::InputDtype), as float.
__device__ __forceinline__ float load_as_float(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case fdpo::kInF32:
      return static_cast<const float*>(base)[i];
    case fdpo::kInF16:
      return static_cast<float>(static_cast<const at::Half*>(base)[i]);
    default:
      return static_cast<float>(static_cast<const at::BFloat16*>(base)[i]);
  }
}

// What one forward block reads: the element offsets of its pair's rows (winner w, loser l; their target and mask
// rows, shared by the pair or not) and its chunk [start, end) of D.
struct BlockRows {
  int64_t w, l, tw, tl, mw, ml, start, end;
};

__device__ __forceinline__ BlockRows block_rows(const FwdArgs& a) {
  const int64_t bid = blockIdx.x;
  const int64_t pair = bid / a.chunks, chunk = bid - pair * a.chunks;
  const int64_t rw = fdpo::winner_row(pair, a.B, a.interleaved), rl = fdpo::loser_row(pair, a.B, a.interleaved);
  const int64_t start = chunk * a.chunk_len;
  return {rw * a.D,
          rl * a.D,
          (a.target_shared ? pair : rw) * a.D,
          (a.target_shared ? pair : rl) * a.D,
          (a.mask_shared ? pair : rw) * a.D,
          (a.mask_shared ? pair : rl) * a.D,
          start,
          start + a.chunk_len < a.D ? start + a.chunk_len : a.D};
}

// TP, TR, TT, TM: the storage types of model_pred, ref_pred, target and mask (all T for a same-dtype call; an fp32
// model_pred beside a 16-bit target and reference under mixed precision); VEC elements per row per thread and
// iteration, read as 16-byte packs (Vec); the arithmetic is fp32 whatever the storage.
// Resident blocks per SM the forward's register budget keeps: 3, or 2 for a masked mix loading 10 or more 16-byte
// vectors per iteration (fp32 pred with a 16-bit target and mask: 40+ data registers), where the 80 registers of 3
// blocks left a load waiting for an earlier load's registers (SASS on sm_90 and sm_100; the unmasked 10-vector
// mix keeps all its loads in flight at 3); 2 x 256 threads x 160 B is still ~2x what an SM needs in flight.
template <typename TP, typename TR, typename TT, typename TM, int VEC, bool HAS_REF, bool HAS_MASK>
constexpr int fwd_min_blocks() {
  const int bytes = VEC * (2 * static_cast<int>(sizeof(TP) + sizeof(TT)) + (HAS_REF ? 2 * sizeof(TR) : 0) +
                           (HAS_MASK ? 2 * sizeof(TM) : 0));
  return HAS_MASK && bytes >= 10 * 16 ? 2 : 3;
}

// CROSS: also the pair's cross term X (cross_term; never with a mask).
template <typename TP, typename TR, typename TT, typename TM, int VEC, bool HAS_REF, bool HAS_MASK, bool CROSS>
__global__ void __launch_bounds__(kThreads, (fwd_min_blocks<TP, TR, TT, TM, VEC, HAS_REF, HAS_MASK>()))
    fdpo_forward_kernel(const FwdArgs a) {
  constexpr int NQ = fwd_nq(CROSS);
  __shared__ float smem[NQ * kWarps];
  const BlockRows r = block_rows(a);
  const TP* __restrict__ pred = static_cast<const TP*>(a.pred);
  const TR* __restrict__ ref = static_cast<const TR*>(a.ref);
  const TT* __restrict__ tgt = static_cast<const TT*>(a.target);
  const TM* __restrict__ msk = static_cast<const TM*>(a.mask);
  const TP* pw = pred + r.w;
  const TP* pl = pred + r.l;
  const TR* qw = HAS_REF ? ref + r.w : nullptr;
  const TR* ql = HAS_REF ? ref + r.l : nullptr;
  const TT* tw = tgt + r.tw;
  const TT* tl = tgt + r.tl;
  const TM* mw = HAS_MASK ? msk + r.mw : nullptr;
  const TM* ml = HAS_MASK ? msk + r.ml : nullptr;

  float acc[NQ];
#pragma unroll
  for (int k = 0; k < NQ; ++k) acc[k] = 0.0f;

  const int64_t start = r.start, end = r.end;
  // No unrolling: each iteration already has 4-10 independent 16-byte loads in flight per thread, and unrolled
  // copies push the register count over the 3-4 resident blocks per SM the launch bounds ask for.
#pragma unroll 1
  for (int64_t j = start + static_cast<int64_t>(threadIdx.x) * VEC; j < end; j += kThreads * VEC) {
    // Raw packs stay in registers (4 per 16 bytes) and are widened to fp32 element by element below.
    const Vec<TP, VEC> xw = load_vec<TP, VEC>(pw + j), xl = load_vec<TP, VEC>(pl + j);
    const Vec<TT, VEC> zw = load_vec<TT, VEC>(tw + j);
    const Vec<TT, VEC> zl = a.target_shared ? zw : load_vec<TT, VEC>(tl + j);
    Vec<TR, VEC> yw, yl;
    Vec<TM, VEC> uw, ul;
    if (HAS_REF) {
      yw = load_vec<TR, VEC>(qw + j);
      yl = load_vec<TR, VEC>(ql + j);
    }
    if (HAS_MASK) {
      uw = load_vec<TM, VEC>(mw + j);
      ul = a.mask_shared ? uw : load_vec<TM, VEC>(ml + j);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      accumulate_element<HAS_REF, HAS_MASK, CROSS>(acc, xw[k], xl[k], zw[k], zl[k], HAS_REF ? yw[k] : 0.0f,
                                                   HAS_REF ? yl[k] : 0.0f, HAS_MASK ? uw[k] : 1.0f,
                                                   HAS_MASK ? ul[k] : 1.0f);
    }
  }
  finish_forward_block<HAS_REF, HAS_MASK, CROSS>(a, acc, smem);
}

// Any other mix of input dtypes (or misaligned / D % 8 != 0 mixed inputs): each element read in its own dtype (a
// uniform switch per load), fp32 arithmetic as above, no cast copies. One element per thread per step, a scalar loop
// (~90 instructions per 16 B): the combinations trainers pass take fdpo_forward_kernel instead (mixed_storage_switch).
template <bool HAS_REF, bool HAS_MASK, bool CROSS>
__global__ void __launch_bounds__(kThreads, 3) fdpo_forward_mixed_kernel(const FwdArgs a) {
  constexpr int NQ = fwd_nq(CROSS);
  __shared__ float smem[NQ * kWarps];
  const BlockRows r = block_rows(a);
  float acc[NQ];
#pragma unroll
  for (int k = 0; k < NQ; ++k) acc[k] = 0.0f;
#pragma unroll 1
  for (int64_t j = r.start + threadIdx.x; j < r.end; j += kThreads) {
    const float t_w = load_as_float(a.target, a.target_dtype, r.tw + j);
    accumulate_element<HAS_REF, HAS_MASK, CROSS>(
        acc, load_as_float(a.pred, a.pred_dtype, r.w + j), load_as_float(a.pred, a.pred_dtype, r.l + j), t_w,
        a.target_shared ? t_w : load_as_float(a.target, a.target_dtype, r.tl + j),
        HAS_REF ? load_as_float(a.ref, a.ref_dtype, r.w + j) : 0.0f,
        HAS_REF ? load_as_float(a.ref, a.ref_dtype, r.l + j) : 0.0f,
        HAS_MASK ? load_as_float(a.mask, a.mask_dtype, r.mw + j) : 1.0f,
        HAS_MASK ? load_as_float(a.mask, a.mask_dtype, r.ml + j) : 1.0f);
  }
  finish_forward_block<HAS_REF, HAS_MASK, CROSS>(a, acc, smem);
}

struct BwdArgs {
  const void* pred;
  const void* target;
  const void* mask;
  const float* coef;  // [2B]
  const float* g;     // [] or [B]
  void* grad;
  int64_t D, B;
  int64_t chunks, chunk_len;
  bool g_per_pair, interleaved, target_shared, mask_shared;
  int target_dtype, mask_dtype;  // fdpo::InputDtype, read by the mixed-dtype kernel
};

// The block's row and chunk, rows fastest: the 2B rows of one chunk run side by side, so the winner and the loser
// reading one row of a shared [B, D] target (or mask) do so within one wave and the second read hits L2 (chunk-
// fastest order put them B * chunks blocks apart: on large shapes a second DRAM read, +20 % bytes).
struct BwdBlock {
  int64_t row, chunk, pair;
};

__device__ __forceinline__ BwdBlock bwd_block(const BwdArgs& a) {
  const int64_t bid = blockIdx.x, rows = 2 * a.B;
  const int64_t chunk = bid / rows, row = bid - chunk * rows;
  return {row, chunk, fdpo::pair_of_row(row, a.B, a.interleaved)};
}

// TP, TT, TM: the storage types of model_pred (and of the gradient), target and mask; VEC elements per thread and
// iteration as 16-byte packs (Vec), bwd_iters<TP, VEC>() iterations per thread, every load issued before any math.
template <typename TP, typename TT, typename TM, int VEC, bool HAS_MASK>
__global__ void __launch_bounds__(kThreads) fdpo_backward_kernel(const BwdArgs a) {
  constexpr int kIters = bwd_iters<TP, VEC>();
  const BwdBlock blk = bwd_block(a);
  const int64_t D = a.D;
  const TP* __restrict__ pr = static_cast<const TP*>(a.pred) + blk.row * D;
  const TT* __restrict__ tg = static_cast<const TT*>(a.target) + (a.target_shared ? blk.pair : blk.row) * D;
  const TM* __restrict__ mk =
      HAS_MASK ? static_cast<const TM*>(a.mask) + (a.mask_shared ? blk.pair : blk.row) * D : nullptr;
  TP* __restrict__ out = static_cast<TP*>(a.grad) + blk.row * D;
  // mul0 semantics (see fdpo_math.h): an overflowed +-inf coefficient times a zero upstream gradient, a zero
  // residual or a zero mask is 0, not NaN. One compare-select per element: free in a bandwidth-bound pass.
  const float c = fdpo::mul0(a.coef[blk.row], a.g[a.g_per_pair ? blk.pair : 0]);

  const int64_t start = blk.chunk * a.chunk_len;
  const int64_t end = start + a.chunk_len < D ? start + a.chunk_len : D;
  Vec<TP, VEC> x[kIters];
  Vec<TT, VEC> t[kIters];
  Vec<TM, VEC> m[kIters];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t j = start + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * VEC;
    if (j < end) {
      x[it] = load_vec<TP, VEC>(pr + j);
      t[it] = load_vec<TT, VEC>(tg + j);
      if (HAS_MASK) m[it] = load_vec<TM, VEC>(mk + j);
    }
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t j = start + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * VEC;
    if (j < end) {
      Vec<TP, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float v = fdpo::mul0(c, x[it][k] - t[it][k]);
        if (HAS_MASK) v = fdpo::mul0(v, m[it][k]);
        o.set(k, v);
      }
      store_vec<TP, VEC>(out + j, o);
    }
  }
}

// Any other mix of input dtypes: target and mask read in their own dtypes, fp32 arithmetic, the gradient in
// model_pred's T; one element per thread per step.
template <typename T, bool HAS_MASK>
__global__ void __launch_bounds__(kThreads) fdpo_backward_mixed_kernel(const BwdArgs a) {
  const BwdBlock blk = bwd_block(a);
  const int64_t D = a.D;
  const T* __restrict__ pr = static_cast<const T*>(a.pred) + blk.row * D;
  const int64_t t_off = (a.target_shared ? blk.pair : blk.row) * D, m_off = (a.mask_shared ? blk.pair : blk.row) * D;
  T* __restrict__ out = static_cast<T*>(a.grad) + blk.row * D;
  const float c = fdpo::mul0(a.coef[blk.row], a.g[a.g_per_pair ? blk.pair : 0]);
  const int64_t start = blk.chunk * a.chunk_len;
  const int64_t end = start + a.chunk_len < D ? start + a.chunk_len : D;
  for (int64_t j = start + threadIdx.x; j < end; j += kThreads) {
    float v = fdpo::mul0(c, static_cast<float>(pr[j]) - load_as_float(a.target, a.target_dtype, t_off + j));
    if (HAS_MASK) v = fdpo::mul0(v, load_as_float(a.mask, a.mask_dtype, m_off + j));
    out[j] = static_cast<T>(v);
  }
}

// ---------------------------------------------------------------------------------------------------- host

// Resident blocks per SM of a kernel on a device, cached (cudaOccupancy... is a host-side query, no sync).
int blocks_per_sm(const void* kernel, int device) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(kernel, device);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
  if (n < 1) n = 1;
  cache.emplace(key, n);
  return n;
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

using FwdKernel = void (*)(FwdArgs);
using BwdKernel = void (*)(BwdArgs);

// Waves of resident blocks the forward grid is cut into: several shorter blocks rather than one wave of long ones,
// so a grid that loses SMs to another stream (NCCL, MPS) adds a quarter wave, not a second full one. The chunk
// partials this adds (a few thousand floats on the largest shapes) cost the last block's combine little.
constexpr int64_t kFwdWaves = 4;

// `vec`: the kernel's elements per thread and iteration (chunks are multiples of it, so every vector is aligned).
void launch_forward(FwdKernel kernel, int64_t vec, FwdArgs a, const at::TensorOptions& opts, int device,
                    cudaStream_t stream) {
  const int64_t sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  const int64_t wave = sms * blocks_per_sm(reinterpret_cast<const void*>(kernel), device);
  const int64_t sweep = static_cast<int64_t>(kThreads) * vec;  // no chunk shorter than one sweep of the block
  const int64_t max_chunks = a.D > 0 ? ceil_div(a.D, sweep) : 1;
  int64_t chunks = kFwdWaves * wave / a.B;
  chunks = chunks < 1 ? 1 : (chunks > max_chunks ? max_chunks : chunks);
  // Rounded to the vector width only (not to whole sweeps, which cut e.g. flux's wanted 99 chunks to 64).
  int64_t chunk_len = a.D > 0 ? ceil_div(ceil_div(a.D, chunks), vec) * vec : vec;
  chunks = a.D > 0 ? ceil_div(a.D, chunk_len) : 1;
  a.chunks = chunks;
  a.chunk_len = chunk_len;
  const int64_t nblocks = a.B * chunks;
  TORCH_CHECK(nblocks <= INT32_MAX, "fdiv_kernels cuda forward: too many pairs (", a.B, ")");

  // Workspace: partials, combined sums, per-pair sums, then the 4-byte counter. The counter is zeroed by a memset
  // node: the workspace is fresh per call (caching allocator), and a persistent self-resetting counter would be
  // state shared between concurrent streams and CUDA-graph replays.
  const int64_t nq = fwd_nq(a.hp.cross_term), nsums = fwd_pair_sums(a.hp.cross_term);
  const int64_t nfloat = nblocks * nq + a.B * nq + nsums * a.B;
  at::Tensor ws = at::empty({nfloat * 4 + 16}, opts.dtype(at::kByte));
  float* base = reinterpret_cast<float*>(ws.data_ptr());
  a.partials = base;
  a.combined = base + nblocks * nq;
  a.pair_sums = a.combined + a.B * nq;
  a.counter = nullptr;
  if (nblocks > 1) {
    a.counter = reinterpret_cast<unsigned int*>(base + nfloat);
    C10_CUDA_CHECK(cudaMemsetAsync(a.counter, 0, sizeof(unsigned int), stream));
  }
  kernel<<<static_cast<unsigned int>(nblocks), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// f(mask, cross) as compile-time bools: the cross-term variants exist without a mask only (fdpo::check_cross_term
// refuses the other case before any launch).
template <typename F>
void mask_cross_switch(bool has_mask, bool cross, F&& f) {
  if (has_mask)
    f(std::true_type{}, std::false_type{});
  else
    fdpo::bool_switch(cross, [&](auto c) { f(std::false_type{}, c); });
}

// The vectorized forward for storage types (TP, TR, TT), the mask (if any) stored as TT; without ref_pred TR is
// TP (not read), so the ref_err kernels of two mixes are one instantiation.
template <typename TP, typename TR, typename TT, int VEC>
void dispatch_forward(const FwdArgs& a, bool has_ref, bool has_mask, const at::TensorOptions& opts, int device,
                      cudaStream_t stream) {
  fdpo::bool_switch(has_ref, [&](auto ref) {
    mask_cross_switch(has_mask, a.hp.cross_term, [&](auto masked, auto cross) {
      constexpr bool kRef = decltype(ref)::value, kMask = decltype(masked)::value, kCross = decltype(cross)::value;
      using TRk = std::conditional_t<kRef, TR, TP>;
      launch_forward(fdpo_forward_kernel<TP, TRk, TT, TT, VEC, kRef, kMask, kCross>, VEC, a, opts, device, stream);
    });
  });
}

void dispatch_forward_generic(const FwdArgs& a, bool has_ref, bool has_mask, const at::TensorOptions& opts, int device,
                              cudaStream_t stream) {
  fdpo::bool_switch(has_ref, [&](auto ref) {
    mask_cross_switch(has_mask, a.hp.cross_term, [&](auto masked, auto cross) {
      launch_forward(fdpo_forward_mixed_kernel<decltype(ref)::value, decltype(masked)::value, decltype(cross)::value>,
                     1, a, opts, device, stream);
    });
  });
}

// `chunk_len`: elements per block (the kernel's threads x vector width x iterations).
void launch_backward(BwdKernel kernel, int64_t chunk_len, BwdArgs a, int64_t rows, cudaStream_t stream) {
  a.chunk_len = chunk_len;
  a.chunks = a.D > 0 ? ceil_div(a.D, chunk_len) : 0;
  const int64_t nblocks = rows * a.chunks;
  if (nblocks == 0) return;
  TORCH_CHECK(nblocks <= INT32_MAX, "fdiv_kernels cuda backward: tensor too large (", nblocks, " blocks)");
  kernel<<<static_cast<unsigned int>(nblocks), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The vectorized backward for storage types (TP, TT), the mask (if any) stored as TT.
template <typename TP, typename TT, int VEC>
void dispatch_backward(const BwdArgs& a, bool has_mask, int64_t rows, cudaStream_t stream) {
  fdpo::bool_switch(has_mask, [&](auto masked) {
    launch_backward(fdpo_backward_kernel<TP, TT, TT, VEC, decltype(masked)::value>,
                    static_cast<int64_t>(kThreads) * VEC * bwd_iters<TP, VEC>(), a, rows, stream);
  });
}

template <typename T>
void dispatch_backward_generic(const BwdArgs& a, bool has_mask, int64_t rows, cudaStream_t stream) {
  fdpo::bool_switch(has_mask, [&](auto masked) {
    launch_backward(fdpo_backward_mixed_kernel<T, decltype(masked)::value>, static_cast<int64_t>(kThreads) * kBwdIters,
                    a, rows, stream);
  });
}

fdpo::ForwardOutputs fdpo_forward_cuda(const at::Tensor& model_pred, const std::optional<at::Tensor>& ref_pred,
                                       const at::Tensor& target, const std::optional<at::Tensor>& ref_err,
                                       const std::optional<at::Tensor>& mask,
                                       const std::optional<at::Tensor>& pair_weight, c10::ArrayRef<double> fparams,
                                       c10::ArrayRef<int64_t> iparams) {
  TORCH_CHECK(model_pred.is_cuda(), "fdiv_kernels (cuda): model_pred must be a CUDA tensor");
  fdpo::check_reference("cuda", ref_pred.has_value(), ref_err.has_value());
  const fdpo::RowViews v = fdpo::row_views("cuda", /*allow_double=*/false, model_pred, ref_pred, target, mask);
  const int64_t rows = 2 * v.B, D = v.D, B = v.B;
  const fdpo::HeadParams hp = fdpo::head_params("cuda", fparams, iparams, B);
  fdpo::check_cross_term("cuda", hp, v.mask.defined());

  const c10::cuda::CUDAGuard guard(model_pred.device());
  const int device = model_pred.get_device();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device).stream();
  const auto fopts = model_pred.options().dtype(at::kFloat);

  at::Tensor ref_err_f, pair_weight_f;
  if (ref_err) ref_err_f = fdpo::small_vector(*ref_err, model_pred, at::kFloat, rows, "cuda", "ref_err");
  if (pair_weight) pair_weight_f = fdpo::small_vector(*pair_weight, model_pred, at::kFloat, B, "cuda", "pair_weight");

  fdpo::ForwardOutputs out = fdpo::empty_forward_outputs(v.pred, hp.reduction);
  auto& [loss, logits, stats, summary, coef] = out;

  FwdArgs a{};
  a.pred = v.pred.data_ptr();
  a.ref = v.ref.defined() ? v.ref.data_ptr() : nullptr;
  a.target = v.target.data_ptr();
  a.mask = v.mask.defined() ? v.mask.data_ptr() : nullptr;
  a.ref_err = ref_err ? ref_err_f.data_ptr<float>() : nullptr;
  a.pair_weight = pair_weight ? pair_weight_f.data_ptr<float>() : nullptr;
  a.D = D;
  a.B = B;
  a.interleaved = hp.interleaved;
  a.target_shared = v.target_shared;
  a.mask_shared = v.mask_shared;
  a.err_reduction = hp.err_reduction;
  a.strict_ties = hp.strict_ties;
  a.inv_d = D > 0 ? static_cast<float>(1.0 / static_cast<double>(D)) : 0.0f;
  a.hp = hp;
  a.loss = loss.data_ptr<float>();
  a.logits = logits.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  a.summary = summary.data_ptr<float>();
  a.coef = coef.data_ptr<float>();

  const bool has_ref = ref_pred.has_value(), has_mask = mask.has_value();
  a.pred_dtype = fdpo::input_dtype(v.pred);
  a.ref_dtype = has_ref ? fdpo::input_dtype(v.ref) : a.pred_dtype;
  a.target_dtype = fdpo::input_dtype(v.target);
  a.mask_dtype = has_mask ? fdpo::input_dtype(v.mask) : a.pred_dtype;
  const bool same_dtype = a.ref_dtype == a.pred_dtype && a.target_dtype == a.pred_dtype && a.mask_dtype == a.pred_dtype;
  const auto aligned = [&](int64_t vec) {  // the vector path's gate: whole vectors, 16-byte aligned bases
    return D % vec == 0 && aligned16(a.pred) && aligned16(a.ref) && aligned16(a.target) && aligned16(a.mask);
  };
  if (same_dtype) {
    fdpo::storage_switch(model_pred.scalar_type(), "cuda", [&](auto type) {
      using T = typename decltype(type)::type;
      if (aligned(16 / sizeof(T)))
        dispatch_forward<T, T, T, 16 / sizeof(T)>(a, has_ref, has_mask, fopts, device, stream);
      else
        dispatch_forward<T, T, T, 1>(a, has_ref, has_mask, fopts, device, stream);
    });
  } else if (!aligned(fdpo::kMixedVec) ||
             !fdpo::mixed_storage_switch(
                 v.pred.scalar_type(), has_ref ? v.ref.scalar_type() : v.pred.scalar_type(), v.target.scalar_type(),
                 has_mask ? v.mask.scalar_type() : v.target.scalar_type(), [&](auto tp, auto tr, auto tt) {
                   dispatch_forward<typename decltype(tp)::type, typename decltype(tr)::type,
                                    typename decltype(tt)::type, fdpo::kMixedVec>(a, has_ref, has_mask, fopts, device,
                                                                                  stream);
                 })) {
    dispatch_forward_generic(a, has_ref, has_mask, fopts, device, stream);
  }
  return out;
}

at::Tensor fdpo_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& model_pred, const at::Tensor& target,
                              const std::optional<at::Tensor>& mask, const at::Tensor& grad_coef, bool interleaved) {
  TORCH_CHECK(model_pred.is_cuda(), "fdiv_kernels (cuda): model_pred must be a CUDA tensor");
  const fdpo::RowViews v = fdpo::row_views("cuda", /*allow_double=*/false, model_pred, std::nullopt, target, mask);
  const int64_t rows = 2 * v.B, D = v.D, B = v.B;
  TORCH_CHECK(grad_loss.dim() == 0 || (grad_loss.dim() == 1 && grad_loss.size(0) == B),
              "fdiv_kernels (cuda): grad_loss must be 0-dim (mean/sum) or [B] (none); got ", grad_loss.sizes());

  const c10::cuda::CUDAGuard guard(model_pred.device());
  const int device = model_pred.get_device();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device).stream();
  const at::Tensor g = fdpo::small_vector(grad_loss, model_pred, at::kFloat, grad_loss.numel(), "cuda", "grad_loss");
  const at::Tensor coef = fdpo::small_vector(grad_coef, model_pred, at::kFloat, rows, "cuda", "grad_coef");
  at::Tensor grad = at::empty_like(v.pred);

  BwdArgs a{};
  a.pred = v.pred.data_ptr();
  a.target = v.target.data_ptr();
  a.mask = v.mask.defined() ? v.mask.data_ptr() : nullptr;
  a.coef = coef.data_ptr<float>();
  a.g = g.data_ptr<float>();
  a.grad = grad.data_ptr();
  a.D = D;
  a.B = B;
  a.g_per_pair = grad_loss.dim() == 1;
  a.interleaved = interleaved;
  a.target_shared = v.target_shared;
  a.mask_shared = v.mask_shared;

  const bool has_mask = mask.has_value();
  const int pred_dtype = fdpo::input_dtype(v.pred);
  a.target_dtype = fdpo::input_dtype(v.target);
  a.mask_dtype = has_mask ? fdpo::input_dtype(v.mask) : pred_dtype;
  const bool same_dtype = a.target_dtype == pred_dtype && a.mask_dtype == pred_dtype;
  const auto aligned = [&](int64_t vec) {  // the vector path's gate: whole vectors, 16-byte aligned bases
    return D % vec == 0 && aligned16(a.pred) && aligned16(a.target) && aligned16(a.mask) && aligned16(a.grad);
  };
  if (same_dtype) {
    fdpo::storage_switch(model_pred.scalar_type(), "cuda", [&](auto type) {
      using T = typename decltype(type)::type;
      if (aligned(16 / sizeof(T)))
        dispatch_backward<T, T, 16 / sizeof(T)>(a, has_mask, rows, stream);
      else
        dispatch_backward<T, T, 1>(a, has_mask, rows, stream);
    });
  } else if (!aligned(fdpo::kMixedVec) ||
             !fdpo::mixed_storage_switch(
                 v.pred.scalar_type(), v.pred.scalar_type(), v.target.scalar_type(),
                 has_mask ? v.mask.scalar_type() : v.target.scalar_type(), [&](auto tp, auto, auto tt) {
                   dispatch_backward<typename decltype(tp)::type, typename decltype(tt)::type, fdpo::kMixedVec>(
                       a, has_mask, rows, stream);
                 })) {
    fdpo::storage_switch(model_pred.scalar_type(), "cuda", [&](auto type) {
      dispatch_backward_generic<typename decltype(type)::type>(a, has_mask, rows, stream);
    });
  }
  return grad.view(model_pred.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(fdiv_kernels, CUDA, m) {
  m.impl("fdpo_forward", &fdpo_forward_cuda);
  m.impl("fdpo_backward", &fdpo_backward_cuda);
}
