// CPU kernels for the multi-resolution hash-grid encoding (see gridinr_nerfstudio/hash_encoding.py).
//
// One kernel serves every grid convention: each level is described by its scale, dense-or-hashed
// flag, vertex resolution (dense indexing) and its slice of the flat parameter table (offset, size).
// Index math is uint32 with wrap-around, exactly as tiny-cuda-nn does it, so that dense levels
// wrap at the upper faces and hashes match bit for bit.
//
// Points are processed in blocks, one level at a time: a first loop computes the 8 corner indices
// and weights of every point of the block (branch-free, specialised per level kind, vectorisable),
// a second loop gathers (forward) or scatters (backward) the table rows. Parallelism (work_sharing.h: items
// claimed one at a time, never waiting for a thread that has not started): forward and position gradient share
// out blocks of points; the table gradient shares out levels, so each thread owns whole level slices of the
// gradient and needs no atomics; Adam shares out slices of the table. Every item's output depends only on its
// inputs, so results are bit-identical for any number of threads.
//
// For inference, field_forward fuses the encoding with the field's ReLU MLP decoder: each block of points is
// encoded and decoded while it is in cache (see field_forward_kernel).

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "work_sharing.h"

namespace {

constexpr uint32_t kPrimeY = 2654435761u;
constexpr uint32_t kPrimeZ = 805459861u;
constexpr int64_t kBlock = 256;
constexpr int64_t kPrefetchDistance = 8;  // points ahead whose 8 table rows are prefetched during gathers/scatters

template <typename scalar_t>
struct Level {
  scalar_t scale;
  uint32_t resolution;     // vertices per axis; only used by dense levels
  uint32_t resolution_sq;  // resolution^2, wrapped to uint32 like tiny-cuda-nn's stride
  uint32_t table_size;     // entries in this level's slice
  bool power_of_two;
  bool dense;
  int64_t table_offset;    // first entry of this level's slice
};

// level_info: int64 (L, 4) rows of [resolution, dense, table_offset, table_size]; scales: float64 (L,).
template <typename scalar_t>
std::vector<Level<scalar_t>> unpack_levels(const torch::Tensor& scales, const torch::Tensor& level_info) {
  TORCH_CHECK(level_info.dim() == 2 && level_info.size(1) == 4 && level_info.scalar_type() == torch::kInt64 &&
                  level_info.device().is_cpu(),
              "hash_grid: level_info must be an int64 CPU (L, 4) tensor");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == level_info.size(0) && scales.scalar_type() == torch::kFloat64 &&
                  scales.device().is_cpu(),
              "hash_grid: scales must be a float64 CPU (L,) tensor");
  const auto info = level_info.contiguous();
  const auto scale = scales.contiguous();
  const int64_t* row = info.data_ptr<int64_t>();
  const double* s = scale.data_ptr<double>();
  std::vector<Level<scalar_t>> levels(info.size(0));
  for (size_t l = 0; l < levels.size(); ++l, row += 4) {
    TORCH_CHECK(row[3] > 0 && row[3] < (int64_t{1} << 32) && row[2] >= 0,
                "hash_grid: level table sizes must be in [1, 2^32) and offsets non-negative");
    auto& lv = levels[l];
    lv.scale = static_cast<scalar_t>(s[l]);
    lv.resolution = static_cast<uint32_t>(row[0]);
    lv.resolution_sq = lv.resolution * lv.resolution;
    lv.dense = row[1] != 0;
    lv.table_offset = row[2];
    lv.table_size = static_cast<uint32_t>(row[3]);
    lv.power_of_two = (row[3] & (row[3] - 1)) == 0;
  }
  return levels;
}

// Positions of one block, transposed to structure-of-arrays for the vectorisable index loop.
template <typename scalar_t>
struct BlockPositions {
  alignas(64) scalar_t x[3][kBlock];
  int64_t count;
  bool in_unit_cube;  // every coordinate in [0, 1]: dense indices then wrap at most once (see locate_block)

  void load(const scalar_t* positions, int64_t start, int64_t n) {
    count = std::min(kBlock, n - start);
    bool inside = true;
    for (int64_t j = 0; j < count; ++j) {
      for (int d = 0; d < 3; ++d) {
        const scalar_t v = positions[3 * (start + j) + d];
        x[d][j] = v;
        inside &= v >= scalar_t(0) && v <= scalar_t(1);
      }
    }
    in_unit_cube = inside;
  }
};

// Corner c has offset (c & 1, (c >> 1) & 1, c >> 2) from the lower vertex; its weight multiplies the x, y and z
// factors in that order, like tiny-cuda-nn.
template <typename scalar_t>
struct BlockCells {
  alignas(64) uint32_t index[8][kBlock];
  alignas(64) scalar_t weight[8][kBlock];
  alignas(64) scalar_t frac[3][kBlock];
};

