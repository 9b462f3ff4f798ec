// Native CPU kernel of the emulator: every device walks through its own pulses only.
//
// The torch kernels (sim_backend/kernels.py) step the whole tile in lockstep, so a pass
// costs as much for a device with no pulse left as for the busiest one. Here devices are
// taken in groups of L neighbours (one SIMD vector): each lane applies its own samples'
// pulses in order and the group loops until its busiest lane is done, so the work is
// about the real pulse count. The math is the one of kernels.FusedParams (same formulas,
// same noise hash, float32); transcendental functions are branch-free polynomials so the
// lane loop vectorizes. Built and loaded at run time by sim_backend/native.py (ctypes).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <vector>

namespace {

constexpr int L = 8;  // lanes per group: one AVX2 vector of float32 (two SSE/NEON vectors)
typedef float vf __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));
typedef uint32_t vu __attribute__((vector_size(4 * L)));

enum Family { LINEAR = 0, SQRT = 1, SQUARE = 2, POWER = 3, EXP = 4 };
enum Source { COUNTS8 = 0, COUNTS32 = 1, BITS = 2 };

inline vf splat(float a) { return vf{} + a; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf to_f(vi a) { return __builtin_convertvector(a, vf); }
inline vf to_f(vu a) { return __builtin_convertvector(a, vf); }
inline bool any(vi m) {
#if defined(__AVX__)
  typedef long long v4di __attribute__((vector_size(32)));
  return !__builtin_ia32_ptestz256((v4di)m, (v4di)m);
#endif
  int32_t lanes[L];
  std::memcpy(lanes, &m, sizeof(m));
  int32_t r = 0;
  for (int k = 0; k < L; ++k) r |= lanes[k];
  return r != 0;
}

inline vf vsqrt(vf v) {
#if defined(__AVX__)
  return __builtin_ia32_sqrtps256(v);
#else
  vf r;
  for (int k = 0; k < L; ++k) r[k] = __builtin_sqrtf(v[k]);
  return r;
#endif
}

template <class U>  // uint32_t or vu
inline U mix(U x) {  // lowbias32, as kernels._mix
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

constexpr float LN2 = 0.693147180559945309f;
constexpr float LOG2E = 1.442695040888963407f;
constexpr float PI = 3.141592653589793238f;

// log(x) for normal x > 0: x = 2^e m, m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s)
inline vf log_pos(vf x) {
  vu b = (vu)x;
  vi e = (vi)(b >> 23) - 127;
  vf m = (vf)((b & 0x7FFFFFu) | 0x3F800000u);
  vi big = m > splat(1.41421356f);
  m = big ? m * 0.5f : m;
  e -= big;  // big lanes are -1
  vf s = (m - 1.0f) / (m + 1.0f);
  vf s2 = s * s;
  const vf s4 = s2 * s2;  // Estrin's scheme: short dependency chains
  vf p = s2 * ((1.0f / 3 + s2 * (1.0f / 5)) + s4 * (1.0f / 7 + s2 * (1.0f / 9)));
  return to_f(e) * LN2 + (2.0f * s + 2.0f * s * p);
}

// 2^y, 0 below 2^-126
inline vf exp2_any(vf y) {
  vf yc = vmin(vmax(y, splat(-126.0f)), splat(127.0f));
  vi ni = __builtin_convertvector(yc + (yc >= 0.0f ? splat(0.5f) : splat(-0.5f)), vi);
  vf z = (yc - to_f(ni)) * LN2;  // |z| <= ln2 / 2
  const vf z2 = z * z, z4 = z2 * z2;
  vf p = ((1.0f + z) + z2 * (0.5f + z * (1.0f / 6))) +
         z4 * ((1.0f / 24 + z * (1.0f / 120)) + z2 * (1.0f / 720 + z * (1.0f / 5040)));
  vf scale = (vf)((vu)(ni + 127) << 23);
  return y < -126.0f ? splat(0.0f) : p * scale;
}

// expm1(z): Taylor series near 0 (keeps the relative accuracy), 2^(z log2 e) - 1 beyond
inline vf expm1_any(vf z) {
  vf t = z * (1.0f + z * (0.5f + z * (1.0f / 6 + z * (1.0f / 24 + z * (1.0f / 120 +
         z * (1.0f / 720 + z * (1.0f / 5040 + z * (1.0f / 40320 + z * (1.0f / 362880)))))))));
  vf big = exp2_any(z * LOG2E) - 1.0f;
  return (z > -0.5f) & (z < 0.5f) ? t : big;
}

// cos and sin of 2 pi u for u in [0, 1): with r = u - round(u) and x = pi r (|x| <= pi/2),
// cos(2 pi u) = 1 - 2 sin^2 x and sin(2 pi u) = 2 sin x cos x (Taylor polynomials of sin x
// and cos x, Estrin's scheme)
inline void sincos_2pi(vf u, vf& c, vf& sn) {
  vf r = u >= 0.5f ? u - 1.0f : u;
  vf x = PI * r;
  vf x2 = x * x;
  const vf x4 = x2 * x2, x8 = x4 * x4;
  vf s = x * (((1.0f + x2 * (-1.0f / 6)) + x4 * (1.0f / 120 + x2 * (-1.0f / 5040))) +
              x8 * ((1.0f / 362880 + x2 * (-1.0f / 39916800)) + x4 * (1.0f / 6227020800.0f)));
  vf cx = ((1.0f + x2 * (-1.0f / 2)) + x4 * (1.0f / 24 + x2 * (-1.0f / 720))) +
          x8 * ((1.0f / 40320 + x2 * (-1.0f / 3628800)) + x4 * (1.0f / 479001600.0f));
  c = 1.0f - 2.0f * s * s;
  sn = 2.0f * s * cx;
}

// The normals of pulses 2p and 2p + 1 of the devices with stream ids h (as
// kernels.pulse_normal): Box-Muller on the 24-bit uniforms of pair p, cosine then sine.
inline void pair_normals(vu h, vu p, vf& z0, vf& z1) {
  vu a = mix(h + p * 0x9E3779B9u);
  vu b = mix(a ^ 0x5BD1E995u);
  vf u1 = (to_f((a >> 8) & 0xFFFFFFu) + 1.0f) * (1.0f / 16777216.0f);
  vf u2 = to_f((b >> 8) & 0xFFFFFFu) * (1.0f / 16777216.0f);
  vf r = vsqrt(-2.0f * log_pos(u1)), c, sn;
  sincos_2pi(u2, c, sn);
  z0 = r * c;
  z1 = r * sn;
}

// the standard normal of pulse t of the devices with stream ids h (as kernels.pulse_normal)
inline vf pulse_normal(vu h, vu t) {
  vf z0, z1;
  pair_normals(h, t >> 1, z0, z1);
  return (t & 1u) != 0u ? z1 : z0;
}

template <int F>
inline vf response(vf v, vf g, float gamma) {  // h(v) of kernels.FusedParams, v >= 0
  if constexpr (F == SQRT) return vsqrt(v);
  if constexpr (F == SQUARE) return v * v;
  if constexpr (F == EXP) return expm1_any(g * v);
  if constexpr (F == POWER) {
    vf lg = log_pos(vmax(v, splat(1e-38f))) * LOG2E;
    vf r = exp2_any((gamma == gamma ? splat(gamma) : g) * lg);
    return v > 0.0f ? r : splat(0.0f);
  }
  return v;
}

struct Args {
  float* w;
  int64_t numel, rows, cols, batch, words;
  const void* counts;  // [batch, numel] int8 / int32 (COUNTS8 / COUNTS32)
  const int32_t* fd;   // BITS: row fire masks [batch, words, rows]; bit 31 of word 0 = minus
  const int32_t* fx;   // BITS: column fire masks [batch, words, cols]
  const float *kp, *km, *tmin, *tmax, *g;
  int64_t coef_stride;  // 0: one kp, km, tmin, tmax (and g) for all devices
  const float* c2c;
  int64_t c2c_stride;  // 0: one c2c for all devices
  float gamma;         // POWER with one exponent for all devices, else NaN (use g)
  uint32_t key;
  const uint32_t* colany = nullptr;  // BITS, cols % L == 0: OR of fx over each L columns
  const uint32_t* live = nullptr;  // with colany: per group, the samples that may have a
  // coincidence (bit b for sample b < 31, bit 31 for all samples from 31 on; 0: none)
  int64_t cstride = 0;  // COUNTS*: counts per sample (numel, or rows * width in a window)
  int64_t col0 = 0, width = 0;  // COUNTS*: only columns col0 .. col0 + width - 1 (width > 0)
};

inline vu popcount(vu x) {  // per-lane bit count (SWAR: AVX2 has no vector popcount)
  x = x - ((x >> 1) & 0x55555555u);
  x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
  x = (x + (x >> 4)) & 0x0F0F0F0Fu;
  return (x * 0x01010101u) >> 24;
}

// The signed counts of sample b for L devices: those of row r from column c0 on (BITS),
// or counts base .. base + L - 1 of the sample (COUNTS*); one vector pass.
template <int S>
inline vi count_lanes(const Args& A, int64_t b, int64_t base, int64_t r, int64_t c0) {
  if constexpr (S == COUNTS8) {
    int8_t c[L];
    std::memcpy(c, static_cast<const int8_t*>(A.counts) + b * A.cstride + base, L);
    vi n;
    for (int k = 0; k < L; ++k) n[k] = c[k];
    return n;
  }
  if constexpr (S == COUNTS32) {
    vi n;
    std::memcpy(&n, static_cast<const int32_t*>(A.counts) + b * A.cstride + base, sizeof(n));
    return n;
  }
  const int32_t* fd = A.fd + b * A.words * A.rows + r;
  const int32_t* fx = A.fx + b * A.words * A.cols + c0;
  uint32_t fires = 0;  // slots in which the row and at least one of the columns fire
  if (A.colany) {
    const uint32_t* any_col = A.colany + b * A.words * (A.cols / L) + c0 / L;
    for (int64_t k = 0; k < A.words; ++k)
      fires |= static_cast<uint32_t>(fd[k * A.rows]) & any_col[k * (A.cols / L)];
  } else {
    for (int64_t k = 0; k < A.words; ++k) fires |= static_cast<uint32_t>(fd[k * A.rows]);
  }
  if ((fires & 0x7FFFFFFFu) == 0) return vi{};  // no coincidence in this sample
  vu n{};
  vi x0;
  for (int64_t k = 0; k < A.words; ++k) {
    vu xk;
    std::memcpy(&xk, fx + k * A.cols, sizeof(xk));
    if (k == 0) x0 = (vi)xk;
    n += popcount(xk & (static_cast<uint32_t>(fd[k * A.rows]) & 0x7FFFFFFFu));
  }
  const vi neg = ((vi{} + fd[0]) ^ x0) < 0;
  return neg ? -(vi)n : (vi)n;
}

template <int S>
inline int32_t count(const Args& A, int64_t b, int64_t idx, int64_t r, int64_t c) {
  if constexpr (S == COUNTS8) return static_cast<const int8_t*>(A.counts)[b * A.cstride + idx];
  if constexpr (S == COUNTS32) return static_cast<const int32_t*>(A.counts)[b * A.cstride + idx];
  const int32_t* fd = A.fd + b * A.words * A.rows + r;
  const int32_t* fx = A.fx + b * A.words * A.cols + c;
  int32_t n = 0;
  for (int64_t k = 0; k < A.words; ++k)
    n += __builtin_popcount(static_cast<uint32_t>(fd[k * A.rows] & fx[k * A.cols]) & 0x7FFFFFFFu);
  return (fd[0] ^ fx[0]) < 0 ? -n : n;
}

// One group of L neighbouring devices in flight. A lane applies its samples' pulses
// back to back, so at step `it` every lane with total > it applies its pulse number it
// (its noise counter); the sign of that pulse is bit it % 32 of signs[it / 32][lane]
// (set: negative). The group is through after tmax = max(total) steps.
struct Group {
  vf x, kp, km, lo, hi, gg, cc;
  vf zn;  // the odd pulse's normal of the pair drawn at the last even step
  vi total;
  vu h;
  int64_t base;   // tile index of lane 0
  int64_t cbase;  // COUNTS*: index of lane 0's count within a sample
  int64_t step = 1, cstep = 1;  // tile / count index from one lane to the next: 1 (devices
  // of one row) or, in a window narrower than L, cols / width (devices of one column)
  int nl, it, tmax;
  std::vector<uint32_t> signs;  // sign bits of the lanes' pulse sequences [word][lane]
};

// The signed counts of sample b for the lanes of G (tail lanes: 0).
template <int S>
inline vi group_counts(const Args& A, const Group& G, int64_t b, bool whole, int64_t r,
                       int64_t c0) {
  if (whole) return count_lanes<S>(A, b, G.cbase, r, c0);
  vi n{};
  for (int k = 0; k < G.nl; ++k) {
    const int64_t i = G.base + k * G.step;
    n[k] = count<S>(A, b, S == BITS ? i : G.cbase + k * G.cstep, A.cols ? i / A.cols : 0,
                    A.cols ? i % A.cols : 0);
  }
  return n;
}

// The group's weights, coefficients and noise stream ids; its step counter to 0.
template <bool NOISY>
void load_devices(const Args& A, Group& G) {
  G.it = 0;
  G.gg = G.cc = vf{};
  G.h = vu{};
  if (!A.coef_stride) {  // one population: the coefficients are constants
    G.kp = splat(A.kp[0]);
    G.km = splat(A.km[0]);
    G.lo = splat(A.tmin[0]);
    G.hi = splat(A.tmax[0]);
    if (A.g) G.gg = splat(A.g[0]);
  }
  if (G.nl == L && G.step == 1) {  // vector loads
    const size_t bytes = sizeof(vf);
    std::memcpy(&G.x, A.w + G.base, bytes);
    if (NOISY) {
      if (A.c2c_stride) std::memcpy(&G.cc, A.c2c + G.base, bytes);
      else G.cc = splat(A.c2c[0]);
      vu idx;
      for (int k = 0; k < L; ++k) idx[k] = static_cast<uint32_t>(G.base + k);
      G.h = mix(idx ^ A.key);
    }
    if (!A.coef_stride) return;
    std::memcpy(&G.kp, A.kp + G.base, bytes);
    std::memcpy(&G.km, A.km + G.base, bytes);
    std::memcpy(&G.lo, A.tmin + G.base, bytes);
    std::memcpy(&G.hi, A.tmax + G.base, bytes);
    if (A.g) std::memcpy(&G.gg, A.g + G.base, bytes);
    return;
  }
  for (int k = 0; k < L; ++k) {
    const int64_t i = G.base + std::min(k, G.nl - 1) * G.step;  // tails mirror the last
    G.x[k] = A.w[i];
    if (A.coef_stride) {  // else set above, once
      G.kp[k] = A.kp[i];
      G.km[k] = A.km[i];
      G.lo[k] = A.tmin[i];
      G.hi[k] = A.tmax[i];
      if (A.g) G.gg[k] = A.g[i];
    }
    if (NOISY) {
      G.cc[k] = A.c2c[A.c2c_stride * i];
      G.h[k] = mix(static_cast<uint32_t>(i) ^ A.key);
    }
  }
}

// Load group grp; false (nothing loaded) when none of its devices gets a pulse. The
// lanes' pulse sequences are built with vector ops, sample by sample: |n| sign bits
// (1 = negative) appended at each lane's own fill position (variable shifts); a lane's
// completed 32-bit word is stored to signs[word][lane].
template <bool NOISY, int S>
bool load(const Args& A, Group& G, int64_t grp) {
  if (A.width && A.width < L) {  // a narrow column window: L rows of one column
    const int64_t blocks = (A.rows + L - 1) / L;
    const int64_t j = grp / blocks, r = (grp - j * blocks) * L;
    G.base = r * A.cols + A.col0 + j;
    G.cbase = r * A.width + j;
    G.step = A.cols;
    G.cstep = A.width;
    G.nl = static_cast<int>(std::min<int64_t>(L, A.rows - r));
  } else if (A.width) {  // a column window: groups of L columns within each row
    const int64_t per_row = (A.width + L - 1) / L;
    const int64_t r = grp / per_row, j0 = (grp - r * per_row) * L;
    G.base = r * A.cols + A.col0 + j0;
    G.cbase = r * A.width + j0;
    G.step = G.cstep = 1;
    G.nl = static_cast<int>(std::min<int64_t>(L, A.width - j0));
  } else {
    G.step = G.cstep = 1;
    G.base = G.cbase = grp * L;
    G.nl = static_cast<int>(std::min<int64_t>(L, A.numel - G.base));
  }
  // the group's first row and column (one division per group, none per sample)
  const int64_t r0 = A.cols ? G.base / A.cols : 0, c0 = A.cols ? G.base - r0 * A.cols : 0;
  const bool whole = G.nl == L && G.step == 1 && (S != BITS || c0 + L <= A.cols);
  if (A.batch == 1) {  // pulse(): one sample, every pulse of a lane has one sign
    const vi n = group_counts<S>(A, G, 0, whole, r0, c0);
    if (!any(n)) return false;
    G.total = n < 0 ? -n : n;
    int32_t tmax = 0;
    for (int k = 0; k < L; ++k) tmax = std::max(tmax, G.total[k]);
    const int64_t words = (static_cast<int64_t>(tmax) + 31) / 32;
    if (static_cast<int64_t>(G.signs.size()) < words * L) G.signs.resize(words * L);
    const vu neg = (vu)(n < 0);
    for (int64_t w = 0; w < words; ++w) std::memcpy(G.signs.data() + w * L, &neg, sizeof(neg));
    G.tmax = tmax;
    load_devices<NOISY>(A, G);
    return true;
  }
  vu acc{};
  vi fill{}, word{}, total{};
  const vi full = vi{} + 32;
  const uint32_t may = A.live ? A.live[grp] : ~0u;  // samples that may have a coincidence
  auto next_sample = [&](int64_t b) -> int64_t {  // the first such sample from b on
    if (b < 31) {
      const uint32_t rest = (may & 0x7FFFFFFFu) >> b;
      if (rest) return b + __builtin_ctz(rest);
      b = 31;
    }
    return (may >> 31) ? b : A.batch;
  };
  for (int64_t b = next_sample(0); b < A.batch; b = next_sample(b + 1)) {
    const vi n = group_counts<S>(A, G, b, whole, r0, c0);
    if (!any(n)) continue;
    const vi m = n < 0 ? -n : n;
    total += m;
    if (any(m > 32)) {  // long runs (pulse() with |n| > 32): one bit at a time
      for (int k = 0; k < L; ++k) {
        for (int32_t q = 0; q < m[k]; ++q) {
          if (n[k] < 0) acc[k] |= 1u << fill[k];
          if (++fill[k] == 32) {
            if (static_cast<size_t>((word[k] + 1) * L) > G.signs.size())
              G.signs.resize(static_cast<size_t>((word[k] + 1) * L) * 2);
            G.signs[word[k]++ * L + k] = acc[k];
            acc[k] = 0;
            fill[k] = 0;
          }
        }
      }
      continue;
    }
    // ones = 2^m - 1 where negative (m <= 32), placed at fill; bits past 32 spill over
    const vu ones = (n < 0) & (m > 0) ? (vu)(m == full ? vi{} - 1 : (vi)(((vu{} + 1u) << (vu)m) - 1u))
                                      : vu{};
    acc |= ones << (vu)fill;
    const vu spill = fill > 0 ? ones >> (vu)(full - fill) : vu{};
    fill += m;
    const vi done = fill >= full;
    if (any(done)) {
      const int64_t need = (static_cast<int64_t>(*std::max_element(
          reinterpret_cast<const int32_t*>(&word), reinterpret_cast<const int32_t*>(&word) + L))
          + 1) * L;
      if (static_cast<int64_t>(G.signs.size()) < need) G.signs.resize(need * 2);
      for (int k = 0; k < L; ++k)
        if (done[k]) G.signs[word[k] * L + k] = acc[k];
      acc = done ? spill : acc;
      fill -= done & full;
      word -= done;  // done lanes are -1
    }
  }
  int32_t tmax = 0;
  for (int k = 0; k < L; ++k) tmax = std::max(tmax, total[k]);
  if (tmax == 0) return false;
  const int64_t need = (static_cast<int64_t>(tmax) + 31) / 32 * L;
  if (static_cast<int64_t>(G.signs.size()) < need) G.signs.resize(need);
  if (!any(word)) {  // one sign word per lane (the usual case): store them at once
    std::memcpy(G.signs.data(), &acc, sizeof(acc));
  } else {
    for (int k = 0; k < L; ++k)  // the lanes' last, partial words
      if (fill[k] > 0) G.signs[word[k] * L + k] = acc[k];
  }
  G.total = total;
  G.tmax = tmax;
  load_devices<NOISY>(A, G);
  return true;
}

// Step `it` of G: every lane with pulses left applies its pulse number it. False once
// the group is through.
template <int F, bool NOISY>
inline bool step(const Args& A, Group& G) {
  if (G.it >= G.tmax) return false;
  const uint32_t it = static_cast<uint32_t>(G.it++);
  const vi act = G.total > static_cast<int32_t>(it);
  vu word;
  std::memcpy(&word, G.signs.data() + (it >> 5) * L, sizeof(word));
  const vi pos = ((word >> (it & 31)) & 1u) == 0u;
  vf v = vmax(pos ? G.hi - G.x : G.x - G.lo, splat(0.0f));
  vf dw = (pos ? G.kp : -G.km) * response<F>(v, G.gg, A.gamma);
  if constexpr (NOISY) {  // one pair of draws serves two steps (pulse_normal's pairs)
    vf z;
    if ((it & 1u) == 0u) pair_normals(G.h, vu{} + (it >> 1), z, G.zn);
    else z = G.zn;
    dw = dw * (1.0f + G.cc * z);
  }
  vf nx = vmin(vmax(G.x + dw, G.lo), G.hi);
  G.x = act ? nx : G.x;
  return true;
}

// devices [g0 * L, g1 * L): per lane, samples 0 .. batch-1 in order, |n_b| pulses each;
// the noise counter of a device runs over its pulses in this call (0, 1, 2, ...). A
// group takes as many steps as its busiest lane has pulses; groups without pulses are
// skipped. SLOTS groups are in flight at once (independent dependency chains for the
// out-of-order core); a slot whose group is through takes the next one.
template <int F, bool NOISY, int S>
void run_groups(const Args& A, int64_t g0, int64_t g1) {
  constexpr int SLOTS = 2;
  constexpr int AHEAD = 8;  // groups ahead whose device data is being prefetched
  Group G[SLOTS];
  bool live[SLOTS];
  // With the live map (outer updates) only its groups are candidates, listed first
  // (branch-free) and prefetched AHEAD in advance: sparse updates touch scattered groups
  // and would otherwise wait on memory at every load. Count maps are walked in order
  // (most groups of a sparse count map have no pulse: prefetching them would waste
  // bandwidth, and their counts are read anyway).
  std::vector<int64_t> ids;
  if (A.live) {
    ids.resize(static_cast<size_t>(g1 - g0));
    size_t n = 0;
    for (int64_t grp = g0; grp < g1; ++grp) {
      ids[n] = grp;
      n += A.live[grp] != 0;
    }
    ids.resize(n);
  }
  const int64_t candidates = A.live ? static_cast<int64_t>(ids.size()) : g1 - g0;
  auto prefetch = [&](int64_t i) {
    if (!A.live || i >= candidates) return;
    const int64_t base = ids[i] * L;
    __builtin_prefetch(A.w + base);
    if (A.coef_stride) {
      for (const float* a : {A.kp, A.km, A.tmin, A.tmax}) __builtin_prefetch(a + base);
      if (A.g) __builtin_prefetch(A.g + base);
    }
    if (NOISY && A.c2c_stride) __builtin_prefetch(A.c2c + base);
  };
  for (int64_t i = 0; i < AHEAD; ++i) prefetch(i);
  int64_t next = 0;  // the next candidate
  auto refill = [&](int s) {  // the next group with pulses into slot s, if any
    live[s] = false;
    while (!live[s] && next < candidates) {
      const int64_t grp = A.live ? ids[next] : g0 + next;
      prefetch(next + AHEAD);
      ++next;
      live[s] = load<NOISY, S>(A, G[s], grp);
    }
  };
  for (int s = 0; s < SLOTS; ++s) refill(s);
  for (;;) {
    bool busy = false;
    for (int s = 0; s < SLOTS; ++s) {
      if (!live[s]) continue;
      if (!step<F, NOISY>(A, G[s])) {
        if (G[s].nl == L && G[s].step == 1) std::memcpy(A.w + G[s].base, &G[s].x, sizeof(vf));
        else for (int k = 0; k < G[s].nl; ++k) A.w[G[s].base + k * G[s].step] = G[s].x[k];
        refill(s);
      }
      busy |= live[s];
    }
    if (!busy) break;
  }
}

template <int F, bool NOISY, int S>
void run_parallel(const Args& A, int nthreads) {
  const int64_t groups = !A.width ? (A.numel + L - 1) / L
                         : A.width < L ? A.width * ((A.rows + L - 1) / L)
                                       : A.rows * ((A.width + L - 1) / L);
  constexpr int64_t grab = 64;  // groups per work item: small enough to balance the load
  if (nthreads <= 1 || groups < 2 * grab) {
    run_groups<F, NOISY, S>(A, 0, groups);
    return;
  }
  std::atomic<int64_t> next{0};
  const int threads = static_cast<int>(std::min<int64_t>(nthreads, groups / grab));
#pragma omp parallel num_threads(threads)
  for (;;) {
    const int64_t g0 = next.fetch_add(grab);
    if (g0 >= groups) break;
    run_groups<F, NOISY, S>(A, g0, std::min(groups, g0 + grab));
  }
}

template <int F, bool NOISY>
int by_source(const Args& A, int source, int nthreads) {
  switch (source) {
    case COUNTS8: run_parallel<F, NOISY, COUNTS8>(A, nthreads); return 0;
    case COUNTS32: run_parallel<F, NOISY, COUNTS32>(A, nthreads); return 0;
    case BITS: run_parallel<F, NOISY, BITS>(A, nthreads); return 0;
    default: return 2;
  }
}

template <int F>
int by_noise(const Args& A, int noisy, int source, int nthreads) {
  return noisy ? by_source<F, true>(A, source, nthreads) : by_source<F, false>(A, source, nthreads);
}

// The OR of fx over each L columns and, per group (row r, columns L cg ..), the samples
// in which a slot has the row and one of those columns firing (see Args::live): lets
// groups skip samples and whole groups without coincidences. Only where cols % L == 0
// (else the arrays stay empty).
void coincidences(Args& A, std::vector<uint32_t>& colany, std::vector<uint32_t>& live,
                  int nthreads) {
  if (A.cols % L != 0) return;
  const int64_t ncg = A.cols / L;
  colany.assign(static_cast<size_t>(A.batch * A.words * ncg), 0u);
  for (int64_t bw = 0; bw < A.batch * A.words; ++bw)
    for (int64_t c = 0; c < A.cols; ++c)
      colany[bw * ncg + c / L] |= static_cast<uint32_t>(A.fx[bw * A.cols + c]);
  A.colany = colany.data();
  live.assign(static_cast<size_t>(A.rows * ncg), 0u);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < A.rows; ++r) {
    uint32_t* lr = live.data() + r * ncg;
    for (int64_t bw = 0; bw < A.batch * A.words; ++bw) {
      const uint32_t fr = static_cast<uint32_t>(A.fd[bw * A.rows + r]) & 0x7FFFFFFFu;
      if (fr == 0) continue;
      const uint32_t bit = 1u << std::min<int64_t>(bw / A.words, 31);
      const uint32_t* ca = colany.data() + bw * ncg;
      for (int64_t cg = 0; cg < ncg; ++cg) lr[cg] |= (ca[cg] & fr) != 0 ? bit : 0u;
    }
  }
  A.live = live.data();
}

int by_family(Args& A, int family, int noisy, int source, int nthreads) {
  std::vector<uint32_t> colany;
  std::vector<uint32_t> live;
  if (source == BITS) coincidences(A, colany, live, nthreads);
  switch (family) {
    case LINEAR: return by_noise<LINEAR>(A, noisy, source, nthreads);
    case SQRT: return by_noise<SQRT>(A, noisy, source, nthreads);
    case SQUARE: return by_noise<SQUARE>(A, noisy, source, nthreads);
    case POWER: return by_noise<POWER>(A, noisy, source, nthreads);
    case EXP: return by_noise<EXP>(A, noisy, source, nthreads);
    default: return 1;
  }
}

// Packed fire masks of pulse trains: out[b][k][j] bit t fires slot 31 k + t of line j
// in sample b when hash_uniform(key, (b * bl + slot) * n + j) < p[b][j] (as
// kernels.hash_uniform); bit 31 of word 0 is set where neg[b][j].
void fire_bits(const float* p, const uint8_t* neg, int64_t batch, int64_t n,
               int64_t train_length, uint32_t key, int32_t* out, int nthreads) {
  const int64_t words = (train_length + 30) / 31;
  const int64_t per_sample = (n + L - 1) / L;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t item = 0; item < batch * per_sample; ++item) {
    const int64_t b = item / per_sample, j0 = (item - b * per_sample) * L;
    {
      const int nl = static_cast<int>(std::min<int64_t>(L, n - j0));
      vf pj{};
      vu idx0;
      for (int k = 0; k < L; ++k) {
        pj[k] = k < nl ? p[b * n + j0 + k] : 0.0f;
        idx0[k] = static_cast<uint32_t>(b * train_length * n + j0 + k);
      }
      const bool fires = any((vi)(pj > 0.0f));  // u >= 0: lines with p = 0 never fire
      for (int64_t w = 0; w < words; ++w) {
        vu bits{};
        const int64_t t1 = fires ? std::min<int64_t>(31, train_length - 31 * w) : 0;
        for (int64_t t = 0; t < t1; ++t) {
          const vu idx = idx0 + static_cast<uint32_t>((31 * w + t) * n);
          const vu a = mix(mix(idx ^ key) + 0x68E31DA4u);
          const vf u = to_f((a >> 8) & 0xFFFFFFu) * (1.0f / 16777216.0f);
          bits |= (vu)(u < pj) & (1u << t);
        }
        for (int k = 0; k < nl; ++k) {
          uint32_t v = bits[k];
          if (w == 0 && neg[b * n + j0 + k]) v |= 0x80000000u;
          out[(b * words + w) * n + j0 + k] = static_cast<int32_t>(v);
        }
      }
    }
  }
}

