// Winograd F(4x4, 3x3) transforms for XLA:CPU, as XLA FFI custom calls (jaxres.native).
//
// The four data transforms of jaxres.conv.winograd_conv3x3 with m = 4, alpha = 6, in the
// layouts of jaxres/conv.py: activations NHWC, Winograd-domain tensors (36, P, C) with
// P = N * TH * TW tiles (tile (t, s) of image n is p = (n * TH + t) * TW + s, TH =
// ceil(H / 4)) and coordinate (a, b) at index 6 a + b (a along H, b along W).
//
//   input_transform            x (N, H, W, C)  -> V (36, P, C)   V = B^T d B
//   input_transform_adjoint    dV (36, P, C)   -> dx (N, H, W, C) overlap-add of B dV B^T
//   output_transform           M (36, P, K)    -> y (N, H, W, K)  Y = A^T M A
//   output_transform_adjoint   dy (N, H, W, K) -> dM (36, P, K)   dM = A dY A^T
//   output_transform_pool      M -> y (N, H/2, W/2, K) and a uint8 mask of each 2x2
//                              window's maxima: output_transform, then max pooling
//   output_transform_pool_adjoint  dy, mask (N, H/2, W/2, K) -> dM (36, P, K)
//
// Input tile (t, s) covers pixels 4t-1 .. 4t+4 by 4s-1 .. 4s+4 (padding 1; pixels outside
// the image are zeros); output tile (t, s) is pixels 4t .. 4t+3 by 4s .. 4s+3, cropped to
// H x W. XLA's own fusions of the same transforms (jaxres/conv.py) are memory-bound
// passes that reach about half this code's bandwidth on a 2-core CPU: here each tile
// is transformed in one pass over channel blocks, on `threads` threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int KB = 64;  // channels per block: a tile's 36 x KB floats stay in L1

// Rows of B^T (6 x 6) applied to six vectors d0..d5 (length n), written to out[0..5].
inline void bt6(const float* d0, const float* d1, const float* d2, const float* d3,
                const float* d4, const float* d5, float (*out)[KB], int n) {
  for (int k = 0; k < n; ++k) {
    const float a = d4[k] - 4.f * d2[k], b = d3[k] - 4.f * d1[k];
    const float c = d4[k] - d2[k], e = 2.f * (d3[k] - d1[k]);
    out[0][k] = 4.f * d0[k] - 5.f * d2[k] + d4[k];
    out[1][k] = a + b;
    out[2][k] = a - b;
    out[3][k] = c + e;
    out[4][k] = c - e;
    out[5][k] = 4.f * d1[k] - 5.f * d3[k] + d5[k];
  }
}

// B (6 x 6) applied to six vectors v0..v5: out[r] = sum_a BT[a][r] v_a, r = 0..5.
inline void b6(const float* v0, const float* v1, const float* v2, const float* v3,
               const float* v4, const float* v5, float (*out)[KB], int n) {
  for (int k = 0; k < n; ++k) {
    out[0][k] = 4.f * v0[k];
    out[1][k] = -4.f * v1[k] + 4.f * v2[k] - 2.f * v3[k] + 2.f * v4[k] + 4.f * v5[k];
    out[2][k] = -5.f * v0[k] - 4.f * v1[k] - 4.f * v2[k] - v3[k] - v4[k];
    out[3][k] = v1[k] - v2[k] + 2.f * v3[k] - 2.f * v4[k] - 5.f * v5[k];
    out[4][k] = v0[k] + v1[k] + v2[k] + v3[k] + v4[k];
    out[5][k] = v5[k];
  }
}

// Rows of A^T (4 x 6) applied to six vectors m0..m5: out[0..3].
inline void at4(const float* m0, const float* m1, const float* m2, const float* m3,
                const float* m4, const float* m5, float (*out)[KB], int n) {
  for (int k = 0; k < n; ++k) {
    const float s12 = m1[k] + m2[k], d12 = m1[k] - m2[k];
    const float s34 = m3[k] + m4[k], d34 = m3[k] - m4[k];
    out[0][k] = m0[k] + s12 + s34;
    out[1][k] = d12 + 2.f * d34;
    out[2][k] = s12 + 4.f * s34;
    out[3][k] = d12 + 8.f * d34 + m5[k];
  }
}

