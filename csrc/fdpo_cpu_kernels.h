// The CPU kernel bodies of fdpo_cpu.cpp, compiled once per ISA copy: fdpo_cpu.cpp includes this file inside
// namespace fdpo_cpu::generic (FDPO_CPU_AVX2 = 0, the baseline ISA the extension is built for) and, on x86-64 with
// GCC, inside fdpo_cpu::avx2 under #pragma GCC target("avx2,fma,f16c") (FDPO_CPU_AVX2 = 1). No include guard and no
// #includes here, on purpose: it is a template body, not a standalone header.

// ---- bit casts
inline f32x8 as_f32(u32x8 v) {
  f32x8 r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
inline u32x8 as_u32(f32x8 v) {
  u32x8 r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
inline void flush8(Wide8& w, f32x8 v) {  // 8 float lanes -> 8 double lanes, lane order kept
#if defined(__clang__) || __GNUC__ >= 12
  w.lo += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), f64x4);
  w.hi += __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), f64x4);
#else
  w.lo += f64x4{v[0], v[1], v[2], v[3]};
  w.hi += f64x4{v[4], v[5], v[6], v[7]};
#endif
}
inline u32x8 splat_u32(uint32_t x) { return u32x8{x, x, x, x, x, x, x, x}; }
inline f32x8 splat_f32(float x) { return f32x8{x, x, x, x, x, x, x, x}; }

// Writes N = 16 or 32 bytes (p aligned to N when NT): a plain store, or a non-temporal (streaming) one that skips
// the read-for-ownership of the destination line (see kStreamMinBytes).
template <bool NT, int N>
inline void store_bytes(void* p, const void* src) {
#if defined(__x86_64__) || defined(_M_X64)
  if (NT) {
#if FDPO_CPU_AVX2
    if (N == 32) {
      __m256i x;
      std::memcpy(&x, src, 32);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), x);
      return;
    }
#endif
    for (int k = 0; k < N; k += 16) {
      __m128i x;
      std::memcpy(&x, static_cast<const char*>(src) + k, 16);
      _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(p) + k), x);
    }
    return;
  }
#endif
  std::memcpy(p, src, N);
}

inline void stream_fence() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_sfence();
#endif
}

// ---- element conversions: Cvt<Tag> gives the lane count L, the accumulate type A, its vector V (L lanes), the
// double-lane flush type W and exact loads/stores (fp16/bf16 round to nearest even on store, like torch).
template <typename Tag>
struct Cvt;

// float and double are stored as their own accumulate type: plain loads and stores, no conversion.
template <typename T, typename Vec>
struct PlainCvt {
  using A = T;
  using V = Vec;
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  template <bool NT>
  static void store(T* p, V v) {
    store_bytes<NT, sizeof(V)>(p, &v);
  }
  static A load1(const T* p) { return *p; }
  static void store1(T* p, A v) { *p = v; }
};

template <>
struct Cvt<F32> : PlainCvt<float, f32x8> {
  static constexpr int L = 8;
  using W = Wide8;
  static void flush(W& w, V v) { flush8(w, v); }
  static double lane(const W& w, int l) { return l < 4 ? w.lo[l] : w.hi[l - 4]; }
};

template <>
struct Cvt<F64> : PlainCvt<double, f64x4> {
  static constexpr int L = 4;
  using W = f64x4;
  static void flush(W& w, V v) { w += v; }
  static double lane(const W& w, int l) { return w[l]; }
};

inline uint16_t bf16_bits_rne(float f) {  // c10::detail::round_to_nearest_even
  if (f != f) return UINT16_C(0x7FC0);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16);
}