// Wrap kinds: a power-of-two slice masks; a dense level fed coordinates in [0, 1] reaches at most
// r^3 + r^2 + r < 2 T (the +0.5 shift can step one vertex past the upper face), so one conditional subtraction
// equals the modulo there and keeps the loop vectorisable; anything else takes the full modulo.
enum class Wrap { kMask, kSubtractOnce, kModulo };

template <typename scalar_t, bool kDense, Wrap kWrap>
void locate_block(const Level<scalar_t>& lv, const BlockPositions<scalar_t>& block, scalar_t shift,
                  BlockCells<scalar_t>& cells) {
  const scalar_t scale = lv.scale;
  const uint32_t stride_y = kDense ? lv.resolution : kPrimeY;
  const uint32_t stride_z = kDense ? lv.resolution_sq : kPrimeZ;
  const uint32_t size = lv.table_size;
  const uint32_t mask = size - 1u;
  auto wrap = [&](uint32_t raw) -> uint32_t {
    if constexpr (kWrap == Wrap::kMask) {
      return raw & mask;
    } else if constexpr (kWrap == Wrap::kSubtractOnce) {
      return raw >= size ? raw - size : raw;
    } else {
      return raw % size;
    }
  };
  auto combine = [](uint32_t a, uint32_t b, uint32_t c) -> uint32_t {
    if constexpr (kDense) {
      return a + b + c;
    } else {
      return a ^ b ^ c;
    }
  };
  for (int64_t j = 0; j < block.count; ++j) {
    uint32_t grid[3];
    scalar_t frac[3];
    for (int d = 0; d < 3; ++d) {
      const scalar_t p = block.x[d][j] * scale + shift;
      const scalar_t lower = std::floor(p);
      grid[d] = static_cast<uint32_t>(static_cast<int32_t>(lower));
      frac[d] = p - lower;
      cells.frac[d][j] = frac[d];
    }
    const uint32_t ax[2] = {grid[0], grid[0] + 1u};
    const uint32_t ay[2] = {grid[1] * stride_y, grid[1] * stride_y + stride_y};
    const uint32_t az[2] = {grid[2] * stride_z, grid[2] * stride_z + stride_z};
    const scalar_t wx[2] = {scalar_t(1) - frac[0], frac[0]};
    const scalar_t wy[2] = {scalar_t(1) - frac[1], frac[1]};
    const scalar_t wz[2] = {scalar_t(1) - frac[2], frac[2]};
    for (int c = 0; c < 8; ++c) {
      const int bx = c & 1, by = (c >> 1) & 1, bz = c >> 2;
      cells.index[c][j] = wrap(combine(ax[bx], ay[by], az[bz]));
      cells.weight[c][j] = wx[bx] * wy[by] * wz[bz];
    }
  }
}

template <typename scalar_t>
void locate(const Level<scalar_t>& lv, const BlockPositions<scalar_t>& block, scalar_t shift,
            BlockCells<scalar_t>& cells) {
  if (lv.power_of_two) {
    if (lv.dense) {
      locate_block<scalar_t, true, Wrap::kMask>(lv, block, shift, cells);
    } else {
      locate_block<scalar_t, false, Wrap::kMask>(lv, block, shift, cells);
    }
  } else if (lv.dense && block.in_unit_cube) {
    locate_block<scalar_t, true, Wrap::kSubtractOnce>(lv, block, shift, cells);
  } else if (lv.dense) {
    locate_block<scalar_t, true, Wrap::kModulo>(lv, block, shift, cells);
  } else {
    locate_block<scalar_t, false, Wrap::kModulo>(lv, block, shift, cells);
  }
}

// Hides part of the cache-miss latency of the random table rows of the finer levels.
template <int F, bool kForWrite, typename scalar_t>
inline void prefetch_rows(const scalar_t* table, const BlockCells<scalar_t>& cells, int64_t j, int64_t count) {
  if (j >= count) return;
  for (int c = 0; c < 8; ++c) {
    __builtin_prefetch(table + static_cast<int64_t>(cells.index[c][j]) * F, kForWrite ? 1 : 0);
  }
}

int64_t num_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

// What a thread needs for its blocks (heap: ~22 kB for float, twice that for double).
template <typename scalar_t>
struct BlockScratch {
  BlockPositions<scalar_t> block;
  BlockCells<scalar_t> cells;
};

template <typename scalar_t>
std::unique_ptr<BlockScratch<scalar_t>> make_block_scratch() {
  return std::make_unique<BlockScratch<scalar_t>>();
}