// A (6 x 4) applied to four vectors y0..y3: out[a] = sum_i AT[i][a] y_i, a = 0..5.
inline void a6(const float* y0, const float* y1, const float* y2, const float* y3,
               float (*out)[KB], int n) {
  for (int k = 0; k < n; ++k) {
    const float s02 = y0[k] + y2[k], s13 = y1[k] + y3[k];
    const float t02 = y0[k] + 4.f * y2[k], t13 = 2.f * y1[k] + 8.f * y3[k];
    out[0][k] = y0[k];
    out[1][k] = s02 + s13;
    out[2][k] = s02 - s13;
    out[3][k] = t02 + t13;
    out[4][k] = t02 - t13;
    out[5][k] = y3[k];
  }
}

// dst[0 .. kb) = src[0 .. kb) (src 32-byte aligned). Where dst starts a cache line and
// kb fills whole lines, with non-temporal stores: the transforms' results (hundreds of
// MB) are read back only by the next op, long after they would have left the cache,
// and ordinary stores would first read every destination line from memory
// (BENCHMARKS.md). Writers call Fence() when done.
inline void Store(float* dst, const float* src, int kb) {
#if defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0 && kb % 16 == 0) {
    for (int k = 0; k < kb; k += 8) _mm256_stream_ps(dst + k, _mm256_load_ps(src + k));
    return;
  }
#endif
  std::memcpy(dst, src, kb * sizeof(float));
}

// The same for bytes.
inline void StoreBytes(uint8_t* dst, const uint8_t* src, int kb) {
#if defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0 && kb % 64 == 0) {
    for (int k = 0; k < kb; k += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + k),
                          _mm256_load_si256(reinterpret_cast<const __m256i*>(src + k)));
    return;
  }
#endif
  std::memcpy(dst, src, kb);
}

inline void Fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

struct Shape {
  int64_t n, h, w, c, th, tw, p;
};

Shape MakeShape(int64_t n, int64_t h, int64_t w, int64_t c) {
  const int64_t th = (h + 3) / 4, tw = (w + 3) / 4;
  return {n, h, w, c, th, tw, n * th * tw};
}

template <typename Fn>
void Parallel(int64_t count, int64_t threads, Fn fn) {
  threads = std::max<int64_t>(1, std::min(threads, count));
  if (threads == 1) {
    fn(0, count);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t r = 0; r < threads; ++r)
    pool.emplace_back(fn, count * r / threads, count * (r + 1) / threads);
  for (auto& t : pool) t.join();
}

alignas(64) const float kZeros[KB] = {};

// fn(n, t, u, p, k0, kb) for tiles p0 .. p1 - 1 (tile (t, u) of image n) and each block of
// kb <= KB channels starting at k0.
template <typename Fn>
inline void ForTileBlocks(const Shape& s, int64_t p0, int64_t p1, Fn fn) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = p / (s.th * s.tw), t = (p / s.tw) % s.th, u = p % s.tw;
    for (int64_t k0 = 0; k0 < s.c; k0 += KB)
      fn(n, t, u, p, k0, static_cast<int>(std::min<int64_t>(KB, s.c - k0)));
  }
}

// Tiles whose results InputTiles gathers per write: where one tile's channels do not
// fill whole cache lines (fast.py's first convolution: 24 channels, 96 bytes per tile and
// coordinate) a few consecutive tiles do (two: 192 bytes), which non-temporal stores need.
inline int TilesPerWrite(int64_t c) {
  if (c % 16 == 0 || c > KB) return 1;
  for (int g = 2; g <= 4; ++g)
    if ((g * c) % 16 == 0) return g;
  return 1;
}

void InputTiles(const float* x, float* v, const Shape& s, int64_t p0, int64_t p1) {
  alignas(64) float rows[6][6][KB];  // [image row i][coordinate b]
  alignas(64) float out[6][KB];
  alignas(64) float staged[36][4 * KB];  // TilesPerWrite > 1: [coordinate][tile, channel]
  const int64_t stride = s.p * s.c;
  const int group = TilesPerWrite(s.c);
  int64_t first = p0;  // the first tile in `staged`
  ForTileBlocks(s, p0, p1, [&](int64_t n, int64_t t, int64_t u, int64_t p, int64_t k0, int kb) {
    for (int i = 0; i < 6; ++i) {  // B^T along W, for each of the 6 rows of the tile
      const int64_t y = 4 * t - 1 + i;
      const float* d[6];
      for (int j = 0; j < 6; ++j) {
        const int64_t xx = 4 * u - 1 + j;
        d[j] = (y < 0 || y >= s.h || xx < 0 || xx >= s.w)
                   ? kZeros
                   : x + ((n * s.h + y) * s.w + xx) * s.c + k0;
      }
      bt6(d[0], d[1], d[2], d[3], d[4], d[5], rows[i], kb);
    }
    for (int b = 0; b < 6; ++b) {  // B^T along H
      bt6(rows[0][b], rows[1][b], rows[2][b], rows[3][b], rows[4][b], rows[5][b], out, kb);
      for (int a = 0; a < 6; ++a) {
        if (group == 1)
          Store(v + (6 * a + b) * stride + p * s.c + k0, out[a], kb);
        else  // one channel block (c <= KB): k0 = 0, kb = c
          std::memcpy(staged[6 * a + b] + (p - first) * kb, out[a], kb * sizeof(float));
      }
    }
    if (group > 1 && ((p + 1) % group == 0 || p + 1 == p1)) {
      for (int ab = 0; ab < 36; ++ab)
        Store(v + ab * stride + first * s.c, staged[ab], static_cast<int>((p + 1 - first) * s.c));
      first = p + 1;
    }
  });
  Fence();
}