template <>
struct Cvt<BF16> {
  static constexpr int L = 8;
  using A = float;
  using V = f32x8;
  using W = Wide8;
  static V load(const uint16_t* p) {
#if FDPO_CPU_AVX2
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return (V)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
    u16x8 h;
    std::memcpy(&h, p, sizeof h);
    return as_f32(__builtin_convertvector(h, u32x8) << 16);
#endif
  }
  template <bool NT>
  static void store(uint16_t* p, V v) {
    const u32x8 u = as_u32(v);
    const u32x8 rounded = (u + splat_u32(0x7FFFu) + ((u >> 16) & splat_u32(1u))) >> 16;
    const u32x8 r = (v != v) ? splat_u32(0x7FC0u) : rounded;
#if FDPO_CPU_AVX2
    const __m256i ri = (__m256i)r;
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(ri), _mm256_extracti128_si256(ri, 1));
#else
    const u16x8 h = __builtin_convertvector(r, u16x8);
#endif
    store_bytes<NT, 16>(p, &h);
  }
  static A load1(const uint16_t* p) {
    const uint32_t u = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static void store1(uint16_t* p, A v) { *p = bf16_bits_rne(v); }
  static void flush(W& w, V v) { flush8(w, v); }
  static double lane(const W& w, int l) { return l < 4 ? w.lo[l] : w.hi[l - 4]; }
};

template <>
struct Cvt<F16> {
  static constexpr int L = 8;
  using A = float;
  using V = f32x8;
  using W = Wide8;
  static V load(const uint16_t* p) {
#if FDPO_CPU_AVX2
    return (V)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    // c10::detail::fp16_ieee_to_fp32_value, on 8 lanes (exact).
    u16x8 h;
    std::memcpy(&h, p, sizeof h);
    const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
    const u32x8 sign = w & splat_u32(0x80000000u);
    const u32x8 two_w = w + w;
    const f32x8 normalized = as_f32((two_w >> 4) + splat_u32(0xE0u << 23)) * splat_f32(0x1.0p-112f);
    const f32x8 denormalized = as_f32((two_w >> 17) | splat_u32(126u << 23)) - splat_f32(0.5f);
    const u32x8 bits = (two_w < splat_u32(1u << 27)) ? as_u32(denormalized) : as_u32(normalized);
    return as_f32(sign | bits);
#endif
  }
  template <bool NT>
  static void store(uint16_t* p, V v) {
#if FDPO_CPU_AVX2
    const __m128i h = _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    store_bytes<NT, 16>(p, &h);
#else
    // c10::detail::fp16_ieee_from_fp32_value, on 8 lanes (round to nearest even).
    const u32x8 w = as_u32(v);
    const u32x8 shl1_w = w + w;
    const u32x8 sign = w & splat_u32(0x80000000u);
    f32x8 base = (as_f32(w & splat_u32(0x7FFFFFFFu)) * splat_f32(0x1.0p+112f)) * splat_f32(0x1.0p-110f);
    u32x8 bias = shl1_w & splat_u32(0xFF000000u);
    bias = (bias < splat_u32(0x71000000u)) ? splat_u32(0x71000000u) : bias;
    base = as_f32((bias >> 1) + splat_u32(0x07800000u)) + base;
    const u32x8 bits = as_u32(base);
    const u32x8 nonsign = ((bits >> 13) & splat_u32(0x00007C00u)) + (bits & splat_u32(0x00000FFFu));
    const u32x8 r = (sign >> 16) | ((shl1_w > splat_u32(0xFF000000u)) ? splat_u32(0x7E00u) : nonsign);
    const u16x8 h = __builtin_convertvector(r, u16x8);
    store_bytes<NT, 16>(p, &h);
#endif
  }
  static A load1(const uint16_t* p) { return c10::detail::fp16_ieee_to_fp32_value(*p); }
  static void store1(uint16_t* p, A v) { *p = c10::detail::fp16_ieee_from_fp32_value(v); }
  static void flush(W& w, V v) { flush8(w, v); }
  static double lane(const W& w, int l) { return l < 4 ? w.lo[l] : w.hi[l - 4]; }
};

// ---- forward: one (pair, chunk) item. Accumulators of the winner (index 0) and the loser (index 1) row; with
// CROSS (cross_term, never with a mask) one more: x = sum (pred_w - t_w)(pred_l - t_l), the pair's cross term.
template <typename Tag, bool REF, bool MASK, bool SHARED_T, bool SHARED_M, bool CROSS>
struct FwdItem {
  static_assert(!(CROSS && MASK), "the cross term is defined without a mask");
  using C = Cvt<Tag>;
  using S = typename Tag::S;
  using A = typename C::A;
  using V = typename C::V;
  using W = typename C::W;
  static constexpr int L = C::L;

