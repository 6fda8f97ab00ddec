// The f-DPO math, once for C++: divergence psi/psi', the stable pair difference and the per-pair head.
// Shared by the CPU kernels (fdpo_cpu.cpp) and the CUDA kernels (fdpo_cuda.cu); the Triton twin lives in
// fdiv_kernels/backends/triton_kernels.py and the PyTorch twin in fdiv_kernels/divergences.py.
// docs/architecture.md states the contract these functions implement. The arithmetic type T is float for
// fp32/fp16/bf16 inputs (every GPU path) and double for float64 inputs (CPU only: gradcheck and the tests).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FDPO_HD __host__ __device__ __forceinline__
#else
#define FDPO_HD inline
#endif

namespace fdpo {

enum Divergence : int { kReverseKL = 0, kForwardKL = 1, kJS = 2, kAlpha = 3, kHellinger = 4 };
enum Reduction : int { kNone = 0, kMean = 1, kSum = 2 };
// Per-sample error: masked mean (sum m r^2 / sum m), sum, or mean over all D elements (sum m r^2 / D).
enum ErrReduction : int { kErrMean = 0, kErrSum = 1, kErrMeanAll = 2 };
// The link from the pair logit z to the pair loss (diffusers' --loss_type): -log sigmoid(z), relu(1 - z), (z - m)^2;
// DMPO (Diffusion-SDPO): KL(p || q) of Bernoulli p = sigmoid(z) and q = 1 - dmpo_alpha; MaPO (reference-free):
// e_w - beta log sigmoid(T (phi(s e_w) - phi(s e_l))), phi(x) = x / (e^x - 1) (mapo_pair_head).
enum LossType : int { kSigmoid = 0, kHinge = 1, kIPO = 2, kDMPO = 3, kMaPO = 4 };

// The op's configuration, parsed once from its packed arguments (fdpo::head_params in fdpo_op.h) and shared by
// the CPU and CUDA kernels.
struct HeadParams {
  double beta;             // Diffusion-DPO beta; d = beta/2 * w * (e_ref - e)
  int divergence;          // Divergence
  double alpha;            // alpha-divergence parameter, 0 < alpha < 1
  double gamma;            // outer scale of the logit
  double label_smoothing;  // eps of conservative DPO
  double logratio_clip;    // c > 0: d -> c*tanh(d/c); <= 0: off
  int reduction;           // Reduction
  int loss_type;           // LossType
  double ipo_margin;       // m = 1 / (2 tau) of loss_type kIPO
  double dmpo_log_q;       // log q of loss_type kDMPO, q = 1 - dmpo_alpha
  double dmpo_log_1mq;     // log(1 - q) of loss_type kDMPO
  double mapo_snr;         // s of loss_type kMaPO
  double mapo_timesteps;   // T of loss_type kMaPO
  int err_reduction;       // ErrReduction
  bool interleaved;        // row layout (spec §1)
  bool strict_ties;        // implicit_acc counts a tie (z == 0) as 0 instead of 1/2
  bool cross_term;         // the forward also reduces X = sum (pred_w - t_w)(pred_l - t_l) into summary[3]
  int64_t num_pairs;       // B
};

// The rows of pair p (spec §1): halves [w_0..w_{B-1}; l_0..l_{B-1}] or interleaved [w0, l0, w1, l1, ...]; and
// the pair of a row, which also indexes a target or mask shared by the pair ([B, D]).
FDPO_HD int64_t winner_row(int64_t p, int64_t B, bool interleaved) { return interleaved ? 2 * p : p; }
FDPO_HD int64_t loser_row(int64_t p, int64_t B, bool interleaved) { return interleaved ? 2 * p + 1 : B + p; }
FDPO_HD int64_t pair_of_row(int64_t row, int64_t B, bool interleaved) {
  return interleaved ? row / 2 : (row < B ? row : row - B);
}

// Overloads that pick the float or double libm function on host and device alike.
FDPO_HD float fexp(float x) { return expf(x); }
FDPO_HD double fexp(double x) { return exp(x); }
FDPO_HD float fexpm1(float x) { return expm1f(x); }
FDPO_HD double fexpm1(double x) { return expm1(x); }
FDPO_HD float flog1p(float x) { return log1pf(x); }
FDPO_HD double flog1p(double x) { return log1p(x); }
FDPO_HD float fabs_(float x) { return fabsf(x); }
FDPO_HD double fabs_(double x) { return fabs(x); }
FDPO_HD float fcopysign(float x, float y) { return copysignf(x, y); }
FDPO_HD double fcopysign(double x, double y) { return copysign(x, y); }

template <typename T>
FDPO_HD T softplus(T x) {  // log(1 + exp(x)) without overflow
  return (x > T(0) ? x : T(0)) + flog1p(fexp(-fabs_(x)));
}

template <typename T>
FDPO_HD T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + fexp(-x));
  const T e = fexp(x);
  return e / (T(1) + e);
}