// Images n0 .. n1 - 1 whole (their tiles overlap each other, not other images').
void InputAdjointImages(const float* dv, float* dx, const Shape& s, int64_t n0, int64_t n1) {
  alignas(64) float cols[6][6][KB];  // [coordinate a][tile column j]
  alignas(64) float out[6][KB];
  const int64_t stride = s.p * s.c;
  const int64_t image = s.h * s.w * s.c, tiles = s.th * s.tw;
  std::memset(dx + n0 * image, 0, (n1 - n0) * image * sizeof(float));
  ForTileBlocks(s, n0 * tiles, n1 * tiles,
                [&](int64_t n, int64_t t, int64_t u, int64_t p, int64_t k0, int kb) {
    const float* base = dv + p * s.c + k0;
    for (int a = 0; a < 6; ++a) {  // B along W: cols[a][j] = sum_b BT[b][j] dV[a][b]
      const float* r = base + 6 * a * stride;
      b6(r, r + stride, r + 2 * stride, r + 3 * stride, r + 4 * stride, r + 5 * stride,
         cols[a], kb);
    }
    for (int j = 0; j < 6; ++j) {  // B along H, added onto the image
      const int64_t xx = 4 * u - 1 + j;
      if (xx < 0 || xx >= s.w) continue;
      b6(cols[0][j], cols[1][j], cols[2][j], cols[3][j], cols[4][j], cols[5][j], out, kb);
      for (int i = 0; i < 6; ++i) {
        const int64_t y = 4 * t - 1 + i;
        if (y < 0 || y >= s.h) continue;
        float* dst = dx + ((n * s.h + y) * s.w + xx) * s.c + k0;
        for (int k = 0; k < kb; ++k) dst[k] += out[i][k];
      }
    }
  });
}

// Y = A^T M A for tile p, channels k0 .. k0 + kb - 1: y[i][j] is output pixel
// (4 t + i, 4 u + j).
inline void OutputTile(const float* m, const Shape& s, int64_t p, int64_t k0, int kb,
                       float (*y)[4][KB]) {
  alignas(64) float rows[4][6][KB];  // [output row i][coordinate b]
  alignas(64) float tmp[4][KB];
  const int64_t stride = s.p * s.c;
  const float* base = m + p * s.c + k0;
  for (int b = 0; b < 6; ++b) {  // A^T along H (coordinate a)
    const float* r = base + b * stride;
    at4(r, r + 6 * stride, r + 12 * stride, r + 18 * stride, r + 24 * stride,
        r + 30 * stride, tmp, kb);
    for (int i = 0; i < 4; ++i) std::memcpy(rows[i][b], tmp[i], kb * sizeof(float));
  }
  for (int i = 0; i < 4; ++i)  // A^T along W
    at4(rows[i][0], rows[i][1], rows[i][2], rows[i][3], rows[i][4], rows[i][5], y[i], kb);
}

// dM = A dY A^T for tile p, channels k0 .. k0 + kb - 1, from d[i][j] -> kb floats of
// the output gradient at pixel (4 t + i, 4 u + j).
inline void OutputAdjointTile(const float* const (&d)[4][4], float* dm, const Shape& s,
                              int64_t p, int64_t k0, int kb) {
  alignas(64) float rows[4][6][KB];  // [output row i][coordinate b]
  alignas(64) float out[6][KB];
  const int64_t stride = s.p * s.c;
  for (int i = 0; i < 4; ++i)  // A along W, for each output row of the tile
    a6(d[i][0], d[i][1], d[i][2], d[i][3], rows[i], kb);
  for (int b = 0; b < 6; ++b) {  // A along H
    a6(rows[0][b], rows[1][b], rows[2][b], rows[3][b], out, kb);
    for (int a = 0; a < 6; ++a) Store(dm + (6 * a + b) * stride + p * s.c + k0, out[a], kb);
  }
}