// Features of one block of points, level after level, into out_block (row = levels * F values per point).
template <typename scalar_t, int F>
inline void encode_block(const scalar_t* params, const std::vector<Level<scalar_t>>& levels, scalar_t shift,
                         const BlockPositions<scalar_t>& block, BlockCells<scalar_t>& cells, scalar_t* out_block) {
  const int64_t num_levels = static_cast<int64_t>(levels.size());
  const int64_t row = num_levels * F;
  for (int64_t l = 0; l < num_levels; ++l) {
    const auto& lv = levels[l];
    locate(lv, block, shift, cells);
    const scalar_t* table = params + lv.table_offset * F;
    for (int64_t j = 0; j < block.count; ++j) {
      prefetch_rows<F, false>(table, cells, j + kPrefetchDistance, block.count);
      scalar_t acc[F] = {};
      for (int c = 0; c < 8; ++c) {
        const scalar_t* entry = table + static_cast<int64_t>(cells.index[c][j]) * F;
        const scalar_t w = cells.weight[c][j];
        for (int f = 0; f < F; ++f) acc[f] += w * entry[f];
      }
      for (int f = 0; f < F; ++f) out_block[j * row + l * F + f] = acc[f];
    }
  }
}

template <typename scalar_t, int F>
void forward_kernel(const scalar_t* positions, const scalar_t* params, scalar_t* out, int64_t n,
                    const std::vector<Level<scalar_t>>& levels, scalar_t shift, int64_t threads) {
  const int64_t row = static_cast<int64_t>(levels.size()) * F;
  gridinr::parallel_items(num_blocks(n), threads, make_block_scratch<scalar_t>, [&](int64_t b, auto& scratch) {
    scratch->block.load(positions, b * kBlock, n);
    encode_block<scalar_t, F>(params, levels, shift, scratch->block, scratch->cells, out + b * kBlock * row);
  });
}

// One decoder layer for inference: weights transposed to (in, out) so the inner loop runs along the outputs.
template <typename scalar_t>
struct DenseLayer {
  const scalar_t* weight_t;
  const scalar_t* bias;  // nullptr: no bias
  int64_t in;
  int64_t out;
};

// The decoder's products may use FMA (unlike the index math, kept bit-identical to PyTorch by -ffp-contract=off).
#if defined(__GNUC__) && !defined(__clang__)
#define GRIDINR_ALLOW_FMA __attribute__((optimize("fp-contract=fast")))
#else
#define GRIDINR_ALLOW_FMA
#endif

// 16 floats: one AVX-512 register (two AVX2 ones); GCC/Clang vector extension, so no intrinsics are needed.
typedef float Float16 __attribute__((vector_size(64)));

// y = x W^T + b (ReLU unless last) for kTile points and a compile-time number of outputs (a multiple of 16):
// the kTile x kOut accumulators stay in vector registers while each weight row is loaded once per tile.
template <int kOut, int kTile>
GRIDINR_ALLOW_FMA inline void dense_tile(const DenseLayer<float>& layer, bool relu, const float* __restrict x,
                                         float* __restrict y) {
  constexpr int kVectors = kOut / 16;
  Float16 acc[kTile][kVectors];
  Float16 bias[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    if (layer.bias != nullptr) {
      std::memcpy(&bias[v], layer.bias + 16 * v, sizeof(Float16));
    } else {
      bias[v] = Float16{};
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < kTile; ++p)
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) acc[p][v] = bias[v];
  for (int64_t i = 0; i < layer.in; ++i) {
    Float16 w[kVectors];
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) std::memcpy(&w[v], layer.weight_t + i * kOut + 16 * v, sizeof(Float16));
#pragma GCC unroll 8
    for (int p = 0; p < kTile; ++p) {
      const Float16 xi = Float16{} + x[p * layer.in + i];
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) acc[p][v] += xi * w[v];
    }
  }
  const Float16 zero{};
#pragma GCC unroll 8
  for (int p = 0; p < kTile; ++p)
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) {
      const Float16 out = relu ? (acc[p][v] > zero ? acc[p][v] : zero) : acc[p][v];
      std::memcpy(y + p * kOut + 16 * v, &out, sizeof(Float16));
    }
}

// One output (the last layer) from kIn inputs (a multiple of 16): a dot product in vector lanes, summed at the end
// (a scalar loop would be one long chain of dependent additions, which the compiler may not reorder).
template <int kIn>
GRIDINR_ALLOW_FMA inline float dot_point(const DenseLayer<float>& layer, const float* __restrict x) {
  Float16 acc{};
#pragma GCC unroll 8
  for (int v = 0; v < kIn / 16; ++v) {
    Float16 xv, wv;
    std::memcpy(&xv, x + 16 * v, sizeof(Float16));
    std::memcpy(&wv, layer.weight_t + 16 * v, sizeof(Float16));
    acc += xv * wv;
  }
  float sum = layer.bias != nullptr ? layer.bias[0] : 0.0f;
  for (int lane = 0; lane < 16; ++lane) sum += acc[lane];
  return sum;
}

