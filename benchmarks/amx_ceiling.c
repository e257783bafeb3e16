// What one core's AMX bf16 unit does on this machine, and how much of it a plain GEMM keeps.
// Built and run by amx_ceiling.py (which times torch's bf16 GEMM at the same shapes beside it);
// one JSON object per line on stdout. Single thread; Linux only (tile state via arch_prctl).
//
//   amx_ceiling peak           TDPBF16PS on tiles already in registers: 4 independent
//                              accumulators, random bf16 data (zeros run faster: power)
//   amx_ceiling fed SPAN_KB    the 2x2-tile step a GEMM runs (2 A + 2 B tiles loaded, 4 products)
//                              cycling through SPAN_KB of random data: L1, L2 or beyond
//   amx_ceiling gemm M K N     C[M,N] fp32 = A[M,K] x W[N,K]^T, bf16 operands packed in tiles
//                              (W once, A per call, timed), 2x2 tiles, A in blocks of 256 rows
//                              by 2048 (1 MiB) kept in L2 while W's 32-column panels go by (the next
//                              one prefetched meanwhile); checked against
//                              float64 sums of the same bf16 values
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct {
  uint8_t palette, start;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tilecfg;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
static uint16_t to_bf16(float f) {  // round to nearest even
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}
static double from_bf16(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static void fill(uint16_t* p, size_t n) {
  for (size_t i = 0; i < n; i++) p[i] = to_bf16((float)rand() / RAND_MAX - 0.5f);
}
static void tiles_on(void) {
  tilecfg c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int i = 0; i < 8; i++) {
    c.rows[i] = 16;
    c.colsb[i] = 64;
  }
  _tile_loadconfig(&c);
}

static void peak(void) {
  static uint16_t a[2][512] __attribute__((aligned(64))), b[2][512] __attribute__((aligned(64)));
  fill(&a[0][0], 1024);
  fill(&b[0][0], 1024);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, a[0], 64); _tile_loadd(5, a[1], 64); _tile_loadd(6, b[0], 64); _tile_loadd(7, b[1], 64);
  double best = 0;
  for (int rep = 0; rep < 3; rep++) {
    long n = 15000000;  // ~0.3 s
    double t = now();
    for (long i = 0; i < n; i++) {
      _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    t = now() - t;
    double r = n * 4.0 * 16384 / t / 1e9;
    if (r > best) best = r;
  }
  printf("{\"mode\": \"peak\", \"gflops\": %.1f}\n", best);
}

static void fed(size_t span_kb) {
  size_t tiles = span_kb;  // a tile is 1 KB
  if (tiles < 4) tiles = 4;
  uint16_t* buf = aligned_alloc(4096, tiles * 1024);
  fill(buf, tiles * 512);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  double best = 0;
  for (int rep = 0; rep < 3; rep++) {
    long n = 10000000;  // ~0.3 s from L1
    size_t p = 0;
    double t = now();
    for (long i = 0; i < n; i++) {
      const uint16_t* q = buf + p * 512;
      _tile_loadd(4, q, 64); _tile_loadd(6, q + 512, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, q + 1024, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, q + 1536, 64);
      _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      p += 4;
      if (p + 4 > tiles) p = 0;
    }
    t = now() - t;
    double r = n * 4.0 * 16384 / t / 1e9;
    if (r > best) best = r;
  }
  printf("{\"mode\": \"fed\", \"span_kb\": %zu, \"gflops\": %.1f}\n", span_kb, best);
  free(buf);
}

// Tiles of a pair of 16-row (A) or 16-column (W) blocks sit side by side for each 32-wide k step:
// block pair p, step kb at (p * KB + kb) * 1024 elements, the second block 512 further.
static void pack_w(const uint16_t* w, int n, int k, uint16_t* out) {  // VNNI: k pairs interleaved
  int kbs = k / 32;
  for (int nb = 0; nb < n / 16; nb++)
    for (int kb = 0; kb < kbs; kb++) {
      uint16_t* t = out + ((size_t)(nb / 2) * kbs + kb) * 1024 + (nb & 1) * 512;
      for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++)
          for (int u = 0; u < 2; u++) t[r * 32 + 2 * c + u] = w[(size_t)(nb * 16 + c) * k + kb * 32 + 2 * r + u];
    }
}
static void pack_a(const uint16_t* a, int m, int k, uint16_t* out) {
  int kbs = k / 32;
  for (int mb = 0; mb < m / 16; mb++)
    for (int kb = 0; kb < kbs; kb++) {
      uint16_t* t = out + ((size_t)(mb / 2) * kbs + kb) * 1024 + (mb & 1) * 512;
      for (int r = 0; r < 16; r++) memcpy(t + r * 32, a + (size_t)(mb * 16 + r) * k + kb * 32, 64);
    }
}
static void gemm_packed(const uint16_t* pa, const uint16_t* pw, float* c, int m, int n, int k) {
  int kbs = k / 32, kcs = 64;  // k in chunks of 2048: 256 rows of A by 2048 are 1 MiB, in L2
  for (int m0 = 0; m0 < m; m0 += 256) {
    int m1 = m0 + 256 < m ? m0 + 256 : m;
    for (int k0 = 0; k0 < kbs; k0 += kcs) {
      int k1 = k0 + kcs < kbs ? k0 + kcs : kbs;
      // each 32-row step also prefetches its share of the next panel's chunk (two lines a k step,
      // 9% on gate_up at 2,048 rows; more lines a step were slower, into L2 only no different)
      size_t share = (size_t)(k1 - k0) * 2048 / ((m1 - m0) / 32);
      for (int nb = 0; nb < n / 16; nb += 2) {
        const uint16_t* b = pw + (size_t)(nb / 2) * kbs * 1024;
        for (int mb = m0 / 16; mb < m1 / 16; mb += 2) {
          const uint16_t* a = pa + (size_t)(mb / 2) * kbs * 1024;
          const char* next = (const char*)(b + (size_t)(kbs + k0) * 1024) + (size_t)((mb - m0 / 16) / 2) * share;
          float* c0 = c + (size_t)mb * 16 * n + nb * 16;
          if (k0 == 0) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
          } else {  // the partial sums of the chunks before
            _tile_loadd(0, c0, n * 4); _tile_loadd(1, c0 + 16, n * 4);
            _tile_loadd(2, c0 + 16 * n, n * 4); _tile_loadd(3, c0 + 16 * n + 16, n * 4);
          }
          for (int kb = k0; kb < k1; kb++) {
            if (nb + 2 < n / 16 && (size_t)(kb - k0) * 128 < share) {
              _mm_prefetch(next + (size_t)(kb - k0) * 128, _MM_HINT_T0);
              _mm_prefetch(next + (size_t)(kb - k0) * 128 + 64, _MM_HINT_T0);
            }
            _tile_loadd(4, a + kb * 1024, 64); _tile_loadd(6, b + kb * 1024, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, b + kb * 1024 + 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(5, a + kb * 1024 + 512, 64);
            _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
          }
          _tile_stored(0, c0, n * 4); _tile_stored(1, c0 + 16, n * 4);
          _tile_stored(2, c0 + 16 * n, n * 4); _tile_stored(3, c0 + 16 * n + 16, n * 4);
        }
      }
    }
  }
}
static int gemm(int m, int k, int n) {
  if (m % 32 || n % 32 || k % 32) {
    fprintf(stderr, "gemm: M, K and N must be multiples of 32\n");
    return 2;
  }
  uint16_t *a = aligned_alloc(64, (size_t)m * k * 2), *w = aligned_alloc(64, (size_t)n * k * 2);
  uint16_t *pa = aligned_alloc(64, (size_t)m * k * 2), *pw = aligned_alloc(64, (size_t)n * k * 2);
  float* c = aligned_alloc(64, (size_t)m * n * 4);
  fill(a, (size_t)m * k);
  fill(w, (size_t)n * k);
  pack_w(w, n, k, pw);
  double best = 1e30;
  for (int rep = 0; rep < 3; rep++) {
    int calls = 0;
    double t = now();
    while (now() - t < 0.3 || calls == 0) {
      pack_a(a, m, k, pa);
      gemm_packed(pa, pw, c, m, n, k);
      calls++;
    }
    t = (now() - t) / calls;
    if (t < best) best = t;
  }
  double worst = 0;  // |error| / sum |terms| over 64 sampled outputs
  for (int s = 0; s < 64; s++) {
    int i = rand() % m, j = rand() % n;
    double ref = 0, mag = 0;
    for (int q = 0; q < k; q++) {
      double term = from_bf16(a[(size_t)i * k + q]) * from_bf16(w[(size_t)j * k + q]);
      ref += term;
      mag += fabs(term);
    }
    double e = fabs(ref - c[(size_t)i * n + j]) / mag;
    if (e > worst) worst = e;
  }
  printf("{\"mode\": \"gemm\", \"m\": %d, \"k\": %d, \"n\": %d, \"ms\": %.3f, \"gflops\": %.1f, \"rel_error\": %.2e}\n",
         m, k, n, best * 1e3, 2.0 * m * k * n / best / 1e9, worst);
  free(a); free(w); free(pa); free(pw); free(c);
  return 0;
}

int main(int argc, char** argv) {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) {
    perror("arch_prctl(ARCH_REQ_XCOMP_PERM): no AMX tile state");
    return 3;
  }
  srand(1);
  tiles_on();
  if (argc == 2 && !strcmp(argv[1], "peak")) peak();
  else if (argc == 3 && !strcmp(argv[1], "fed")) fed((size_t)atol(argv[2]));
  else if (argc == 5 && !strcmp(argv[1], "gemm")) return gemm(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
  else {
    fprintf(stderr, "usage: amx_ceiling peak | fed SPAN_KB | gemm M K N\n");
    return 2;
  }
  _tile_release();
  return 0;
}