void OutputTiles(const float* m, float* y, const Shape& s, int64_t p0, int64_t p1) {
  alignas(64) float tile[4][4][KB];
  ForTileBlocks(s, p0, p1, [&](int64_t n, int64_t t, int64_t u, int64_t p, int64_t k0, int kb) {
    OutputTile(m, s, p, k0, kb, tile);
    for (int i = 0; i < 4 && 4 * t + i < s.h; ++i)
      for (int j = 0; j < 4 && 4 * u + j < s.w; ++j)
        Store(y + ((n * s.h + 4 * t + i) * s.w + 4 * u + j) * s.c + k0, tile[i][j], kb);
  });
  Fence();
}

void OutputAdjointTiles(const float* dy, float* dm, const Shape& s, int64_t p0, int64_t p1) {
  ForTileBlocks(s, p0, p1, [&](int64_t n, int64_t t, int64_t u, int64_t p, int64_t k0, int kb) {
    const float* d[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t yy = 4 * t + i, xx = 4 * u + j;
        d[i][j] = (yy >= s.h || xx >= s.w) ? kZeros : dy + ((n * s.h + yy) * s.w + xx) * s.c + k0;
      }
    OutputAdjointTile(d, dm, s, p, k0, kb);
  });
  Fence();
}

// The output transform followed by 2x2 max pooling (stride 2, a remainder row or column
// of the H x W output dropped): y (N, H / 2, W / 2, K) and, per pooled value, which of
// its window's four pixels (bit 2 r + c for pixel (r, c)) equal the maximum. A 2x2
// window never straddles two output tiles (they start at multiples of 4).
void OutputPoolTiles(const float* m, float* y, uint8_t* mask, const Shape& s, int64_t p0,
                     int64_t p1) {
  alignas(64) float tile[4][4][KB];
  alignas(64) float pooled[KB];
  alignas(64) uint8_t bits[KB];
  const int64_t hp = s.h / 2, wp = s.w / 2;
  ForTileBlocks(s, p0, p1, [&](int64_t n, int64_t t, int64_t u, int64_t p, int64_t k0, int kb) {
    OutputTile(m, s, p, k0, kb, tile);
    for (int qi = 0; qi < 2 && 2 * t + qi < hp; ++qi)
      for (int qj = 0; qj < 2 && 2 * u + qj < wp; ++qj) {
        const int64_t at = ((n * hp + 2 * t + qi) * wp + 2 * u + qj) * s.c + k0;
        const float* a = tile[2 * qi][2 * qj];
        const float* b = tile[2 * qi][2 * qj + 1];
        const float* c = tile[2 * qi + 1][2 * qj];
        const float* d = tile[2 * qi + 1][2 * qj + 1];
        for (int k = 0; k < kb; ++k) {
          const float v = std::max(std::max(a[k], b[k]), std::max(c[k], d[k]));
          pooled[k] = v;
          bits[k] = static_cast<uint8_t>((a[k] == v) | ((b[k] == v) << 1) |
                                         ((c[k] == v) << 2) | ((d[k] == v) << 3));
        }
        Store(y + at, pooled, kb);
        StoreBytes(mask + at, bits, kb);
      }
  });
  Fence();
}

// The adjoint of OutputPoolTiles: each pooled gradient goes to every pixel of its
// window that `mask` marks (as jaxres.layers.max_pool's gradient), then dM = A dY A^T.
void OutputPoolAdjointTiles(const float* dy, const uint8_t* mask, float* dm, const Shape& s,
                            int64_t p0, int64_t p1) {
  alignas(64) float grad[4][4][KB];
  const int64_t hp = s.h / 2, wp = s.w / 2;
  const float* d[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) d[i][j] = grad[i][j];
  ForTileBlocks(s, p0, p1, [&](int64_t n, int64_t t, int64_t u, int64_t p, int64_t k0, int kb) {
    for (int qi = 0; qi < 2; ++qi)
      for (int qj = 0; qj < 2; ++qj) {
        float* a = grad[2 * qi][2 * qj];
        float* b = grad[2 * qi][2 * qj + 1];
        float* c = grad[2 * qi + 1][2 * qj];
        float* e = grad[2 * qi + 1][2 * qj + 1];
        if (2 * t + qi >= hp || 2 * u + qj >= wp) {
          for (float* r : {a, b, c, e}) std::memset(r, 0, kb * sizeof(float));
          continue;
        }
        const int64_t at = ((n * hp + 2 * t + qi) * wp + 2 * u + qj) * s.c + k0;
        for (int k = 0; k < kb; ++k) {
          const float g = dy[at + k];
          const uint8_t bits = mask[at + k];
          a[k] = (bits & 1) ? g : 0.f;
          b[k] = (bits & 2) ? g : 0.f;
          c[k] = (bits & 4) ? g : 0.f;
          e[k] = (bits & 8) ? g : 0.f;
        }
      }
    OutputAdjointTile(d, dm, s, p, k0, kb);
  });
  Fence();
}