// Any width and dtype: one point at a time (the last layer's single output, unusual hidden widths, float64).
template <typename scalar_t>
GRIDINR_ALLOW_FMA inline void dense_point(const DenseLayer<scalar_t>& layer, bool relu, const scalar_t* __restrict x,
                                          scalar_t* __restrict y) {
  for (int64_t o = 0; o < layer.out; ++o) {
    const scalar_t* w = layer.weight_t + o;
    scalar_t acc = layer.bias != nullptr ? layer.bias[o] : scalar_t(0);
    for (int64_t i = 0; i < layer.in; ++i) acc += x[i] * w[i * layer.out];
    y[o] = relu ? std::max(acc, scalar_t(0)) : acc;
  }
}

// y = x W^T + b for the `count` points of one block, ReLU unless last; x (count, in), y (count, out), row-major.
template <typename scalar_t>
inline void dense_block(const DenseLayer<scalar_t>& layer, bool relu, const scalar_t* __restrict x,
                        scalar_t* __restrict y, int64_t count) {
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    constexpr int kTile = 4;
    auto tiles = [&](auto out_tag) {
      constexpr int kOut = decltype(out_tag)::value;
      for (; j + kTile <= count; j += kTile) dense_tile<kOut, kTile>(layer, relu, x + j * layer.in, y + j * kOut);
    };
    if (layer.out == 16) tiles(std::integral_constant<int, 16>{});
    if (layer.out == 32) tiles(std::integral_constant<int, 32>{});
    if (layer.out == 64) tiles(std::integral_constant<int, 64>{});
    if (layer.out == 128) tiles(std::integral_constant<int, 128>{});
    auto dots = [&](auto in_tag) {
      constexpr int kIn = decltype(in_tag)::value;
      for (; j < count; ++j) y[j] = dot_point<kIn>(layer, x + j * kIn);  // no ReLU: only the last layer has out 1
    };
    if (layer.out == 1 && !relu) {
      if (layer.in == 16) dots(std::integral_constant<int, 16>{});
      if (layer.in == 32) dots(std::integral_constant<int, 32>{});
      if (layer.in == 64) dots(std::integral_constant<int, 64>{});
      if (layer.in == 128) dots(std::integral_constant<int, 128>{});
    }
  }
  for (; j < count; ++j) dense_point(layer, relu, x + j * layer.in, y + j * layer.out);
}

// The whole field for inference: encode a block of points and run the decoder on it while it is still in cache.
// Unfused, the (N, levels * F) features and (N, width) activations of a large batch stream through memory
// between separate passes (measured 3x slower than this on a 2-core CPU).
template <typename scalar_t, int F>
void field_forward_kernel(const scalar_t* positions, const scalar_t* params, scalar_t* out, int64_t n,
                          const std::vector<Level<scalar_t>>& levels, scalar_t shift,
                          const std::vector<DenseLayer<scalar_t>>& layers, int64_t threads) {
  const int64_t row = static_cast<int64_t>(levels.size()) * F;
  int64_t widest = row;
  for (const auto& layer : layers) widest = std::max(widest, layer.out);
  struct Scratch {
    std::unique_ptr<BlockScratch<scalar_t>> blocks = make_block_scratch<scalar_t>();
    std::vector<scalar_t> buffer_a, buffer_b;
  };
  auto make_scratch = [&] { return Scratch{make_block_scratch<scalar_t>(), std::vector<scalar_t>(kBlock * widest),
                                           std::vector<scalar_t>(kBlock * widest)}; };
  gridinr::parallel_items(num_blocks(n), threads, make_scratch, [&](int64_t b, Scratch& scratch) {
    auto& block = scratch.blocks->block;
    block.load(positions, b * kBlock, n);
    encode_block<scalar_t, F>(params, levels, shift, block, scratch.blocks->cells, scratch.buffer_a.data());
    scalar_t* x = scratch.buffer_a.data();
    scalar_t* y = scratch.buffer_b.data();
    for (size_t k = 0; k < layers.size(); ++k) {
      const bool last = k + 1 == layers.size();
      dense_block(layers[k], !last, x, last ? out + b * kBlock : y, block.count);
      std::swap(x, y);
    }
  });
}