// a * b, but 0 whenever either factor is 0: a saturated sigmoid times an overflowed exp is 0, not NaN.
template <typename T>
FDPO_HD T mul0(T a, T b) {
  return (a == T(0) || b == T(0)) ? T(0) : a * b;
}

// Exponential family psi(d) = s * (1 - exp(-k d)) (+ a constant for forward KL): the rate k and scale s.
template <typename T>
FDPO_HD void exp_family(int divergence, T alpha, T* k, T* s) {
  if (divergence == kAlpha) {
    *k = alpha;
    *s = T(1) / alpha;
  } else if (divergence == kHellinger) {
    *k = T(0.5);
    *s = T(1);
  } else {  // forward KL
    *k = T(1);
    *s = T(1);
  }
}

// psi(d): the implicit reward f'(exp(d)), in the stable forms of spec §2 (docs/spec.md).
template <typename T>
FDPO_HD T psi(int divergence, T alpha, T d) {
  switch (divergence) {
    case kReverseKL:
      return d;
    case kForwardKL:
      return -fexp(-d);
    case kJS:
      return T(0.693147180559945309417) - softplus(-d);
    case kAlpha:
      return -fexpm1(-alpha * d) / alpha;
    default:
      return -fexpm1(T(-0.5) * d);  // hellinger
  }
}

// psi'(d) * exp(log_scale), the slope of the clipped reward (log_scale = log sech^2 of the clip, 0 without one).
// In the exponential family exp(-k d) overflows (float: from -k d ~ 88) where sech^2 underflows (from |d/c| ~ 44),
// so the product is formed as one exp(log(s k) - k d + log_scale): finite wherever the slope is, and not 0 * inf.
template <typename T>
FDPO_HD T scaled_psi_slope(int divergence, T alpha, T d, T log_scale) {
  switch (divergence) {
    case kReverseKL:
      return fexp(log_scale);
    case kJS:
      return sigmoid(-d) * fexp(log_scale);  // both factors <= 1: no overflow to avoid
    default: {
      T k, s;
      exp_family(divergence, alpha, &k, &s);
      const T log_sk = divergence == kHellinger ? T(-0.693147180559945309417) : T(0);  // s k = 1/2, else 1
      return fexp(log_scale - k * d + log_sk);
    }
  }
}

// psi(d_w) - psi(d_l) without cancellation near 0 and without inf - inf at overflow.
template <typename T>
FDPO_HD T psi_diff(int divergence, T alpha, T d_w, T d_l) {
  switch (divergence) {
    case kReverseKL:
      return d_w - d_l;
    case kJS:
      return softplus(-d_l) - softplus(-d_w);
    default: {
      T k, s;
      exp_family(divergence, alpha, &k, &s);
      // psi_w - psi_l = s * (exp(b) - exp(a)) = -+ s * exp(hi) * expm1(lo - hi), with exp(hi) formed as
      // exp(hi/2)^2 so that the product stays finite wherever it is (a near-tie past exp's range).
      const T a = -k * d_w, b = -k * d_l;
      if (a == b) return T(0);
      const T hi = b > a ? b : a, lo = b > a ? a : b;
      const T half = fexp(T(0.5) * hi);
      const T magnitude = s * (half * (half * fexpm1(lo - hi)));  // <= 0
      return b > a ? -magnitude : magnitude;
    }
  }
}