  // Adds the terms of one position into acc[row][quantity] (and x): L elements as vectors (X = V, load = C::load)
  // in the main loop, one element (X = A, load = C::load1) in the tail.
  template <typename X, typename Load>
  static inline void add_terms(X (&acc)[2][4], X& x, Load load, const S* const (&p)[2], const S* const (&r)[2],
                               const S* const (&t)[2], const S* const (&m)[2], int64_t i) {
    const X t0 = load(t[0] + i);
    const X tt[2] = {t0, SHARED_T ? t0 : load(t[1] + i)};
    X mm[2] = {X{}, X{}};
    if (MASK) {
      mm[0] = load(m[0] + i);
      mm[1] = SHARED_M ? mm[0] : load(m[1] + i);
    }
    X res[2];  // pred - t of both rows, for the cross term
    for (int h = 0; h < 2; ++h) {
      const X pv = load(p[h] + i);
      const X a = pv - tt[h];
      res[h] = a;
      if (MASK) {
        acc[h][0] += (a * a) * mm[h];
        acc[h][3] += mm[h];
      } else {
        acc[h][0] += a * a;
      }
      if (REF) {
        const X rv = load(r[h] + i);
        const X b = rv - tt[h];
        const X q = (rv - pv) * (a + b);  // (ref - pred) * (ref + pred - 2t), the gap without cancellation
        if (MASK) {
          acc[h][1] += (b * b) * mm[h];
          acc[h][2] += q * mm[h];
        } else {
          acc[h][1] += b * b;
          acc[h][2] += q;
        }
      }
    }
    if (CROSS) x += res[0] * res[1];
  }

  static inline void step(V (&acc)[2][4], V& x, const S* const (&p)[2], const S* const (&r)[2], const S* const (&t)[2],
                          const S* const (&m)[2], int64_t i) {
    add_terms(acc, x, [](const S* y) { return C::load(y); }, p, r, t, m, i);
  }

  static inline void step1(A (&acc)[2][4], A& x, const S* const (&p)[2], const S* const (&r)[2], const S* const (&t)[2],
                           const S* const (&m)[2], int64_t i) {
    add_terms(acc, x, [](const S* y) { return C::load1(y); }, p, r, t, m, i);
  }

  // Sums elements [begin, end) of the pair's rows into out[kSlots] (and, with CROSS, the cross term into *cross),
  // each in the same fixed order: float lanes per block, flushed into double lanes, lanes in order, then the tail.
  static void run(const S* const (&p)[2], const S* const (&r)[2], const S* const (&t)[2], const S* const (&m)[2],
                  int64_t begin, int64_t end, double* out, double* cross) {
    constexpr int NQ = 4;
    W wide[2][NQ];
    W xwide;
    std::memset(&wide, 0, sizeof wide);
    std::memset(&xwide, 0, sizeof xwide);
    int64_t i = begin;
    const int64_t vec_end = begin + ((end - begin) / L) * L;
    while (i < vec_end) {
      const int64_t block_end = (vec_end - i) > kBlock ? i + kBlock : vec_end;
      V acc[2][NQ];
      V x = V{};
      for (int h = 0; h < 2; ++h)
        for (int k = 0; k < NQ; ++k) acc[h][k] = V{};
      for (; i < block_end; i += L) step(acc, x, p, r, t, m, i);
      for (int h = 0; h < 2; ++h)
        for (int k = 0; k < NQ; ++k) C::flush(wide[h][k], acc[h][k]);
      if (CROSS) C::flush(xwide, x);
    }
    A tail[2][NQ] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
    A xtail = 0;
    for (; i < end; ++i) step1(tail, xtail, p, r, t, m, i);
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < NQ; ++k) {
        double s = 0.0;
        for (int l = 0; l < L; ++l) s += C::lane(wide[h][k], l);
        out[4 * h + k] = s + static_cast<double>(tail[h][k]);
      }
    if (CROSS) {
      double s = 0.0;
      for (int l = 0; l < L; ++l) s += C::lane(xwide, l);
      *cross = s + static_cast<double>(xtail);
    }
  }
};