// Each thread takes whole levels (largest slices first), so scatter-adds never race.
template <typename scalar_t, int F>
void backward_params_kernel(const scalar_t* positions, const scalar_t* grad_out, scalar_t* grad_params, int64_t n,
                            const std::vector<Level<scalar_t>>& levels, scalar_t shift, int64_t threads) {
  const int64_t num_levels = static_cast<int64_t>(levels.size());
  const int64_t row = num_levels * F;
  std::vector<int64_t> order(num_levels);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return levels[a].table_size > levels[b].table_size; });
  gridinr::parallel_items(num_levels, threads, make_block_scratch<scalar_t>, [&](int64_t k, auto& scratch) {
    auto& block = scratch->block;
    auto& cells = scratch->cells;
    const int64_t l = order[k];
    const auto& lv = levels[l];
    scalar_t* table_grad = grad_params + lv.table_offset * F;
    for (int64_t b = 0; b < num_blocks(n); ++b) {
      block.load(positions, b * kBlock, n);
      locate(lv, block, shift, cells);
      const scalar_t* grad_block = grad_out + b * kBlock * row + l * F;
      for (int64_t j = 0; j < block.count; ++j) {
        prefetch_rows<F, true>(table_grad, cells, j + kPrefetchDistance, block.count);
        scalar_t g[F];
        for (int f = 0; f < F; ++f) g[f] = grad_block[j * row + f];
        for (int c = 0; c < 8; ++c) {
          scalar_t* entry = table_grad + static_cast<int64_t>(cells.index[c][j]) * F;
          const scalar_t w = cells.weight[c][j];
          for (int f = 0; f < F; ++f) entry[f] += w * g[f];
        }
      }
    }
  });
}

// d out / d x = scale * sum over the 4 cell edges along x of (y, z weight) * (value at x+1 - value at x); same for
// y and z. With dot_c = <grad_out, value_c> this gives the position gradient without storing the Jacobian.
template <typename scalar_t, int F>
void backward_positions_kernel(const scalar_t* positions, const scalar_t* params, const scalar_t* grad_out,
                               scalar_t* grad_positions, int64_t n, const std::vector<Level<scalar_t>>& levels,
                               scalar_t shift, int64_t threads) {
  const int64_t num_levels = static_cast<int64_t>(levels.size());
  const int64_t row = num_levels * F;
  gridinr::parallel_items(num_blocks(n), threads, make_block_scratch<scalar_t>, [&](int64_t b, auto& scratch) {
    auto& block = scratch->block;
    auto& cells = scratch->cells;
    block.load(positions, b * kBlock, n);
    scalar_t* grad_block = grad_positions + 3 * b * kBlock;
    for (int64_t j = 0; j < 3 * block.count; ++j) grad_block[j] = 0;
    for (int64_t l = 0; l < num_levels; ++l) {
      const auto& lv = levels[l];
      locate(lv, block, shift, cells);
      const scalar_t* table = params + lv.table_offset * F;
      const scalar_t* g_block = grad_out + b * kBlock * row + l * F;
      for (int64_t j = 0; j < block.count; ++j) {
        prefetch_rows<F, false>(table, cells, j + kPrefetchDistance, block.count);
        scalar_t g[F];
        for (int f = 0; f < F; ++f) g[f] = g_block[j * row + f];
        scalar_t dot[8];
        for (int c = 0; c < 8; ++c) {
          const scalar_t* entry = table + static_cast<int64_t>(cells.index[c][j]) * F;
          scalar_t s = 0;
          for (int f = 0; f < F; ++f) s += g[f] * entry[f];
          dot[c] = s;
        }
        const scalar_t fx = cells.frac[0][j], fy = cells.frac[1][j], fz = cells.frac[2][j];
        const scalar_t gx = (1 - fy) * (1 - fz) * (dot[1] - dot[0]) + fy * (1 - fz) * (dot[3] - dot[2]) +
                            (1 - fy) * fz * (dot[5] - dot[4]) + fy * fz * (dot[7] - dot[6]);
        const scalar_t gy = (1 - fx) * (1 - fz) * (dot[2] - dot[0]) + fx * (1 - fz) * (dot[3] - dot[1]) +
                            (1 - fx) * fz * (dot[6] - dot[4]) + fx * fz * (dot[7] - dot[5]);
        const scalar_t gz = (1 - fx) * (1 - fy) * (dot[4] - dot[0]) + fx * (1 - fy) * (dot[5] - dot[1]) +
                            (1 - fx) * fy * (dot[6] - dot[2]) + fx * fy * (dot[7] - dot[3]);
        grad_block[3 * j + 0] += lv.scale * gx;
        grad_block[3 * j + 1] += lv.scale * gy;
        grad_block[3 * j + 2] += lv.scale * gz;
      }
    }
  });
}