// Below this |x|, tanh(x) = x to within half an ulp of T (x^2 / 3 < 2^-25 in float, < 2^-54 in double).
FDPO_HD float tanh_is_x_below(float) { return 2.44140625e-4f; }  // 2^-12
FDPO_HD double tanh_is_x_below(double) { return 1e-8; }

// d -> c*tanh(d/c) and the log of its slope, log sech^2(d/c), both accurate to a few ulps for every |x| = |d/c|,
// tiny to huge. With t = exp(-2|x|) in (0, 1]: tanh|x| = -expm1(-2|x|) / (1 + t), which does not cancel for small
// |x| (the (1 - t) / (1 + t) form lost everything below c * 6e-8: d = 0 from c ~ 1e9 in float), and
// log sech^2 = log 4 - 2|x| - 2 log1p(t), finite wherever x is (sech^2 itself underflows from |x| ~ 44 in float,
// while psi' may overflow: scaled_psi_slope multiplies them in log space). Below tanh_is_x_below, d passes
// unchanged (exact also where d/c would be subnormal). Without a clip (c <= 0) the log slope is 0. Twins:
// soft_clip_log_slope in divergences.py, _soft_clip in triton_kernels.py.
template <typename T>
FDPO_HD void soft_clip(T c, T* d, T* log_slope) {
  if (!(c > T(0))) {
    *log_slope = T(0);
    return;
  }
  const T x = *d / c;
  const T ax = fabs_(x);
  const T t = fexp(T(-2) * ax);                                            // in (0, 1]
  *log_slope = T(1.386294361119890618834) - T(2) * ax - T(2) * flog1p(t);  // log 4 - 2|x| - 2 log1p(t)
  if (ax < tanh_is_x_below(ax)) return;                                    // NaN goes on below, and stays NaN
  *d = fcopysign(c * (-fexpm1(T(-2) * ax) / (T(1) + t)), x);
}

// One pair's vote in implicit_acc: z > 0 wins; a tie (z == 0, e.g. policy == reference) counts 1/2 unless strict.
template <typename T>
FDPO_HD T implicit_win(T z, bool strict_ties) {
  return z > T(0) ? T(1) : ((z == T(0) && !strict_ties) ? T(0.5) : T(0));
}

template <typename T>
struct PairHead {
  T d_w, d_l;            // log-ratios after the clip
  T reward_w, reward_l;  // psi(d)
  T logit;               // z
  T loss;                // per-pair loss (before reduction)
  T coef_w, coef_l;      // d(reduced loss)/d e * 2 * inv  (the backward's per-row coefficient)
};

// One row's backward coefficient g * (-+gamma slope) * (beta/2 * w * red * 2) * inv, the product formed in double:
// beta/2 * w alone overflows float (pair_weight 1e35) where the coefficient does not. An infinite g (ipo's 2(z - m)
// once z overflows) times a slope that underflowed at a finite log-ratio (so truly > 0) is infinite, as in the
// reference; mul0's 0 stays for an exactly-0 factor (a saturated sigmoid g = 0 times an overflowed slope).
template <typename T>
FDPO_HD T row_coef(T g, T signed_gamma_slope, bool slope_positive, double outer, T inv) {
  double gs = static_cast<double>(signed_gamma_slope);
  if (gs == 0.0 && slope_positive && g == g && g - g != g - g) gs = fcopysign(1.0, gs);  // g = +-inf: keep the sign
  return static_cast<T>(mul0(mul0(static_cast<double>(g), gs), outer * static_cast<double>(inv)));
}