// The work split of both passes: items (pair, chunk of kChunk elements) over at::parallel_for. For each item,
// item(it, pair rows {w, l}, their target rows, their mask rows, [lo, hi)); task_end() after each task's items.
struct PairChunk {
  int64_t index;
  int64_t rows[2], target_rows[2], mask_rows[2];
  int64_t lo, hi;
};

template <bool SHARED_T, bool SHARED_M, typename Args, typename Item, typename TaskEnd>
void for_each_pair_chunk(const Args& a, Item&& item, TaskEnd&& task_end) {
  const int64_t D = a.D, B = a.B, nc = a.chunks;
  // At least ~64K elements per task, so tiny problems do not pay for waking threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (2 * kChunk));
  at::parallel_for(0, B * nc, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t pair = it / nc, c = it % nc;
      const int64_t rw = winner_row(pair, B, a.interleaved), rl = loser_row(pair, B, a.interleaved);
      const int64_t lo = c * kChunk;
      item(PairChunk{it,
                     {rw, rl},
                     {SHARED_T ? pair : rw, SHARED_T ? pair : rl},
                     {SHARED_M ? pair : rw, SHARED_M ? pair : rl},
                     lo,
                     std::min(D, lo + kChunk)});
    }
    task_end();
  });
}

template <typename Tag, bool REF, bool MASK, bool SHARED_T, bool SHARED_M, bool CROSS>
void forward_typed(const FwdArgs& a) {
  using S = typename Tag::S;
  using Item = FwdItem<Tag, REF, MASK, SHARED_T, SHARED_M, CROSS>;
  const S* pred = static_cast<const S*>(a.pred);
  const S* ref = static_cast<const S*>(a.ref);
  const S* tgt = static_cast<const S*>(a.target);
  const S* msk = static_cast<const S*>(a.mask);
  const int64_t D = a.D;
  for_each_pair_chunk<SHARED_T, SHARED_M>(
      a,
      [&](const PairChunk& w) {
        const S* const pp[2] = {pred + w.rows[0] * D, pred + w.rows[1] * D};
        const S* const rr[2] = {REF ? ref + w.rows[0] * D : nullptr, REF ? ref + w.rows[1] * D : nullptr};
        const S* const tt[2] = {tgt + w.target_rows[0] * D, tgt + w.target_rows[1] * D};
        const S* const mm[2] = {MASK ? msk + w.mask_rows[0] * D : nullptr, MASK ? msk + w.mask_rows[1] * D : nullptr};
        Item::run(pp, rr, tt, mm, w.lo, w.hi, a.ws + w.index * kSlots, CROSS ? a.cross_ws + w.index : nullptr);
      },
      [] {});
}

// The cross-term variants exist without a mask only (cross_term with a mask is refused by forward_cpu).
template <typename Tag>
void forward_tag(const FwdArgs& a) {
  bool_switch(a.ref != nullptr, [&](auto ref) {
    layout_switch(a, [&](auto mask, auto shared_t, auto shared_m) {
      constexpr bool kRef = decltype(ref)::value, kMask = decltype(mask)::value;
      constexpr bool kSharedT = decltype(shared_t)::value, kSharedM = decltype(shared_m)::value;
      if constexpr (!kMask) {
        if (a.cross) return forward_typed<Tag, kRef, false, kSharedT, false, true>(a);
      }
      forward_typed<Tag, kRef, kMask, kSharedT, kSharedM, false>(a);
    });
  });
}

// ---- mixed input dtypes (e.g. Accelerate: fp32 model_pred holding bf16 values, bf16 target and reference).
// The arithmetic type A is float (double for fp64 model_pred). Each (pair, chunk) item converts the rows of the
// inputs not stored as A into per-thread scratch (a chunk is kChunk elements: the scratch stays in L1/L2) and runs
// A's kernel on it. Every input is read once from memory in its own dtype and no tensor-sized copy is made; since
// the conversions are exact and the item's summation order is that of A's own kernel, the results are bitwise
// those of casting every input to A first.
template <typename A>
using ComputeTag = std::conditional_t<std::is_same<A, double>::value, F64, F32>;