// Per sample, the firing probabilities of one side, c |v_j| clipped to 1 with
// c = sqrt(k * other_max / own_max), and where its sign is negative (flip: of -v).
// The float operations are emulator._fire_probabilities' (same rounding).
void side_probabilities(const float* v, const float* vmax_own, const float* vmax_other,
                        int64_t batch, int64_t n, float k, bool flip, float* p, uint8_t* neg) {
  for (int64_t b = 0; b < batch; ++b) {
    const float c = std::sqrt(k * vmax_other[b] / vmax_own[b]);
    for (int64_t j = 0; j < n; ++j) {
      const float a = v[b * n + j];
      p[b * n + j] = std::min(c * std::fabs(a), 1.0f);
      neg[b * n + j] = flip ? a > 0.0f : a < 0.0f;
    }
  }
}

// max |v_j| of one row of n values (L running maxima: no serial dependency chain; a NaN
// is passed over, as std::max(m, NaN) does)
inline float row_abs_max(const float* v, int64_t n) {
  vf acc{};
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    vf a;
    std::memcpy(&a, v + j, sizeof(a));
    a = (vf)((vu)a & 0x7FFFFFFFu);
    acc = a > acc ? a : acc;
  }
  float m = 0.0f;
  for (int k = 0; k < L; ++k) m = std::max(m, acc[k]);
  for (; j < n; ++j) m = std::max(m, std::fabs(v[j]));
  return m;
}