// Lazy Adam step (torch.optim.SparseAdam's rule, applied to a dense gradient whose exact zeros mean "not touched",
// which is also how tiny-cuda-nn's Adam treats grid parameters): touched entries update their moments and move by
// step_size * m / (sqrt(v) + eps), untouched ones keep value and moments. The gradient is zeroed as it is read, so
// the buffer can serve the next backward without a memset. Chunks without any touched entry are only read.
// Bit-select blends instead of branches keep the chunk loop vectorised.
template <typename scalar_t>
struct SameSizeUnsigned;
template <>
struct SameSizeUnsigned<float> {
  using type = uint32_t;
};
template <>
struct SameSizeUnsigned<double> {
  using type = uint64_t;
};

template <typename scalar_t, typename U = typename SameSizeUnsigned<scalar_t>::type>
inline U bits_of(scalar_t value) {
  U bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

template <typename scalar_t, typename U = typename SameSizeUnsigned<scalar_t>::type>
inline scalar_t select_bits(U mask, scalar_t if_set, scalar_t if_clear) {
  const U bits = (bits_of(if_set) & mask) | (bits_of(if_clear) & ~mask);
  scalar_t value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// One range [start, end) of the table (a multiple of kChunk from the start, so chunks are the same for any split).
template <typename scalar_t>
void sparse_adam_range(scalar_t* __restrict param, scalar_t* __restrict grad, scalar_t* __restrict exp_avg,
                       scalar_t* __restrict exp_avg_sq, int64_t start, int64_t stop, scalar_t step_size, scalar_t beta1,
                       scalar_t beta2, scalar_t eps) {
  using U = typename SameSizeUnsigned<scalar_t>::type;
  constexpr int64_t kChunk = 64;
  const scalar_t one_minus_beta1 = scalar_t(1) - beta1;
  const scalar_t one_minus_beta2 = scalar_t(1) - beta2;
  for (; start < stop; start += kChunk) {
    const int64_t end = std::min(stop, start + kChunk);
    U any = 0;
    for (int64_t i = start; i < end; ++i) any |= bits_of(grad[i]) << 1;  // << 1 drops the sign: -0 is untouched
    if (any == 0) continue;
    for (int64_t i = start; i < end; ++i) {
      const scalar_t g = grad[i];
      const U touched = U(0) - static_cast<U>(g != scalar_t(0));
      const scalar_t m_old = exp_avg[i], v_old = exp_avg_sq[i], p_old = param[i];
      const scalar_t m = beta1 * m_old + one_minus_beta1 * g;
      const scalar_t v = beta2 * v_old + one_minus_beta2 * g * g;
      exp_avg[i] = select_bits(touched, m, m_old);
      exp_avg_sq[i] = select_bits(touched, v, v_old);
      param[i] = select_bits(touched, p_old - step_size * m / (std::sqrt(v) + eps), p_old);
      grad[i] = 0;
    }
  }
}

template <typename scalar_t>
void sparse_adam_kernel(scalar_t* param, scalar_t* grad, scalar_t* exp_avg, scalar_t* exp_avg_sq, int64_t n,
                        scalar_t step_size, scalar_t beta1, scalar_t beta2, scalar_t eps, int64_t threads) {
  constexpr int64_t kItem = 1 << 14;  // entries per work item (64 kB of float gradient)
  auto no_scratch = [] { return 0; };
  gridinr::parallel_items((n + kItem - 1) / kItem, threads, no_scratch, [&](int64_t item, int) {
    sparse_adam_range(param, grad, exp_avg, exp_avg_sq, item * kItem, std::min(n, (item + 1) * kItem), step_size,
                      beta1, beta2, eps);
  });
}

void check_inputs(const torch::Tensor& positions, const torch::Tensor& params, const torch::Tensor& scales,
                  const torch::Tensor& level_info, int64_t features) {
  TORCH_CHECK(positions.device().is_cpu() && params.device().is_cpu(), "hash_grid: the C++ kernels run on CPU tensors only");
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 3, "hash_grid: positions must have shape (N, 3)");
  TORCH_CHECK(positions.is_contiguous() && params.is_contiguous(), "hash_grid: positions and params must be contiguous");
  TORCH_CHECK(positions.scalar_type() == params.scalar_type(), "hash_grid: positions and params must share a dtype");
  TORCH_CHECK(features == 1 || features == 2 || features == 4 || features == 8,
              "hash_grid: features per level must be 1, 2, 4 or 8");
  // Slices lie inside the table; they may share entries across calls (the time nodes of fields/time_hash_grid.py),
  // but the levels of one call must not overlap: the backward scatters one level per thread.
  TORCH_CHECK(params.dim() == 1, "hash_grid: params must be a flat tensor");
  std::vector<std::pair<int64_t, int64_t>> slices;
  for (const auto& lv : unpack_levels<double>(scales, level_info)) {
    TORCH_CHECK(lv.table_offset >= 0 && lv.table_size > 0 && (lv.table_offset + lv.table_size) * features <= params.numel(),
                "hash_grid: a level slice lies outside params (", params.numel(), " values)");
    slices.emplace_back(lv.table_offset, lv.table_offset + lv.table_size);
  }
  std::sort(slices.begin(), slices.end());
  for (size_t i = 1; i < slices.size(); ++i)
    TORCH_CHECK(slices[i].first >= slices[i - 1].second, "hash_grid: level slices of one call must not overlap");
}

void check_grad_out(const torch::Tensor& grad_out, const torch::Tensor& positions, const torch::Tensor& params,
                    const torch::Tensor& level_info, int64_t features) {
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.is_contiguous() && grad_out.scalar_type() == params.scalar_type() &&
                  grad_out.dim() == 2 && grad_out.size(0) == positions.size(0) &&
                  grad_out.size(1) == level_info.size(0) * features,
              "hash_grid: grad_out must be a contiguous CPU (N, levels * features) tensor of the params dtype");
}