using Kernel = void (*)(const float*, float*, const Shape&, int64_t, int64_t);

// One transform: `kernel` over the tiles (or, for `by_image`, the images) of the
// activation's NHWC shape, which is the result's when `nhwc_result`, else the argument's.
template <Kernel kernel, bool nhwc_result, bool by_image>
ffi::Error Run(ffi::Buffer<ffi::F32> src, ffi::ResultBuffer<ffi::F32> dst, int64_t threads) {
  auto d = nhwc_result ? dst->dimensions() : src.dimensions();
  if (d.size() != 4)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "jaxres Winograd transform: the activation must be NHWC (rank 4)");
  const Shape s = MakeShape(d[0], d[1], d[2], d[3]);
  Parallel(by_image ? s.n : s.p, threads, [&](int64_t a, int64_t b) {
    kernel(src.typed_data(), dst->typed_data(), s, a, b);
  });
  return ffi::Error::Success();
}

constexpr auto InputTransformImpl = Run<InputTiles, false, false>;
constexpr auto InputTransformAdjointImpl = Run<InputAdjointImages, true, true>;
constexpr auto OutputTransformImpl = Run<OutputTiles, true, false>;
constexpr auto OutputTransformAdjointImpl = Run<OutputAdjointTiles, false, false>;

// The pooling transforms: `pooled` is (N, H / 2, W / 2, K); the convolution's output is
// N x h x w (attributes: h or w odd drops a remainder row or column).
ffi::Error PoolShape(ffi::Span<const int64_t> pooled, int64_t h, int64_t w, Shape* s) {
  if (pooled.size() != 4 || pooled[1] != h / 2 || pooled[2] != w / 2)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "jaxres Winograd pooling transform: the pooled activation must be "
                      "(N, h / 2, w / 2, K)");
  *s = MakeShape(pooled[0], h, w, pooled[3]);
  return ffi::Error::Success();
}

ffi::Error OutputPoolTransformImpl(ffi::Buffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> y,
                                   ffi::ResultBuffer<ffi::U8> mask, int64_t threads, int64_t h,
                                   int64_t w) {
  Shape s;
  ffi::Error error = PoolShape(y->dimensions(), h, w, &s);
  if (error.failure()) return error;
  Parallel(s.p, threads, [&](int64_t a, int64_t b) {
    OutputPoolTiles(m.typed_data(), y->typed_data(), mask->typed_data(), s, a, b);
  });
  return ffi::Error::Success();
}

ffi::Error OutputPoolTransformAdjointImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::U8> mask,
                                          ffi::ResultBuffer<ffi::F32> dm, int64_t threads,
                                          int64_t h, int64_t w) {
  Shape s;
  ffi::Error error = PoolShape(dy.dimensions(), h, w, &s);
  if (error.failure()) return error;
  Parallel(s.p, threads, [&](int64_t a, int64_t b) {
    OutputPoolAdjointTiles(dy.typed_data(), mask.typed_data(), dm->typed_data(), s, a, b);
  });
  return ffi::Error::Success();
}

}  // namespace

#define JAXRES_TRANSFORM(name, impl)                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,                                       \
                                ffi::Ffi::Bind()                                  \
                                    .Arg<ffi::Buffer<ffi::F32>>()                 \
                                    .Ret<ffi::Buffer<ffi::F32>>()                 \
                                    .Attr<int64_t>("threads"));

JAXRES_TRANSFORM(JaxresInputTransform, InputTransformImpl)
JAXRES_TRANSFORM(JaxresInputTransformAdjoint, InputTransformAdjointImpl)
JAXRES_TRANSFORM(JaxresOutputTransform, OutputTransformImpl)
JAXRES_TRANSFORM(JaxresOutputTransformAdjoint, OutputTransformAdjointImpl)

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxresOutputPoolTransform, OutputPoolTransformImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("h")
                                  .Attr<int64_t>("w"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxresOutputPoolTransformAdjoint, OutputPoolTransformAdjointImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("h")
                                  .Attr<int64_t>("w"));