// max |v| of each sample, at least 1e-30
void abs_max(const float* v, int64_t batch, int64_t n, float* out) {
  for (int64_t b = 0; b < batch; ++b) out[b] = std::max(row_abs_max(v + b * n, n), 1e-30f);
}

// Clip to +-bound, round to the converter's levels res (half to even, as torch.round).
// Rounding by adding and taking away 1.5 * 2^23 is nearbyint for |q| < 2^22 (a converter's
// level count is far below) and vectorizes (no contraction: -ffp-contract=off).
inline float quantize(float v, float bound, float res) {
  constexpr float MAGIC = 12582912.0f;  // 1.5 * 2^23
  const float q = std::min(std::max(v, -bound), bound) / res;
  return ((q + MAGIC) - MAGIC) * res;
}

// Row r of sum_k cs[k] W_k (arrays of `cols` columns), columns c0 .. c1-1, into out.
void summed_row(const float* const* ws, const float* cs, int nterms, int64_t cols, int64_t r,
                int64_t c0, int64_t c1, float* __restrict out) {
  const float* __restrict w0 = ws[0] + r * cols;
  if (cs[0] == 1.0f) std::memcpy(out, w0 + c0, sizeof(float) * (c1 - c0));
  else for (int64_t c = c0; c < c1; ++c) out[c - c0] = cs[0] * w0[c];
  for (int k = 1; k < nterms; ++k) {
    const float* __restrict wk = ws[k] + r * cols;
    const float ck = cs[k];
    for (int64_t c = c0; c < c1; ++c) out[c - c0] += ck * wk[c];
  }
}