// Calls fn(scalar_t{}, std::integral_constant<int, F>{}) for the runtime dtype and feature count.
template <typename Fn>
void dispatch(torch::ScalarType dtype, int64_t features, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "hash_grid", [&] {
    switch (features) {
      case 1: fn(scalar_t{}, std::integral_constant<int, 1>{}); break;
      case 2: fn(scalar_t{}, std::integral_constant<int, 2>{}); break;
      case 4: fn(scalar_t{}, std::integral_constant<int, 4>{}); break;
      default: fn(scalar_t{}, std::integral_constant<int, 8>{}); break;
    }
  });
}

}  // namespace

// threads: how many threads the kernels may use (0: torch's intra-op count); results do not depend on it.
int64_t thread_count(int64_t threads) { return threads > 0 ? threads : at::get_num_threads(); }

torch::Tensor forward(const torch::Tensor& positions, const torch::Tensor& params, const torch::Tensor& scales,
                      const torch::Tensor& level_info, double shift, int64_t features, int64_t threads) {
  check_inputs(positions, params, scales, level_info, features);
  auto out = torch::empty({positions.size(0), level_info.size(0) * features}, params.options());
  dispatch(params.scalar_type(), features, [&](auto type_tag, auto features_tag) {
    using scalar_t = decltype(type_tag);
    constexpr int F = decltype(features_tag)::value;
    forward_kernel<scalar_t, F>(positions.data_ptr<scalar_t>(), params.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                positions.size(0), unpack_levels<scalar_t>(scales, level_info),
                                static_cast<scalar_t>(shift), thread_count(threads));
  });
  return out;
}

// Field values (N,) = decoder(encoding(positions)) without autograd. weights_t[k]: (in, out) transposed
// nn.Linear weights; biases[k]: (out,) or an empty tensor; ReLU after every layer but the last, whose out is 1.
torch::Tensor field_forward(const torch::Tensor& positions, const torch::Tensor& params, const torch::Tensor& scales,
                            const torch::Tensor& level_info, double shift, int64_t features,
                            const std::vector<torch::Tensor>& weights_t, const std::vector<torch::Tensor>& biases,
                            int64_t threads) {
  check_inputs(positions, params, scales, level_info, features);
  TORCH_CHECK(!weights_t.empty() && weights_t.size() == biases.size(),
              "field_forward: need one (possibly empty) bias per weight matrix");
  int64_t width = level_info.size(0) * features;
  for (size_t k = 0; k < weights_t.size(); ++k) {
    const auto& w = weights_t[k];
    const auto& b = biases[k];
    TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.scalar_type() == params.scalar_type() && w.dim() == 2 &&
                    w.size(0) == width,
                "field_forward: layer ", k, " weights must be a contiguous CPU (", width, ", out) tensor of the params dtype");
    TORCH_CHECK(b.numel() == 0 || (b.device().is_cpu() && b.is_contiguous() && b.scalar_type() == params.scalar_type() &&
                                   b.dim() == 1 && b.size(0) == w.size(1)),
                "field_forward: layer ", k, " bias must be empty or a contiguous CPU (out,) tensor of the params dtype");
    width = w.size(1);
  }
  TORCH_CHECK(width == 1, "field_forward: the last layer must have one output, got ", width);
  auto out = torch::empty({positions.size(0)}, params.options());
  dispatch(params.scalar_type(), features, [&](auto type_tag, auto features_tag) {
    using scalar_t = decltype(type_tag);
    constexpr int F = decltype(features_tag)::value;
    std::vector<DenseLayer<scalar_t>> layers;
    for (size_t k = 0; k < weights_t.size(); ++k) {
      layers.push_back({weights_t[k].data_ptr<scalar_t>(), biases[k].numel() ? biases[k].data_ptr<scalar_t>() : nullptr,
                        weights_t[k].size(0), weights_t[k].size(1)});
    }
    field_forward_kernel<scalar_t, F>(positions.data_ptr<scalar_t>(), params.data_ptr<scalar_t>(),
                                      out.data_ptr<scalar_t>(), positions.size(0),
                                      unpack_levels<scalar_t>(scales, level_info), static_cast<scalar_t>(shift), layers,
                                      thread_count(threads));
  });
  return out;
}