template <typename A>
constexpr Dtype compute_dtype() {
  return std::is_same<A, double>::value ? at::kDouble : at::kFloat;
}

// Row `row`, elements [lo, lo + n), of a [rows, D] input of dtype `dt`, as A: a pointer into the input when it is
// stored as A, else into `scratch` after converting.
template <typename A>
const A* chunk_as(Dtype dt, const void* base, int64_t D, int64_t row, int64_t lo, int64_t n, A* scratch) {
  if (dt == compute_dtype<A>()) return static_cast<const A*>(base) + row * D + lo;
  dtype_switch(dt, [&](auto tag) {
    using Tag = decltype(tag);
    const typename Tag::S* src = static_cast<const typename Tag::S*>(base) + row * D + lo;
    for (int64_t i = 0; i < n; ++i) scratch[i] = static_cast<A>(Cvt<Tag>::load1(src + i));
  });
  return scratch;
}

// Per-thread scratch for up to 8 converted input rows of one chunk.
template <typename A>
A* scratch_rows() {
  thread_local std::vector<A> buffer(8 * kChunk);
  return buffer.data();
}

template <typename A, bool REF, bool MASK, bool SHARED_T, bool SHARED_M, bool CROSS>
void forward_mixed_typed(const FwdArgs& a) {
  using Item = FwdItem<ComputeTag<A>, REF, MASK, SHARED_T, SHARED_M, CROSS>;
  const int64_t D = a.D;
  for_each_pair_chunk<SHARED_T, SHARED_M>(
      a,
      [&](const PairChunk& w) {
        A* scratch = scratch_rows<A>();
        const int64_t n = w.hi - w.lo;
        auto rows = [&](Dtype dt, const void* base, const int64_t (&r)[2], bool shared, int slot, const A*(&out)[2]) {
          out[0] = chunk_as<A>(dt, base, D, r[0], w.lo, n, scratch + slot * kChunk);
          out[1] = shared ? out[0] : chunk_as<A>(dt, base, D, r[1], w.lo, n, scratch + (slot + 1) * kChunk);
        };
        const A *pp[2], *rr[2] = {nullptr, nullptr}, *tt[2], *mm[2] = {nullptr, nullptr};
        rows(a.dtype, a.pred, w.rows, false, 0, pp);
        if (REF) rows(a.ref_dtype, a.ref, w.rows, false, 2, rr);
        rows(a.target_dtype, a.target, w.target_rows, SHARED_T, 4, tt);
        if (MASK) rows(a.mask_dtype, a.mask, w.mask_rows, SHARED_M, 6, mm);
        const A* const cp[2] = {pp[0], pp[1]};
        const A* const cr[2] = {rr[0], rr[1]};
        const A* const ct[2] = {tt[0], tt[1]};
        const A* const cm[2] = {mm[0], mm[1]};
        Item::run(cp, cr, ct, cm, 0, n, a.ws + w.index * kSlots, CROSS ? a.cross_ws + w.index : nullptr);
      },
      [] {});
}

template <typename A>
void forward_mixed(const FwdArgs& a) {
  bool_switch(a.ref != nullptr, [&](auto ref) {
    layout_switch(a, [&](auto mask, auto shared_t, auto shared_m) {
      constexpr bool kRef = decltype(ref)::value, kMask = decltype(mask)::value;
      constexpr bool kSharedT = decltype(shared_t)::value, kSharedM = decltype(shared_m)::value;
      if constexpr (!kMask) {
        if (a.cross) return forward_mixed_typed<A, kRef, false, kSharedT, false, true>(a);
      }
      forward_mixed_typed<A, kRef, kMask, kSharedT, kSharedM, false>(a);
    });
  });
}

inline void forward_items(const FwdArgs& a) {
  if (a.mixed()) {
    if (a.dtype == at::kDouble) return forward_mixed<double>(a);
    return forward_mixed<float>(a);
  }
  dtype_switch(a.dtype, [&](auto tag) { forward_tag<decltype(tag)>(a); });
}