// phi(x) = x / (e^x - 1) and phi'(x), MaPO's score, to a few ulps in float and double wherever phi is a normal
// number. Below |x| = 0.5 the Bernoulli series to x^14 (remainder < 1e-20 relative): x / expm1(x) is 0/0 at 0 and
// its derivative cancels near 0. Above, for x > 0, x e^(-x/2) e^(-x/2) / (1 - e^-x), which does not overflow where
// e^x does (x > 88.7 in float, where phi is still normal); x / expm1(x) for x < 0; phi' = phi (1 - phi - x) / x,
// which does not cancel there (phi(-x) = phi(x) + x). Twins: _mapo_phi in triton_kernels.py, mapo_phi in
// backends/torch_backend.py (tests/test_heads.py checks the latter against mpmath).
template <typename T>
FDPO_HD void mapo_phi(T x, T* phi, T* slope) {
  if (fabs_(x) < T(0.5)) {  // a NaN x takes the other branch and stays NaN
    const T u = x * x;
    // phi = sum B_n x^n / n!: B_1 = -1/2, then B_2k / (2k)! for k = 1..7; phi' likewise one power lower
    *phi = T(1) - T(0.5) * x +
           u * (T(1) / T(12) +
                u * (T(-1) / T(720) +
                     u * (T(1) / T(30240) +
                          u * (T(-1) / T(1209600) +
                               u * (T(1) / T(47900160) + u * (T(-691) / T(1307674368000.0) + u / T(74724249600.0)))))));
    *slope = T(-0.5) +
             x * (T(1) / T(6) +
                  u * (T(-1) / T(180) +
                       u * (T(1) / T(5040) +
                            u * (T(-1) / T(151200) +
                                 u * (T(1) / T(4790016) + u * (T(-691) / T(108972864000.0) + u / T(5337446400.0)))))));
    return;
  }
  if (x > T(0)) {
    const T h = fexp(T(-0.5) * x);
    *phi = (x * h) * h / -fexpm1(-x);
  } else {
    *phi = x / fexpm1(x);
  }
  *slope = *phi * ((T(1) - *phi - x) / x);
}

// MaPO's head (mapo-t2i/mapo@374b3d3:utils.py:286-301). Reference-free: the caller passes cached reference errors of
// 0 (fdiv_kernels/loss.py), so diff = e_ref - e = -e exactly. Per pair: x = s e, z = T (phi(x_w) - phi(x_l)),
// loss = e_w + beta softplus(-z) (beta itself: MaPO's, not beta/2; pair weights are refused for MaPO);
// dL/de_w = 1 - beta sigmoid(-z) T s phi'(x_w), dL/de_l = beta sigmoid(-z) T s phi'(x_l), times red * 2 * inv.
// In T, not in double as row_coef: beta and beta T s are validated to float's range (_validation._mapo_options),
// so k = beta T s sigmoid(-z) is finite, |phi'| <= 1, and an overflow is a true one; the double products raised
// the CUDA forward kernel's registers (sm_90 ref_err+mask x8: 63 -> 72, 4 -> 3 blocks/SM). Statistics: logratio
// x = s e, reward phi(x).
template <typename T>
FDPO_HD PairHead<T> mapo_pair_head(const HeadParams& p, T diff_w, T diff_l, T inv_w, T inv_l) {
  PairHead<T> h;
  const T e_w = -diff_w, e_l = -diff_l, s = static_cast<T>(p.mapo_snr);
  h.d_w = s * e_w;
  h.d_l = s * e_l;
  T slope_w, slope_l;  // phi'(x)
  mapo_phi(h.d_w, &h.reward_w, &slope_w);
  mapo_phi(h.d_l, &h.reward_l, &slope_l);
  const T z = static_cast<T>(p.mapo_timesteps) * (h.reward_w - h.reward_l);
  h.logit = z;
  h.loss = e_w + static_cast<T>(p.beta) * softplus(-z);
  const T red = (p.reduction == kMean) ? T(1) / static_cast<T>(p.num_pairs) : T(1);
  const T k = sigmoid(-z) * static_cast<T>(p.beta * p.mapo_timesteps * p.mapo_snr);  // beta T s formed in double
  h.coef_w = (T(1) - k * slope_w) * (red * T(2) * inv_w);
  h.coef_l = k * slope_l * (red * T(2) * inv_l);
  return h;
}