// w[j .. j + L) + c2 w2[j .. j + L) (w2 null: w alone)
inline vf load_sum(const float* __restrict w, const float* __restrict w2, float c2, int64_t j) {
  vf v;
  std::memcpy(&v, w + j, sizeof(vf));
  if (w2) {
    vf v2;
    std::memcpy(&v2, w2 + j, sizeof(vf));
    v += c2 * v2;
  }
  return v;
}

// y[k * ystride] = <w + c2 w2, x_k> for the NB rows x_k = x + k * n of n values (w2 may
// be null): L-wide partial sums, two accumulators per row (even and odd vectors: short
// dependency chains), all sharing each load of the weights.
template <int NB>
inline void row_dots(const float* __restrict w, const float* __restrict w2, float c2,
                     const float* __restrict x, int64_t n, float* __restrict y,
                     int64_t ystride) {
  vf acc[2][NB];
  for (int k = 0; k < NB; ++k) acc[0][k] = acc[1][k] = vf{};
  const int64_t vend = n / L * L;
  int64_t j = 0;
  for (; j + 2 * L <= vend; j += 2 * L) {
    for (int h = 0; h < 2; ++h) {
      const vf wv = load_sum(w, w2, c2, j + h * L);
      for (int k = 0; k < NB; ++k) {
        vf xv;
        std::memcpy(&xv, x + k * n + j + h * L, sizeof(vf));
        acc[h][k] += wv * xv;
      }
    }
  }
  if (j < vend) {
    const vf wv = load_sum(w, w2, c2, j);
    for (int k = 0; k < NB; ++k) {
      vf xv;
      std::memcpy(&xv, x + k * n + j, sizeof(vf));
      acc[0][k] += wv * xv;
    }
  }
  for (int k = 0; k < NB; ++k) {
    const vf a = acc[0][k] + acc[1][k];
    float sum = 0.0f;
    for (int q = 0; q < L; ++q) sum += a[q];
    for (int64_t jj = vend; jj < n; ++jj)
      sum += (w2 ? w[jj] + c2 * w2[jj] : w[jj]) * x[k * n + jj];
    y[k * ystride] = sum;
  }
}