// ---- backward: grad = scale[row] * (pred - target) [* mask], both rows of a pair per item.
template <typename Tag, bool MASK, bool SHARED_T, bool SHARED_M, bool NT>
void backward_typed(const BwdArgs& a) {
  using C = Cvt<Tag>;
  using S = typename Tag::S;
  using A = typename C::A;
  using V = typename C::V;
  constexpr int L = C::L;
  const S* pred = static_cast<const S*>(a.pred);
  const S* tgt = static_cast<const S*>(a.target);
  const S* msk = static_cast<const S*>(a.mask);
  S* grad = static_cast<S*>(a.grad);
  const int64_t D = a.D;
  for_each_pair_chunk<SHARED_T, SHARED_M>(
      a,
      [&](const PairChunk& w) {
        const S* const pp[2] = {pred + w.rows[0] * D, pred + w.rows[1] * D};
        const S* const tt[2] = {tgt + w.target_rows[0] * D, tgt + w.target_rows[1] * D};
        const S* const mm[2] = {MASK ? msk + w.mask_rows[0] * D : nullptr, MASK ? msk + w.mask_rows[1] * D : nullptr};
        S* const gg[2] = {grad + w.rows[0] * D, grad + w.rows[1] * D};
        const A s[2] = {static_cast<A>(a.scale[w.rows[0]]), static_cast<A>(a.scale[w.rows[1]])};
        const bool zero_row[2] = {s[0] == A(0), s[1] == A(0)};
        // Both rows of the pair at position i: L elements as vectors (X = V) in the main loop, one (X = A) in the tail.
        auto write = [&](auto load, auto store, const auto(&scale)[2], int64_t i) {
          using X = std::remove_const_t<std::remove_reference_t<decltype(scale[0])>>;
          const X t0 = load(tt[0] + i);
          const X tv[2] = {t0, SHARED_T ? t0 : load(tt[1] + i)};
          X mv[2] = {X{}, X{}};
          if (MASK) {
            mv[0] = load(mm[0] + i);
            mv[1] = SHARED_M ? mv[0] : load(mm[1] + i);
          }
          for (int h = 0; h < 2; ++h) {
            // A row whose scale is 0 (saturated sigmoid, hinge past its margin, an empty or NaN mask's inv = 0) gets
            // exact zeros: 0 * an infinite residual or a NaN mask entry would be NaN (mul0 semantics, as every
            // backend).
            X g = X{};
            if (!zero_row[h]) {
              g = scale[h] * (load(pp[h] + i) - tv[h]);
              if (MASK) g = g * mv[h];
            }
            store(gg[h] + i, g);
          }
        };
        const V sv[2] = {V{} + s[0], V{} + s[1]};  // broadcast
        const int64_t vec_hi = w.lo + ((w.hi - w.lo) / L) * L;
        int64_t i = w.lo;
        for (; i < vec_hi; i += L) {
          write([](const S* x) { return C::load(x); }, [](S* x, V v) { C::template store<NT>(x, v); }, sv, i);
        }
        for (; i < w.hi; ++i) {
          write([](const S* x) { return C::load1(x); }, [](S* x, A v) { C::store1(x, v); }, s, i);
        }
      },
      [] {
        if (NT) stream_fence();  // order the streaming stores before the task ends
      });
}

template <typename Tag>
void backward_tag(const BwdArgs& a) {
  bool_switch(a.stream_stores, [&](auto nt) {
    layout_switch(a, [&](auto mask, auto shared_t, auto shared_m) {
      backward_typed<Tag, decltype(mask)::value, decltype(shared_t)::value, decltype(shared_m)::value,
                     decltype(nt)::value>(a);
    });
  });
}

inline void backward_items(const BwdArgs& a) {
  dtype_switch(a.dtype, [&](auto tag) { backward_tag<decltype(tag)>(a); });
}