// The per-pair head. diff_* = e_ref - e (already scaled by inv), inv_* = 1/D, 1/M or 1, w = pair weight.
template <typename T>
FDPO_HD PairHead<T> fdpo_pair_head(const HeadParams& p, T diff_w, T diff_l, T inv_w, T inv_l, T w) {
  if (p.loss_type == kMaPO) return mapo_pair_head(p, diff_w, diff_l, inv_w, inv_l);
  PairHead<T> h;
  const T alpha = static_cast<T>(p.alpha), gamma = static_cast<T>(p.gamma);
  const T clip = static_cast<T>(p.logratio_clip), eps = static_cast<T>(p.label_smoothing);
  // beta/2 * w in double: it may overflow float where d = beta/2 * w * (e_ref - e) does not (policy == reference).
  const double half_beta_w = 0.5 * p.beta * static_cast<double>(w);
  T log_clip_w, log_clip_l;  // log of the clip's slope sech^2(d/c)
  h.d_w = static_cast<T>(half_beta_w * static_cast<double>(diff_w));
  h.d_l = static_cast<T>(half_beta_w * static_cast<double>(diff_l));
  soft_clip(clip, &h.d_w, &log_clip_w);
  soft_clip(clip, &h.d_l, &log_clip_l);
  h.reward_w = psi(p.divergence, alpha, h.d_w);
  h.reward_l = psi(p.divergence, alpha, h.d_l);
  const T z = gamma * psi_diff(p.divergence, alpha, h.d_w, h.d_l);
  h.logit = z;
  T loss = T(0), g = T(0);      // g = d loss / d z
  if (p.loss_type == kHinge) {  // relu(1 - z); a NaN z gives a NaN loss and g = -1, as relu and its backward do
    loss = z >= T(1) ? T(0) : T(1) - z;
    g = z >= T(1) ? T(0) : T(-1);
  } else if (p.loss_type == kIPO) {
    const T gap = z - static_cast<T>(p.ipo_margin);
    loss = gap * gap;
    g = T(2) * gap;
  } else if (p.loss_type == kDMPO) {
    // p (log p - log q) + (1 - p)(log(1 - p) - log(1 - q)) with log p = -softplus(-z), 1 - p = sigmoid(-z): no
    // 1 - p cancellation; d/dz = p (1 - p) (z - logit q). mul0: a saturated p times an infinite log is 0.
    const T log_q = static_cast<T>(p.dmpo_log_q), log_1mq = static_cast<T>(p.dmpo_log_1mq);
    const T p_win = sigmoid(z), p_lose = sigmoid(-z);
    loss = mul0(p_win, -softplus(-z) - log_q) + mul0(p_lose, -softplus(z) - log_1mq);
    g = mul0(p_win * p_lose, z - (log_q - log_1mq));
  } else {  // sigmoid: each label-smoothing term only where its weight is non-zero (0 * inf)
    if (eps < T(1)) {
      loss += (T(1) - eps) * softplus(-z);
      g -= (T(1) - eps) * sigmoid(-z);
    }
    if (eps > T(0)) {
      loss += eps * softplus(z);
      g += eps * sigmoid(z);
    }
  }
  h.loss = loss;
  const double red = (p.reduction == kMean) ? 1.0 / static_cast<double>(p.num_pairs) : 1.0;
  const double outer = half_beta_w * red * 2.0;
  const T slope_w = scaled_psi_slope(p.divergence, alpha, h.d_w, log_clip_w);
  const T slope_l = scaled_psi_slope(p.divergence, alpha, h.d_l, log_clip_l);
  // The slope is > 0 wherever the log-ratio and the clip's log-slope are finite (x - x == 0).
  const bool positive_w = h.d_w - h.d_w == T(0) && log_clip_w - log_clip_w == T(0);
  const bool positive_l = h.d_l - h.d_l == T(0) && log_clip_l - log_clip_l == T(0);
  h.coef_w = row_coef(g, -gamma * slope_w, positive_w, outer, inv_w);
  h.coef_l = row_coef(g, gamma * slope_l, positive_l, outer, inv_l);
  return h;
}

// ---------------------------------------------------------------------------------------------------------------
// The pair-head epilogue, shared by the CPU (fdpo_cpu.cpp pair_heads) and CUDA (fdpo_cuda.cu forward_tail)
// kernels: per-row sums -> per-sample errors -> fdpo_pair_head -> the stored statistics; then the reduced loss and
// the summary. A is the type the sums are in (double on CPU, float on CUDA), T the output type.
// ---------------------------------------------------------------------------------------------------------------