// y[0 .. n-1] += sum_r a[r] * w[r * stride + 0 .. n-1] over 4 rows (in that order)
inline void axpy4(const float* a, const float* __restrict w, int64_t stride,
                  float* __restrict y, int64_t n) {
  if (a[0] == 0.0f && a[1] == 0.0f && a[2] == 0.0f && a[3] == 0.0f) return;
  for (int64_t c = 0; c < n; ++c)
    y[c] += ((a[0] * w[c] + a[1] * w[stride + c]) + (a[2] * w[2 * stride + c] +
             a[3] * w[3 * stride + c]));
}

// the salt that separates the MVM output-noise stream of a call key from the pulse streams
constexpr uint32_t OUTPUT_SALT = 0x2545F491u;

// The output noise of one MVM call: the normal of output e (b n_out + i) is
// pulse_normal(mix(key ^ OUTPUT_SALT), e), as kernels.output_normals; one pair of draws
// serves outputs 2p and 2p + 1.
void output_normals(uint32_t key, int64_t n, float* z, int nthreads) {
  const vu h = vu{} + mix(key ^ OUTPUT_SALT);
  const int64_t blocks = ((n + 1) / 2 + L - 1) / L;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    vu p;
    for (int k = 0; k < L; ++k) p[k] = static_cast<uint32_t>(blk * L + k);
    vf z0, z1;
    pair_normals(h, p, z0, z1);
    const int64_t e0 = 2 * blk * L;
    if (e0 + 2 * L <= n) {  // a whole block: interleave by two shuffles
#if defined(__clang__)
      const vf lo = __builtin_shufflevector(z0, z1, 0, 8, 1, 9, 2, 10, 3, 11);
      const vf hi = __builtin_shufflevector(z0, z1, 4, 12, 5, 13, 6, 14, 7, 15);
#else
      const vf lo = __builtin_shuffle(z0, z1, vi{0, 8, 1, 9, 2, 10, 3, 11});
      const vf hi = __builtin_shuffle(z0, z1, vi{4, 12, 5, 13, 6, 14, 7, 15});
#endif
      std::memcpy(z + e0, &lo, sizeof(lo));
      std::memcpy(z + e0 + L, &hi, sizeof(hi));
      continue;
    }
    for (int k = 0; k < L; ++k) {
      if (e0 + 2 * k < n) z[e0 + 2 * k] = z0[k];
      if (e0 + 2 * k + 1 < n) z[e0 + 2 * k + 1] = z1[k];
    }
  }
}