// Adds the table gradient into grad_params (so callers may accumulate into an existing buffer).
void backward_params(const torch::Tensor& positions, const torch::Tensor& grad_out, torch::Tensor& grad_params,
                     const torch::Tensor& scales, const torch::Tensor& level_info, double shift, int64_t features,
                     int64_t threads) {
  check_inputs(positions, grad_params, scales, level_info, features);
  check_grad_out(grad_out, positions, grad_params, level_info, features);
  dispatch(grad_params.scalar_type(), features, [&](auto type_tag, auto features_tag) {
    using scalar_t = decltype(type_tag);
    constexpr int F = decltype(features_tag)::value;
    backward_params_kernel<scalar_t, F>(positions.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                                        grad_params.data_ptr<scalar_t>(), positions.size(0),
                                        unpack_levels<scalar_t>(scales, level_info), static_cast<scalar_t>(shift),
                                        thread_count(threads));
  });
}

torch::Tensor backward_positions(const torch::Tensor& positions, const torch::Tensor& params,
                                 const torch::Tensor& grad_out, const torch::Tensor& scales,
                                 const torch::Tensor& level_info, double shift, int64_t features, int64_t threads) {
  check_inputs(positions, params, scales, level_info, features);
  check_grad_out(grad_out, positions, params, level_info, features);
  auto grad_positions = torch::empty_like(positions);
  dispatch(params.scalar_type(), features, [&](auto type_tag, auto features_tag) {
    using scalar_t = decltype(type_tag);
    constexpr int F = decltype(features_tag)::value;
    backward_positions_kernel<scalar_t, F>(positions.data_ptr<scalar_t>(), params.data_ptr<scalar_t>(),
                                           grad_out.data_ptr<scalar_t>(), grad_positions.data_ptr<scalar_t>(),
                                           positions.size(0), unpack_levels<scalar_t>(scales, level_info),
                                           static_cast<scalar_t>(shift), thread_count(threads));
  });
  return grad_positions;
}

void sparse_adam_step(torch::Tensor& param, torch::Tensor& grad, torch::Tensor& exp_avg, torch::Tensor& exp_avg_sq,
                      double step_size, double beta1, double beta2, double eps, int64_t threads) {
  for (const auto* t : {&grad, &exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->numel() == param.numel() &&
                    t->scalar_type() == param.scalar_type(),
                "sparse_adam_step: grad, exp_avg and exp_avg_sq must be contiguous CPU tensors like param");
  }
  TORCH_CHECK(param.device().is_cpu() && param.is_contiguous(), "sparse_adam_step: param must be a contiguous CPU tensor");
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sparse_adam_step", [&] {
    sparse_adam_kernel<scalar_t>(param.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), exp_avg.data_ptr<scalar_t>(),
                                 exp_avg_sq.data_ptr<scalar_t>(), param.numel(), static_cast<scalar_t>(step_size),
                                 static_cast<scalar_t>(beta1), static_cast<scalar_t>(beta2), static_cast<scalar_t>(eps),
                                 thread_count(threads));
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU/OpenMP kernels of the multi-resolution hash-grid encoding";
  // Every kernel takes `threads` last (0: torch's intra-op count); its results are the same for any value.
  m.def("_occupy_helpers", &gridinr::occupy_helpers, "Tests: keep COUNT inter-op pool threads busy until released");
  m.def("_release_helpers", &gridinr::release_helpers, "Tests: let the threads of _occupy_helpers return");
  m.def("forward", &forward, "Encode (N, 3) positions into (N, levels * features) features");
  m.def("field_forward", &field_forward, "Field values (N,): encoding then ReLU decoder, fused per block (inference)");
  m.def("backward_params", &backward_params, "Add the table gradient into grad_params (in place)");
  m.def("backward_positions", &backward_positions, "Gradient of the loss w.r.t. the (N, 3) positions");
  m.def("sparse_adam_step", &sparse_adam_step,
        "Lazy (SparseAdam-rule) Adam step on a dense gradient; zeroes the consumed gradient");
}