// Scalar backward with mul0 semantics, for calls where some row's scale is +-inf: grad = mul0(mul0(s, p - t), m).
template <typename Tag>
void backward_safe_typed(const BwdArgs& a) {
  using C = Cvt<Tag>;
  using S = typename Tag::S;
  using A = typename C::A;
  const S* pred = static_cast<const S*>(a.pred);
  const S* tgt = static_cast<const S*>(a.target);
  const S* msk = static_cast<const S*>(a.mask);
  S* grad = static_cast<S*>(a.grad);
  const int64_t D = a.D, B = a.B, rows = 2 * B;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t pair = pair_of_row(row, B, a.interleaved);
      const S* p = pred + row * D;
      const S* t = tgt + (a.target_shared ? pair : row) * D;
      const S* m = msk == nullptr ? nullptr : msk + (a.mask_shared ? pair : row) * D;
      S* g = grad + row * D;
      const A s = static_cast<A>(a.scale[row]);
      for (int64_t j = 0; j < D; ++j) {
        A v = fdpo::mul0(s, C::load1(p + j) - C::load1(t + j));
        if (m != nullptr) v = fdpo::mul0(v, C::load1(m + j));
        C::store1(g + j, v);
      }
    }
  });
}

inline void backward_items_safe(const BwdArgs& a) {
  dtype_switch(a.dtype, [&](auto tag) { backward_safe_typed<decltype(tag)>(a); });
}

// Mixed input dtypes: grad = mul0(mul0(s, pred - target), m) in A over converted chunks (see forward_mixed), rounded
// once to model_pred's dtype. mul0 throughout, so this path also serves overflowed (+-inf) scales.
template <typename A, typename PredTag, bool MASK, bool SHARED_T, bool SHARED_M>
void backward_mixed_typed(const BwdArgs& a) {
  using S = typename PredTag::S;
  const int64_t D = a.D;
  for_each_pair_chunk<SHARED_T, SHARED_M>(
      a,
      [&](const PairChunk& w) {
        A* scratch = scratch_rows<A>();
        const int64_t n = w.hi - w.lo;
        A* out = scratch + 6 * kChunk;  // the gradient of one row before rounding to model_pred's dtype
        const A* t0 = chunk_as<A>(a.target_dtype, a.target, D, w.target_rows[0], w.lo, n, scratch + 2 * kChunk);
        const A* tv[2] = {
            t0,
            SHARED_T ? t0 : chunk_as<A>(a.target_dtype, a.target, D, w.target_rows[1], w.lo, n, scratch + 3 * kChunk)};
        const A* mv[2] = {nullptr, nullptr};
        if (MASK) {
          mv[0] = chunk_as<A>(a.mask_dtype, a.mask, D, w.mask_rows[0], w.lo, n, scratch + 4 * kChunk);
          mv[1] =
              SHARED_M ? mv[0] : chunk_as<A>(a.mask_dtype, a.mask, D, w.mask_rows[1], w.lo, n, scratch + 5 * kChunk);
        }
        for (int h = 0; h < 2; ++h) {
          const A* pv = chunk_as<A>(a.dtype, a.pred, D, w.rows[h], w.lo, n, scratch + h * kChunk);
          const A s = static_cast<A>(a.scale[w.rows[h]]);
          for (int64_t i = 0; i < n; ++i) {
            A g = fdpo::mul0(s, pv[i] - tv[h][i]);
            if (MASK) g = fdpo::mul0(g, mv[h][i]);
            out[i] = g;
          }
          S* dst = static_cast<S*>(a.grad) + w.rows[h] * D + w.lo;
          for (int64_t i = 0; i < n; ++i) Cvt<PredTag>::store1(dst + i, static_cast<typename Cvt<PredTag>::A>(out[i]));
        }
      },
      [] {});
}

template <typename A, typename PredTag>
void backward_mixed(const BwdArgs& a) {
  layout_switch(a, [&](auto mask, auto shared_t, auto shared_m) {
    backward_mixed_typed<A, PredTag, decltype(mask)::value, decltype(shared_t)::value, decltype(shared_m)::value>(a);
  });
}

inline void backward_items_mixed(const BwdArgs& a) {
  dtype_switch(a.dtype, [&](auto tag) {
    using PredTag = decltype(tag);
    if (a.dtype == at::kDouble)
      backward_mixed<double, PredTag>(a);
    else
      backward_mixed<float, PredTag>(a);
  });
}