// The DAC: scale[b] = max(max_j |x[b][j]|, 1e-12) / inp_bound (noise management), xq =
// x / scale quantized to levels inp_res apart within +-inp_bound.
void dac(const float* x, int64_t batch, int64_t n_in, float inp_bound, float inp_res,
         float* xq, float* scale) {
  for (int64_t b = 0; b < batch; ++b) {
    const float s = std::max(row_abs_max(x + b * n_in, n_in), 1e-12f) / inp_bound;
    scale[b] = s;
    for (int64_t j = 0; j < n_in; ++j)
      xq[b * n_in + j] = quantize(x[b * n_in + j] / s, inp_bound, inp_res);
  }
}

// The ADC, in place: y = quantize(y + sigma * noise) * scale[b], to out_res levels within
// +-out_bound; the noise drawn here from key (keyed, as output_normals), or none.
void adc(float* y, int64_t batch, int64_t n_out, int keyed, int32_t key, float sigma,
         float out_bound, float out_res, const float* scale, int nthreads) {
  std::vector<float> noise;
  if (keyed) {
    noise.resize(static_cast<size_t>(batch * n_out));
    output_normals(static_cast<uint32_t>(key), batch * n_out, noise.data(),
                   batch * n_out >= (1 << 14) ? nthreads : 1);
  }
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < n_out; ++i) {
      float v = y[b * n_out + i];
      if (keyed) v = v + sigma * noise[b * n_out + i];
      y[b * n_out + i] = quantize(v, out_bound, out_res) * scale[b];
    }
  }
}

}  // namespace