// The factor turning a row's sums into its per-sample error (err_reduction): 1 (sum), 1/M (masked mean; 0 for an
// empty mask) or 1/D (mean, or mean over all elements), given as inv_d.
template <typename A>
FDPO_HD A error_scale(int err_reduction, bool has_mask, A mask_count, A inv_d) {
  if (err_reduction == kErrSum) return A(1);
  if (has_mask && err_reduction == kErrMean) return mask_count > A(0) ? A(1) / mask_count : A(0);
  return inv_d;
}

template <typename T>
struct SampleErrors {
  T e, e_ref, diff, inv;  // e, e_ref, e_ref - e (accumulated directly when ref_pred is given), error_scale
};

// One sample's errors from its sums S (model), R (reference), Q (e_ref - e) scaled by `scale`; without ref_pred
// (has_ref false) e_ref is the cached `ref_err` and the gap is formed here.
template <typename T, typename A>
FDPO_HD SampleErrors<T> sample_errors(A s, A r, A q, A scale, bool has_ref, T ref_err) {
  SampleErrors<T> out;
  out.inv = static_cast<T>(scale);
  out.e = static_cast<T>(s * scale);
  if (has_ref) {
    out.e_ref = static_cast<T>(r * scale);
    out.diff = static_cast<T>(q * scale);
  } else {
    out.e_ref = ref_err;
    out.diff = out.e_ref - out.e;
  }
  return out;
}

// The forward's per-pair and per-row outputs (fdpo_op.h empty_forward_outputs).
template <typename T>
struct PairOutputs {
  T* loss;    // [] or [B]
  T* logits;  // [B]
  T* stats;   // [4, 2B]: e, e_ref, d, psi(d)
  T* coef;    // [2B]
};

// The head of pair p and its stores: logit, statistics and coefficients of rows rw, rl, and the per-pair loss
// when it is not reduced. Returns the head for the caller's reductions.
template <typename T>
FDPO_HD PairHead<T> pair_epilogue(const HeadParams& hp, int64_t p, int64_t rw, int64_t rl, const SampleErrors<T>& w,
                                  const SampleErrors<T>& l, T weight, const PairOutputs<T>& out) {
  const PairHead<T> h = fdpo_pair_head<T>(hp, w.diff, l.diff, w.inv, l.inv, weight);
  const int64_t rows = 2 * hp.num_pairs;
  out.logits[p] = h.logit;
  out.stats[rw] = w.e;
  out.stats[rl] = l.e;
  out.stats[rows + rw] = w.e_ref;
  out.stats[rows + rl] = l.e_ref;
  out.stats[2 * rows + rw] = h.d_w;
  out.stats[2 * rows + rl] = h.d_l;
  out.stats[3 * rows + rw] = h.reward_w;
  out.stats[3 * rows + rl] = h.reward_l;
  out.coef[rw] = h.coef_w;
  out.coef[rl] = h.coef_l;
  if (hp.reduction == kNone) out.loss[p] = h.loss;
  return h;
}

// The reduced loss (mean or sum of the per-pair losses) and the summary (implicit_acc, mean e, mean e_ref, the
// cross term X: 0 unless hp.cross_term) from their totals over the pairs.
template <typename T, typename A>
FDPO_HD void store_reduced(const HeadParams& hp, A loss_total, A wins, A e_total, A eref_total, A cross, T* loss,
                           T* summary) {
  const A B = static_cast<A>(hp.num_pairs), rows = static_cast<A>(2 * hp.num_pairs);
  if (hp.reduction == kMean) loss[0] = static_cast<T>(loss_total / B);
  if (hp.reduction == kSum) loss[0] = static_cast<T>(loss_total);
  summary[0] = static_cast<T>(wins / B);
  summary[1] = static_cast<T>(e_total / rows);
  summary[2] = static_cast<T>(eref_total / rows);
  summary[3] = static_cast<T>(cross);
}

}  // namespace fdpo