extern "C" {

// Apply batch samples of signed pulse counts to w [numel] in place; 0 on success.
// family: 0 linear, 1 power 0.5, 2 power 2, 3 power (gamma, or per-device g if gamma is
// NaN), 4 exp; source: 0 int8 counts, 1 int32 counts. width > 0: the counts
// [batch, rows, width] are those of columns col0 .. col0 + width - 1 only (the others get
// no pulse); devices keep their tile index for the noise streams.
int hil_pulse_trains(float* w, int64_t numel, int64_t rows, int64_t cols, int64_t batch,
                     int source, const void* counts, int family, int noisy, const float* kp,
                     const float* km, const float* tmin, const float* tmax, const float* g,
                     int64_t coef_stride, const float* c2c, int64_t c2c_stride, float gamma,
                     int32_t key, int nthreads, int64_t col0, int64_t width) {
  if (numel <= 0 || batch <= 0) return 0;
  if (source != COUNTS8 && source != COUNTS32) return 2;
  Args A{w, numel, rows, cols, batch, 0, counts, nullptr, nullptr, kp, km, tmin, tmax, g,
         coef_stride, c2c, c2c_stride, gamma, static_cast<uint32_t>(key)};
  A.cstride = width > 0 ? rows * width : numel;
  A.col0 = col0;
  A.width = width;
  return by_family(A, family, noisy, source, nthreads);
}

// The whole outer update of a rows x cols tile from x [batch, cols], d [batch, rows]:
// the pulse trains' probabilities (update management, emulator._fire_probabilities),
// their fire masks under the keys kx (columns) and kd (rows), then the pulses. k is
// |lr| / (dw_min * train_length); flip: lr < 0.
int hil_outer_update(float* w, int64_t rows, int64_t cols, const float* x, const float* d,
                     int64_t batch, double k, int flip, int64_t train_length, int32_t kx,
                     int32_t kd, int family, int noisy, const float* kp, const float* km,
                     const float* tmin, const float* tmax, const float* g, int64_t coef_stride,
                     const float* c2c, int64_t c2c_stride, float gamma, int32_t key,
                     int nthreads) {
  if (rows <= 0 || cols <= 0 || batch <= 0) return 0;
  const int64_t words = (train_length + 30) / 31;
  std::vector<float> xmax(batch), dmax(batch), px(batch * cols), pd(batch * rows);
  std::vector<uint8_t> nx(batch * cols), nd(batch * rows);
  std::vector<int32_t> fx(batch * words * cols), fd(batch * words * rows);
  abs_max(x, batch, cols, xmax.data());
  abs_max(d, batch, rows, dmax.data());
  const float kf = static_cast<float>(k);
  side_probabilities(x, xmax.data(), dmax.data(), batch, cols, kf, false, px.data(), nx.data());
  side_probabilities(d, dmax.data(), xmax.data(), batch, rows, kf, flip != 0, pd.data(),
                     nd.data());
  fire_bits(px.data(), nx.data(), batch, cols, train_length, static_cast<uint32_t>(kx),
            fx.data(), nthreads);
  fire_bits(pd.data(), nd.data(), batch, rows, train_length, static_cast<uint32_t>(kd),
            fd.data(), nthreads);
  Args A{w, rows * cols, rows, cols, batch, words, nullptr, fd.data(), fx.data(), kp, km,
         tmin, tmax, g, coef_stride, c2c, c2c_stride, gamma, static_cast<uint32_t>(key)};
  return by_family(A, family, noisy, BITS, nthreads);
}

// A whole MVM through the periphery: y [batch, n_out] from x [batch, n_in] and the weighted
// sum of nterms arrays ws[k] [rows, cols] with coefficients cs[k] (transpose: x [batch,
// rows], y = x sum_k cs[k] W_k, n_out = cols; else y = x (sum_k cs[k] W_k)^T, n_out = rows).
// The DAC side: scale[b] = max(max_j |x[b][j]|, 1e-12) / inp_bound, x / scale quantized to
// levels inp_res apart; the ADC side: (y + sigma * noise) quantized to out_res levels of
// +-out_bound, times scale[b] (the noise drawn here from key when keyed, as
// output_normals; else none). SimTile.mvm's torch ops, with the products summed in another
// order (float rounding apart, the same outputs).
void hil_mvm(const float* x, int64_t batch, int64_t rows, int64_t cols, int transpose,
             int nterms, const float* const* ws, const float* cs, int keyed, int32_t key,
             float sigma, float inp_bound, float inp_res, float out_bound, float out_res,
             float* y, int nthreads) {
  const int64_t n_in = transpose ? rows : cols, n_out = transpose ? cols : rows;
  std::vector<float> xq(static_cast<size_t>(batch * n_in)), scale(batch);
  dac(x, batch, n_in, inp_bound, inp_res, xq.data(), scale.data());
  // W_0 + c_1 W_1 is summed on the fly; other sums are built row by row
  const bool fused = cs[0] == 1.0f && nterms <= 2;
  if (!transpose) {  // y[b][i] = <xq[b], w_i>, samples in blocks sharing the row's loads
#pragma omp parallel num_threads(nthreads)
    {
      std::vector<float> wrow(fused ? 0 : static_cast<size_t>(cols));
#pragma omp for schedule(static)
      for (int64_t i = 0; i < rows; ++i) {
        const float* wi = ws[0] + i * cols;
        const float* w2 = nterms == 2 && fused ? ws[1] + i * cols : nullptr;
        const float c2 = nterms == 2 ? cs[1] : 0.0f;
        if (!fused) {
          summed_row(ws, cs, nterms, cols, i, 0, cols, wrow.data());
          wi = wrow.data();
        }
        const float* xb = xq.data();
        float* yi = y + i;
        int64_t b = 0;
        for (; b + 4 <= batch; b += 4)
          row_dots<4>(wi, w2, c2, xb + b * n_in, n_in, yi + b * n_out, n_out);
        switch (batch - b) {
          case 3: row_dots<3>(wi, w2, c2, xb + b * n_in, n_in, yi + b * n_out, n_out); break;
          case 2: row_dots<2>(wi, w2, c2, xb + b * n_in, n_in, yi + b * n_out, n_out); break;
          case 1: row_dots<1>(wi, w2, c2, xb + b * n_in, n_in, yi + b * n_out, n_out); break;
          default: break;
        }
      }
    }
  } else {  // y[b][:] += xq[b][i] w_i: each thread owns a range of output columns
    std::fill(y, y + batch * n_out, 0.0f);
    const int64_t chunks = (n_out + L - 1) / L;
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
      const int t = 0, nt = 1;
#endif
      const int64_t c0 = chunks * t / nt * L, c1 = std::min(n_out, chunks * (t + 1) / nt * L);
      const int64_t width = std::max<int64_t>(c1 - c0, 0);
      std::vector<float> wrows(static_cast<size_t>(4 * width));
      for (int64_t i0 = 0; width > 0 && i0 < rows; i0 += 4) {  // 4 rows per pass over y
        const int nr = static_cast<int>(std::min<int64_t>(4, rows - i0));
        for (int r = 0; r < nr; ++r)
          summed_row(ws, cs, nterms, cols, i0 + r, c0, c1, wrows.data() + r * width);
        for (int r = nr; r < 4; ++r)
          std::fill(wrows.data() + r * width, wrows.data() + (r + 1) * width, 0.0f);
        for (int64_t b = 0; b < batch; ++b) {
          const float* xb = xq.data() + b * n_in + i0;
          float a[4];
          for (int r = 0; r < 4; ++r) a[r] = r < nr ? xb[r] : 0.0f;
          axpy4(a, wrows.data(), width, y + b * n_out + c0, width);
        }
      }
    }
  }
  adc(y, batch, n_out, keyed, key, sigma, out_bound, out_res, scale.data(), nthreads);
}

// The periphery alone, for an MVM whose product runs elsewhere (torch's BLAS on large
// ones): hil_dac gives xq and scale (as hil_mvm's DAC side), hil_adc turns the product y
// into the outputs in place (as hil_mvm's ADC side).
void hil_dac(const float* x, int64_t batch, int64_t n_in, float inp_bound, float inp_res,
             float* xq, float* scale) {
  dac(x, batch, n_in, inp_bound, inp_res, xq, scale);
}

void hil_adc(float* y, int64_t batch, int64_t n_out, int keyed, int32_t key, float sigma,
             float out_bound, float out_res, const float* scale, int nthreads) {
  adc(y, batch, n_out, keyed, key, sigma, out_bound, out_res, scale, nthreads);
}

// 1 when built with OpenMP (the kernel's loops run on torch's OpenMP threads), else 0.
int hil_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// The normal of pulse t of stream h, for tests against kernels.pulse_normal.
float hil_pulse_normal(int32_t h, int32_t t) {
  return pulse_normal(vu{} + static_cast<uint32_t>(h), vu{} + static_cast<uint32_t>(t))[0];
}

}  // extern "C"
