// Fused CPU ray marcher over a voxel grid read through a transfer-function table, forward and backward.
//
// The torch reference is gridinr_nerfstudio/rendering/raymarch.py (render_rays); this computes the same thing per
// ray in one pass instead of a chain of tensor operations over chunks of samples:
//   box intersection (slab test as intersect_aabb), N equal bins of [t_near, t_far] sampled at their midpoints or
//   at given stratified offsets, empty-space skipping by min/max macrocells (a sample in a transparent cell is
//   skipped, and the ray leaps to the first sample past that cell), trilinear lookups (DenseGridField's
//   convention: 0 outside the box), the table (L, 4) of (r, g, b, sigma) read by linear interpolation, optional
//   central-difference normals (differences within rounding count as 0, as estimate_normals) and Phong shading,
//   front-to-back compositing with early termination.
// Per ray it accumulates the sums of weight * (r, g, b, 1, t[, nx, ny, nz]); the Python side composites the
// background and divides the depth, so autograd handles those.
//
// Backward (dLoss/dtable) recomputes the march instead of storing samples (as DiffDVR): with O_c the forward sums,
// g_c their incoming gradients, G_k = sum_c g_c c_kc the gradient-weighted "colour" of sample k and P_k the prefix
// sum of w_i G_i up to and including k, front-to-back compositing gives
//   dL/dsigma_k = step * (T_{k+1} G_k - (sum_c g_c O_c - P_k)),   dL/drgb_k = w_k g_rgb (through the shading clamp)
// and both are spread onto the two table entries around the sample's value with the interpolation weights. Rays
// are split into kGradientGroups groups handed out dynamically, each adding into its own copy of the table
// gradient (no atomics); the copies are summed in group order, so the gradient is deterministic.
//
// Rays are handed out in packets of kPacket through gridinr::parallel_items (csrc/work_sharing.h) on the explicit
// thread count the caller passes (thread_policy.kernel_threads()), so a thread that loses its core (another process
// on a shared machine) delays only the packet it holds, not a fixed share of the frame, and the caller never waits
// for a helper thread that has not started.
// `set_packet_rays` changes the forward's packet size (benchmarks: one packet per thread is a static split).
//
// Lattices decoded lazily (fields/brick_cache.py) hold NaN where nothing is decoded yet: with suspend_on_nan the
// forward stops such a ray at that sample and records its state (transmittance, sums, sample index), so the
// caller can decode the bricks there and resume the ray. Without it a NaN value counts as 0.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "work_sharing.h"

namespace {

int no_scratch() { return 0; }

// threads: how many threads the kernels may use (0: torch's intra-op count); results do not depend on it.
int64_t thread_count(int64_t threads) { return threads > 0 ? threads : at::get_num_threads(); }

constexpr int64_t kPacket = 16;  // rays per dynamically scheduled work item
std::atomic<int64_t> g_packet_rays{kPacket};  // the forward's packet size (set_packet_rays)
constexpr int kMaxChannels = 8;  // r, g, b, 1, t, nx, ny, nz
constexpr int64_t kGradientGroups = 64;  // backward work items, each with its own table gradient
// A leap over an empty macrocell stops this many bins before the cell's exit (rounding margin).
constexpr double kLeapMargin = 1e-3;
constexpr int kFlatDifferenceUlps = 16;  // raymarch.FLAT_DIFFERENCE_ULPS

// exp(x) - 1 for the per-sample decay exp(-sigma step) - 1: a degree-9 Taylor polynomial for |x| <= 1/2 (relative
// error below 1e-9, i.e. float rounding) and expf beyond, about twice as fast as libm's expm1f; float64 (gradient
// checks) keeps std::expm1.
inline float decay_of(float x) {
  if (x < -0.5f || x > 0.5f) return std::exp(x) - 1.0f;
  float p = 1.0f / 362880.0f;
  p = p * x + 1.0f / 40320.0f;
  p = p * x + 1.0f / 5040.0f;
  p = p * x + 1.0f / 720.0f;
  p = p * x + 1.0f / 120.0f;
  p = p * x + 1.0f / 24.0f;
  p = p * x + 1.0f / 6.0f;
  p = p * x + 0.5f;
  p = p * x + 1.0f;
  return p * x;
}
inline double decay_of(double x) { return std::expm1(x); }

template <typename scalar_t>
inline scalar_t clamp01(scalar_t v) {  // NaN passes through (both comparisons are false)
  return v < scalar_t(0) ? scalar_t(0) : (v > scalar_t(1) ? scalar_t(1) : v);
}

// Normalised values of a (Z, Y, X) voxel array of any layout: value = clamp(raw * scale + offset, 0, 1) per voxel,
// non-finite raw values replaced when `replace` is set (a volume's nan_policy "replace"). Points are given in
// lattice coordinates u (continuous voxel index, x, y, z): u = p * to_lattice + (n - 1) / 2 for a world point p,
// DenseGridField's mapping (grid_sample with align_corners=True) without a division per sample.
template <typename voxel_t, typename scalar_t>
struct Grid {
  const voxel_t* data;
  int64_t size[3];    // x, y, z
  int64_t stride[3];  // elements, x, y, z
  scalar_t top[3];    // size - 1
  scalar_t to_lattice[3], centre[3];
  scalar_t scale, offset, replacement;
  bool affine, replace;

  inline scalar_t voxel(int64_t index) const {
    const voxel_t raw = data[index];
    if constexpr (std::is_floating_point_v<voxel_t>) {
      if (replace && !std::isfinite(raw)) return replacement;
      if (!affine) return static_cast<scalar_t>(raw);
    }
    return clamp01(static_cast<scalar_t>(raw) * scale + offset);
  }

  // Trilinear value at lattice coordinates u, clamped to [0, 1]; 0 outside the box (DenseGridField). A NaN value
  // (undecoded lattice points of a brick cache) passes through and its cell goes to `nan_cell`.
  inline scalar_t value(const scalar_t* u, int64_t* nan_cell) const {
    int64_t cell[3];
    scalar_t f[3];
    for (int a = 0; a < 3; ++a) {
      if (!(u[a] >= scalar_t(0) && u[a] <= top[a])) return scalar_t(0);
      cell[a] = std::min(static_cast<int64_t>(u[a]), size[a] - 2);
      f[a] = u[a] - static_cast<scalar_t>(cell[a]);
    }
    const int64_t base = cell[0] * stride[0] + cell[1] * stride[1] + cell[2] * stride[2];
    const int64_t sx = stride[0], sy = stride[1], sz = stride[2];
    const scalar_t c00 = voxel(base) + f[0] * (voxel(base + sx) - voxel(base));
    const scalar_t c10 = voxel(base + sy) + f[0] * (voxel(base + sy + sx) - voxel(base + sy));
    const scalar_t c01 = voxel(base + sz) + f[0] * (voxel(base + sz + sx) - voxel(base + sz));
    const scalar_t c11 = voxel(base + sz + sy) + f[0] * (voxel(base + sz + sy + sx) - voxel(base + sz + sy));
    const scalar_t c0 = c00 + f[1] * (c10 - c00);
    const scalar_t c1 = c01 + f[1] * (c11 - c01);
    const scalar_t v = clamp01(c0 + f[2] * (c1 - c0));
    if (std::isnan(v))
      for (int a = 0; a < 3; ++a) nan_cell[a] = cell[a];
    return v;
  }
};

// Macrocells (Z, Y, X) over a box, 0 = transparent for the current transfer function, and coarser levels of the
// same (level k: blocks of 4^k cells, 0 when all their cells are), for leaps over large empty regions. Points
// outside the box count as occupied, as in OccupancyGrid.is_occupied. Positions are in cell coordinates
// c = (p - low) * count / (high - low).
constexpr int kBlockBits = 2;  // blocks of 4 cells per axis per level
constexpr int64_t kBlock = int64_t{1} << kBlockBits;
constexpr int kMaxLevels = 6;

struct Cells {
  const uint8_t* occupied[kMaxLevels] = {};
  int64_t count[kMaxLevels][3];
  int levels = 0;
  double low[3], per_unit[3];

  // Cell (level 0) holding cell coordinates c; false outside the grid.
  template <typename scalar_t>
  inline bool locate(const scalar_t* c, int64_t* cell) const {
    for (int a = 0; a < 3; ++a) {
      if (!(c[a] >= scalar_t(0) && c[a] < static_cast<scalar_t>(count[0][a]))) return false;
      cell[a] = static_cast<int64_t>(c[a]);
    }
    return true;
  }
  inline bool transparent(int level, const int64_t* block) const {
    const int64_t* n = count[level];
    return occupied[level][(block[2] * n[1] + block[1]) * n[0] + block[0]] == 0;
  }
  // The coarsest level whose block around transparent cell `cell` is transparent (a block is transparent only if
  // the finer one inside it is): that block (in its level's units) and its size in cells.
  inline int64_t empty_block(const int64_t* cell, int64_t* block) const {
    int level = 0;
    for (int a = 0; a < 3; ++a) block[a] = cell[a];
    while (level + 1 < levels) {
      int64_t coarse[3];
      for (int a = 0; a < 3; ++a) coarse[a] = cell[a] >> (kBlockBits * (level + 1));
      if (!transparent(level + 1, coarse)) break;
      ++level;
      for (int a = 0; a < 3; ++a) block[a] = coarse[a];
    }
    return int64_t{1} << (kBlockBits * level);
  }
};

struct Shading {
  double ambient = 0.3, diffuse = 0.7, specular = 0.2;  // raymarch.shade's defaults; shininess 32 (5 squarings)
};

template <typename scalar_t>
struct Options {
  int64_t num_samples;
  const scalar_t* offsets;  // (R, N) stratified offsets in [0, 1) or nullptr (midpoints)
  scalar_t early_stop_eps;
  scalar_t normal_eps;  // > 0: normals by central differences with this step (world units)
  bool shading;
  bool suspend_on_nan;
  int64_t channels;  // 5 or 8
  scalar_t box_low[3], box_high[3];
  const scalar_t* table;  // (L, 4) contiguous
  int64_t table_size;
};

// Slab test exactly as intersect_aabb: t_near clamped to 0, miss when t_far <= t_near.
template <typename scalar_t>
inline bool intersect(const scalar_t* o, const scalar_t* d, const scalar_t* low, const scalar_t* high,
                      scalar_t& t_near, scalar_t& t_far) {
  const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  scalar_t enter = -inf, leave = inf;
  for (int a = 0; a < 3; ++a) {
    scalar_t te, tx;
    if (d[a] == scalar_t(0)) {
      const bool inside = o[a] >= low[a] && o[a] <= high[a];
      te = inside ? -inf : inf;
      tx = inside ? inf : -inf;
    } else {
      const scalar_t t_low = (low[a] - o[a]) / d[a], t_high = (high[a] - o[a]) / d[a];
      te = std::min(t_low, t_high);
      tx = std::max(t_low, t_high);
    }
    enter = std::max(enter, te);
    leave = std::min(leave, tx);
  }
  t_near = std::max(enter, scalar_t(0));
  t_far = leave;
  return t_far > t_near;
}

// What one visible sample is: its colour channels before weighting and where it sits in the table.
template <typename scalar_t>
struct Sample {
  scalar_t channel[kMaxChannels];  // shaded r, g, b, 1, t, normal
  scalar_t sigma;
  int64_t entry;      // lower table entry
  scalar_t fraction;  // weight of entry + 1
  scalar_t shade_gain[3];  // d shaded rgb / d rgb (0 where the shading clamp cuts)
};

template <typename voxel_t, typename scalar_t>
struct Marcher {
  // A central difference of normalised values within this much counts as 0, as in raymarch.estimate_normals
  // (FLAT_DIFFERENCE_ULPS machine epsilons of the values' dtype: float64 only where the torch path's field values
  // are, a float64 grid marched in float64; float32 otherwise).
  using value_precision_t =
      std::conditional_t<std::is_same_v<voxel_t, double> && std::is_same_v<scalar_t, double>, double, float>;
  static constexpr scalar_t kFlatDifference =
      scalar_t(kFlatDifferenceUlps) * static_cast<scalar_t>(std::numeric_limits<value_precision_t>::epsilon());

  const Grid<voxel_t, scalar_t>& grid;
  const Cells* cells;
  const Options<scalar_t>& opt;

  // Where value v sits in the table, and its sigma.
  inline void lookup(scalar_t v, Sample<scalar_t>& s) const {
    const int64_t last = opt.table_size - 1;
    const scalar_t position = clamp01(v) * static_cast<scalar_t>(last);
    s.entry = std::min(static_cast<int64_t>(position), last - 1);
    s.fraction = position - static_cast<scalar_t>(s.entry);
    const scalar_t* lo = opt.table + 4 * s.entry;
    s.sigma = lo[3] + s.fraction * (lo[7] - lo[3]);
  }

  // Colour channels of the looked-up sample at lattice point u (ray direction d, distance t): table rgb, normals,
  // shading. False when a normal's lookup met an undecoded lattice value and the ray is to suspend (its cell in
  // nan_cell).
  inline bool colour(const scalar_t* u, const scalar_t* d, scalar_t t, Sample<scalar_t>& s, int64_t* nan_cell) const {
    const scalar_t* lo = opt.table + 4 * s.entry;
    const scalar_t* hi = lo + 4;
    scalar_t rgb[3];
    for (int c = 0; c < 3; ++c) rgb[c] = lo[c] + s.fraction * (hi[c] - lo[c]);
    s.channel[3] = scalar_t(1);
    s.channel[4] = t;
    scalar_t normal[3] = {0, 0, 0};
    if (opt.normal_eps > scalar_t(0) && s.sigma > scalar_t(0)) {
      scalar_t gradient[3], norm_sq = 0;
      for (int a = 0; a < 3; ++a) {
        scalar_t q[3] = {u[0], u[1], u[2]};
        const scalar_t shift = opt.normal_eps * grid.to_lattice[a];
        q[a] = u[a] + shift;
        scalar_t up = grid.value(q, nan_cell);
        q[a] = u[a] - shift;
        scalar_t down = grid.value(q, nan_cell);
        if (std::isnan(up) || std::isnan(down)) {
          if (opt.suspend_on_nan) return false;
          up = std::isnan(up) ? scalar_t(0) : up;
          down = std::isnan(down) ? scalar_t(0) : down;
        }
        scalar_t difference = up - down;
        if (std::abs(difference) <= kFlatDifference) difference = scalar_t(0);  // rounding, not slope
        gradient[a] = difference / (scalar_t(2) * opt.normal_eps);
        norm_sq += gradient[a] * gradient[a];
      }
      const scalar_t norm = std::max(std::sqrt(norm_sq), scalar_t(1e-12));
      for (int a = 0; a < 3; ++a) normal[a] = -(gradient[a] / norm);
    }
    if (opt.channels == kMaxChannels)
      for (int a = 0; a < 3; ++a) s.channel[5 + a] = normal[a];
    if (opt.shading) {
      const Shading k;
      const scalar_t d_norm = std::max(std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]), scalar_t(1e-12));
      const scalar_t cosine =
          std::abs(normal[0] * (d[0] / d_norm) + normal[1] * (d[1] / d_norm) + normal[2] * (d[2] / d_norm));
      scalar_t highlight = cosine;
      for (int i = 0; i < 5; ++i) highlight *= highlight;  // cosine^32
      const scalar_t gain = scalar_t(k.ambient) + scalar_t(k.diffuse) * cosine;
      for (int c = 0; c < 3; ++c) {
        const scalar_t shaded = rgb[c] * gain + scalar_t(k.specular) * highlight;
        s.shade_gain[c] = (shaded >= scalar_t(0) && shaded <= scalar_t(1)) ? gain : scalar_t(0);
        s.channel[c] = std::min(std::max(shaded, scalar_t(0)), scalar_t(1));
      }
    } else {
      for (int c = 0; c < 3; ++c) {
        s.channel[c] = rgb[c];
        s.shade_gain[c] = scalar_t(1);
      }
    }
    return true;
  }

  // The first sample index that may lie beyond the empty block around transparent cell `cell` (cell coordinates
  // of the ray: c = c0 + t * dc): leaps stop short of the block's exit by the bin a sample may sit anywhere in.
  inline int64_t leap(const int64_t* cell, const double* c0, const double* dc, const double* inv_dc, double t_near,
                      double inv_dt, double leap_back, int64_t n) const {
    int64_t block[3];
    const int64_t size = cells->empty_block(cell, block);
    double t_exit = std::numeric_limits<double>::infinity();
    for (int a = 0; a < 3; ++a) {
      if (dc[a] > 0) {
        const double plane = static_cast<double>(std::min((block[a] + 1) * size, cells->count[0][a]));
        t_exit = std::min(t_exit, (plane - c0[a]) * inv_dc[a]);
      } else if (dc[a] < 0) {
        t_exit = std::min(t_exit, (static_cast<double>(block[a] * size) - c0[a]) * inv_dc[a]);
      }
    }
    const double bins = (t_exit - t_near) * inv_dt - leap_back;
    return bins >= static_cast<double>(n) ? n : static_cast<int64_t>(std::ceil(bins));
  }

  // March ray (o, d) from sample `start` with transmittance `T`; `visit(sample, T_before, weight, T_after, step)`
  // sees every evaluated sample (sigma may be 0 for visitors that ask for it). Returns the sample index where it
  // suspended on a NaN value (the lattice cell of that value in nan_cell), else -1.
  template <class Visit>
  inline int64_t march(int64_t ray, const scalar_t* o, const scalar_t* d, int64_t start, scalar_t& T,
                       int64_t& evaluated, int64_t* nan_cell, Visit&& visit) const {
    scalar_t t_near, t_far;
    if (!intersect(o, d, opt.box_low, opt.box_high, t_near, t_far)) return -1;
    const int64_t n = opt.num_samples;
    const scalar_t dt = (t_far - t_near) / static_cast<scalar_t>(n);
    const scalar_t step = dt * std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
    const scalar_t* offsets = opt.offsets ? opt.offsets + ray * n : nullptr;
    scalar_t u0[3], du[3];  // lattice coordinates u = u0 + t * du
    double c0[3], dc[3], inv_dc[3];  // cell coordinates c = c0 + t * dc
    for (int a = 0; a < 3; ++a) {
      u0[a] = o[a] * grid.to_lattice[a] + grid.centre[a];
      du[a] = d[a] * grid.to_lattice[a];
      if (cells != nullptr) {
        c0[a] = (static_cast<double>(o[a]) - cells->low[a]) * cells->per_unit[a];
        dc[a] = static_cast<double>(d[a]) * cells->per_unit[a];
        inv_dc[a] = dc[a] != 0 ? 1.0 / dc[a] : 0.0;
      }
    }
    // Midpoints sit half a bin in, stratified samples anywhere in their bin.
    const double leap_back = (offsets ? 1.0 : 0.5) + kLeapMargin;
    const double inv_dt = 1.0 / static_cast<double>(dt);
    Sample<scalar_t> s;
    for (int64_t i = start; i < n;) {
      const scalar_t t = t_near + (static_cast<scalar_t>(i) + (offsets ? offsets[i] : scalar_t(0.5))) * dt;
      if (cells != nullptr) {
        const double c[3] = {c0[0] + t * dc[0], c0[1] + t * dc[1], c0[2] + t * dc[2]};
        int64_t cell[3];
        if (cells->locate(c, cell) && cells->transparent(0, cell)) {
          i = std::max(i + 1, leap(cell, c0, dc, inv_dc, static_cast<double>(t_near), inv_dt, leap_back, n));
          continue;
        }
      }
      const scalar_t u[3] = {u0[0] + t * du[0], u0[1] + t * du[1], u0[2] + t * du[2]};
      scalar_t v = grid.value(u, nan_cell);
      ++evaluated;
      if (std::isnan(v)) {
        if (opt.suspend_on_nan) return i;
        v = scalar_t(0);
      }
      lookup(v, s);
      if (s.sigma != scalar_t(0) || std::decay_t<Visit>::kSeesTransparent) {
        if (!colour(u, d, t, s, nan_cell)) return i;
        const scalar_t decay = decay_of(-s.sigma * step);  // exp(-sigma step) - 1
        const scalar_t after = T + T * decay;
        const scalar_t weight = -T * decay;
        visit(s, T, weight, after, step);
        T = after;
        if (!(T > opt.early_stop_eps)) break;
      }
      ++i;
    }
    return -1;
  }
};

template <typename scalar_t>
struct Accumulate {
  static constexpr bool kSeesTransparent = false;
  scalar_t* sums;
  int64_t channels;
  inline void operator()(const Sample<scalar_t>& s, scalar_t, scalar_t weight, scalar_t, scalar_t) {
    for (int64_t c = 0; c < channels; ++c) sums[c] += weight * s.channel[c];
  }
};

template <typename scalar_t>
struct TableGradient {
  static constexpr bool kSeesTransparent = true;  // sigma = 0 still has a gradient
  const scalar_t* grad;  // (C,) of this ray
  scalar_t total;        // sum_c g_c O_c
  scalar_t prefix = 0;   // sum of w_i G_i so far
  int64_t channels;
  scalar_t* table_grad;  // (L, 4) of this thread
  inline void operator()(const Sample<scalar_t>& s, scalar_t, scalar_t weight, scalar_t after, scalar_t step) {
    scalar_t colour = 0;
    for (int64_t c = 0; c < channels; ++c) colour += grad[c] * s.channel[c];
    prefix += weight * colour;
    scalar_t entry_grad[4];
    for (int c = 0; c < 3; ++c) entry_grad[c] = weight * grad[c] * s.shade_gain[c];
    entry_grad[3] = step * (after * colour - (total - prefix));
    scalar_t* lo = table_grad + 4 * s.entry;
    const scalar_t keep = scalar_t(1) - s.fraction;
    for (int c = 0; c < 4; ++c) {
      lo[c] += keep * entry_grad[c];
      lo[4 + c] += s.fraction * entry_grad[c];
    }
  }
};

// ---------------------------------------------------------------------------------------------- argument parsing

template <typename voxel_t, typename scalar_t>
Grid<voxel_t, scalar_t> make_grid(const torch::Tensor& volume, const torch::Tensor& grid_params) {
  TORCH_CHECK(volume.dim() == 3 && volume.size(0) >= 2 && volume.size(1) >= 2 && volume.size(2) >= 2,
              "raymarch: the volume must be (Z, Y, X) with at least 2 voxels per axis");
  TORCH_CHECK(grid_params.scalar_type() == torch::kFloat64 && grid_params.numel() == 8 && grid_params.is_contiguous(),
              "raymarch: grid_params must be float64 [hx, hy, hz, scale, offset, affine, replace, replacement]");
  const double* g = grid_params.data_ptr<double>();
  Grid<voxel_t, scalar_t> grid;
  grid.data = volume.data_ptr<voxel_t>();
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK(g[a] > 0, "raymarch: half sizes must be positive");
    grid.size[a] = volume.size(2 - a);
    grid.stride[a] = volume.stride(2 - a);
    const double top = static_cast<double>(grid.size[a] - 1);
    grid.top[a] = static_cast<scalar_t>(top);
    grid.to_lattice[a] = static_cast<scalar_t>(0.5 * top / g[a]);
    grid.centre[a] = static_cast<scalar_t>(0.5 * top);
  }
  grid.scale = static_cast<scalar_t>(g[3]);
  grid.offset = static_cast<scalar_t>(g[4]);
  grid.affine = g[5] != 0;
  grid.replace = g[6] != 0;
  grid.replacement = static_cast<scalar_t>(g[7]);
  return grid;
}

// levels: the occupancy pyramid, finest first (uint8 (Z, Y, X), level k+1 the kBlock-times coarser any-occupied
// reduction of level k); empty: no skipping.
bool make_cells(const std::vector<torch::Tensor>& levels, const torch::Tensor& cell_box, Cells& cells) {
  if (levels.empty()) return false;
  TORCH_CHECK(static_cast<int>(levels.size()) <= kMaxLevels, "raymarch: at most ", kMaxLevels, " occupancy levels");
  TORCH_CHECK(cell_box.scalar_type() == torch::kFloat64 && cell_box.numel() == 6 && cell_box.is_contiguous(),
              "raymarch: cell_box must be float64 [low xyz, high xyz]");
  cells.levels = static_cast<int>(levels.size());
  for (int k = 0; k < cells.levels; ++k) {
    const auto& level = levels[k];
    TORCH_CHECK(level.dim() == 3 && level.scalar_type() == torch::kUInt8 && level.is_contiguous(),
                "raymarch: occupancy levels must be contiguous uint8 (Z, Y, X) tensors");
    for (int a = 0; a < 3; ++a) {
      cells.count[k][a] = level.size(2 - a);
      if (k > 0)
        TORCH_CHECK(cells.count[k][a] == (cells.count[k - 1][a] + kBlock - 1) / kBlock,
                    "raymarch: occupancy level ", k, " must be level ", k - 1, " reduced by ", kBlock);
    }
    cells.occupied[k] = level.data_ptr<uint8_t>();
  }
  const double* b = cell_box.data_ptr<double>();
  for (int a = 0; a < 3; ++a) {
    cells.low[a] = b[a];
    cells.per_unit[a] = static_cast<double>(cells.count[0][a]) / (b[3 + a] - b[a]);
  }
  return true;
}

template <typename scalar_t>
Options<scalar_t> make_options(const torch::Tensor& box, const torch::Tensor& table, const torch::Tensor& offsets,
                               int64_t num_samples, double early_stop_eps, double normal_eps, bool shading,
                               bool suspend_on_nan, int64_t channels, int64_t num_rays) {
  TORCH_CHECK(num_samples > 0, "raymarch: num_samples must be positive");
  TORCH_CHECK(channels == 5 || channels == kMaxChannels, "raymarch: 5 or 8 channels");
  TORCH_CHECK(box.scalar_type() == torch::kFloat64 && box.numel() == 6 && box.is_contiguous(),
              "raymarch: box must be float64 [low xyz, high xyz]");
  TORCH_CHECK(table.dim() == 2 && table.size(1) == 4 && table.size(0) >= 2 && table.is_contiguous(),
              "raymarch: table must be a contiguous (L >= 2, 4) tensor");
  Options<scalar_t> opt;
  opt.num_samples = num_samples;
  opt.offsets = nullptr;
  if (offsets.numel() > 0) {
    TORCH_CHECK(offsets.dim() == 2 && offsets.size(0) == num_rays && offsets.size(1) == num_samples &&
                    offsets.is_contiguous() && offsets.scalar_type() == table.scalar_type(),
                "raymarch: offsets must be a contiguous (R, num_samples) tensor of the table's dtype");
    opt.offsets = offsets.data_ptr<scalar_t>();
  }
  opt.early_stop_eps = static_cast<scalar_t>(early_stop_eps);
  opt.normal_eps = static_cast<scalar_t>(normal_eps);
  opt.shading = shading;
  opt.suspend_on_nan = suspend_on_nan;
  opt.channels = channels;
  const double* b = box.data_ptr<double>();
  for (int a = 0; a < 3; ++a) {
    opt.box_low[a] = static_cast<scalar_t>(b[a]);
    opt.box_high[a] = static_cast<scalar_t>(b[3 + a]);
  }
  opt.table = table.data_ptr<scalar_t>();
  opt.table_size = table.size(0);
  return opt;
}

void check_rays(const torch::Tensor& origins, const torch::Tensor& directions, const torch::Tensor& table) {
  TORCH_CHECK(origins.dim() == 2 && origins.size(1) == 3 && origins.is_contiguous() && origins.device().is_cpu(),
              "raymarch: origins must be a contiguous CPU (R, 3) tensor");
  TORCH_CHECK(directions.sizes() == origins.sizes() && directions.is_contiguous(),
              "raymarch: directions must be contiguous and shaped like origins");
  TORCH_CHECK(origins.scalar_type() == table.scalar_type() && directions.scalar_type() == table.scalar_type(),
              "raymarch: origins, directions and table must share a dtype");
}

// Calls fn(voxel_tag) with the C++ type of the volume's dtype.
template <typename Fn>
void dispatch_voxels(const torch::Tensor& volume, Fn&& fn) {
  switch (volume.scalar_type()) {
    case torch::kUInt8: return fn(uint8_t{});
    case torch::kInt8: return fn(int8_t{});
    case torch::kInt16: return fn(int16_t{});
    case torch::kUInt16: return fn(uint16_t{});
    case torch::kInt32: return fn(int32_t{});
    case torch::kFloat32: return fn(float{});
    case torch::kFloat64: return fn(double{});
    default: TORCH_CHECK(false, "raymarch: unsupported volume dtype ", volume.scalar_type());
  }
}

template <typename scalar_t>
std::vector<int64_t> forward_impl(const torch::Tensor& origins, const torch::Tensor& directions, const torch::Tensor& box,
                                  const torch::Tensor& volume, const torch::Tensor& grid_params, const torch::Tensor& table,
                                  const std::vector<torch::Tensor>& occupied, const torch::Tensor& cell_box,
                                  const torch::Tensor& offsets, int64_t num_samples, double early_stop_eps,
                                  double normal_eps, bool shading, bool suspend_on_nan, const torch::Tensor& rays,
                                  torch::Tensor& sums, torch::Tensor& transmittance, torch::Tensor& next_sample,
                                  torch::Tensor& suspended_cells, int64_t threads) {
  const int64_t num_rays = origins.size(0);
  std::vector<int64_t> totals(3, 0);
  const auto opt = make_options<scalar_t>(box, table, offsets, num_samples, early_stop_eps, normal_eps, shading,
                                          suspend_on_nan, sums.size(1), num_rays);
  Cells cells;
  const bool skip = make_cells(occupied, cell_box, cells);
  const scalar_t* o = origins.data_ptr<scalar_t>();
  const scalar_t* d = directions.data_ptr<scalar_t>();
  scalar_t* sum = sums.data_ptr<scalar_t>();
  scalar_t* trans = transmittance.data_ptr<scalar_t>();
  int64_t* next = next_sample.data_ptr<int64_t>();
  int64_t* nan_cells = suspended_cells.data_ptr<int64_t>();
  const int64_t* subset = rays.numel() ? rays.data_ptr<int64_t>() : nullptr;
  const int64_t count = subset ? rays.numel() : num_rays;
  const int64_t packet_rays = g_packet_rays.load();
  const int64_t packets = (count + packet_rays - 1) / packet_rays;
  dispatch_voxels(volume, [&](auto voxel_tag) {
    using voxel_t = decltype(voxel_tag);
    const auto grid = make_grid<voxel_t, scalar_t>(volume, grid_params);
    const Marcher<voxel_t, scalar_t> marcher{grid, skip ? &cells : nullptr, opt};
    std::atomic<int64_t> hits{0}, evaluated{0}, suspended{0};
    gridinr::parallel_items(packets, threads, no_scratch, [&](int64_t packet, int) {
      int64_t packet_hits = 0, packet_evaluated = 0, packet_suspended = 0;
      const int64_t end = std::min(count, (packet + 1) * packet_rays);
      for (int64_t k = packet * packet_rays; k < end; ++k) {
        const int64_t r = subset ? subset[k] : k;
        if (next[r] < 0) continue;
        scalar_t t_near, t_far;
        if (next[r] == 0 && intersect(o + 3 * r, d + 3 * r, opt.box_low, opt.box_high, t_near, t_far)) ++packet_hits;
        scalar_t T = trans[r];
        Accumulate<scalar_t> add{sum + r * opt.channels, opt.channels};
        next[r] = marcher.march(r, o + 3 * r, d + 3 * r, next[r], T, packet_evaluated, nan_cells + 3 * r, add);
        trans[r] = T;
        packet_suspended += next[r] >= 0;
      }
      hits.fetch_add(packet_hits, std::memory_order_relaxed);
      evaluated.fetch_add(packet_evaluated, std::memory_order_relaxed);
      suspended.fetch_add(packet_suspended, std::memory_order_relaxed);
    });
    totals = {hits.load(), evaluated.load(), suspended.load()};
  });
  return totals;
}

template <typename scalar_t>
void backward_impl(const torch::Tensor& origins, const torch::Tensor& directions, const torch::Tensor& box,
                   const torch::Tensor& volume, const torch::Tensor& grid_params, const torch::Tensor& table,
                   const std::vector<torch::Tensor>& occupied, const torch::Tensor& cell_box, const torch::Tensor& offsets,
                   int64_t num_samples, double early_stop_eps, double normal_eps, bool shading,
                   const torch::Tensor& sums, const torch::Tensor& grad_sums, torch::Tensor& grad_table,
                   int64_t threads) {
  const int64_t num_rays = origins.size(0);
  const int64_t channels = sums.size(1);
  const auto opt = make_options<scalar_t>(box, table, offsets, num_samples, early_stop_eps, normal_eps, shading,
                                          false, channels, num_rays);
  Cells cells;
  const bool skip = make_cells(occupied, cell_box, cells);
  const scalar_t* o = origins.data_ptr<scalar_t>();
  const scalar_t* d = directions.data_ptr<scalar_t>();
  const scalar_t* out = sums.data_ptr<scalar_t>();
  const scalar_t* grad = grad_sums.data_ptr<scalar_t>();
  const int64_t entries = 4 * table.size(0);
  // Rays fall into a fixed number of consecutive groups, each with its own table gradient, summed in group order:
  // the result does not depend on which thread took which group (a resumed run repeats its steps exactly).
  const int64_t groups = std::min<int64_t>(kGradientGroups, std::max<int64_t>(1, (num_rays + kPacket - 1) / kPacket));
  std::vector<std::vector<scalar_t>> partial(groups);
  dispatch_voxels(volume, [&](auto voxel_tag) {
    using voxel_t = decltype(voxel_tag);
    const auto grid = make_grid<voxel_t, scalar_t>(volume, grid_params);
    const Marcher<voxel_t, scalar_t> marcher{grid, skip ? &cells : nullptr, opt};
    gridinr::parallel_items(groups, threads, no_scratch, [&](int64_t group, int) {
      auto& table_grad = partial[group];
      table_grad.assign(entries, scalar_t(0));
      int64_t evaluated = 0;
      const int64_t end = num_rays * (group + 1) / groups;
      for (int64_t r = num_rays * group / groups; r < end; ++r) {
        const scalar_t* g = grad + r * channels;
        scalar_t total = 0;
        bool any = false;
        for (int64_t c = 0; c < channels; ++c) {
          total += g[c] * out[r * channels + c];
          any |= g[c] != scalar_t(0);
        }
        if (!any) continue;
        TableGradient<scalar_t> accumulate{g, total, scalar_t(0), channels, table_grad.data()};
        scalar_t T = 1;
        int64_t nan_cell[3];
        marcher.march(r, o + 3 * r, d + 3 * r, 0, T, evaluated, nan_cell, accumulate);
      }
    });
  });
  scalar_t* result = grad_table.data_ptr<scalar_t>();
  for (const auto& part : partial)
    for (int64_t e = 0; e < static_cast<int64_t>(part.size()); ++e) result[e] += part[e];
}

// ---------------------------------------------------------------------------------------------- entry points

// Marches rays `rays` (int64 indices; empty: all) from their state: sums (R, C), transmittance (R,) and
// next_sample (R,) int64 (the sample to start from) are read and updated in place; next_sample becomes -1 when
// the ray is finished, or the sample where it suspended on an undecoded (NaN) lattice value, whose lattice cell
// (x, y, z) goes to suspended_cells (R, 3).
// Returns int64 [rays hitting the box, samples evaluated, rays suspended].
torch::Tensor forward(const torch::Tensor& origins, const torch::Tensor& directions, const torch::Tensor& box,
                      const torch::Tensor& volume, const torch::Tensor& grid_params, const torch::Tensor& table,
                      const std::vector<torch::Tensor>& occupied, const torch::Tensor& cell_box, const torch::Tensor& offsets,
                      int64_t num_samples, double early_stop_eps, double normal_eps, bool shading,
                      bool suspend_on_nan, const torch::Tensor& rays, torch::Tensor sums, torch::Tensor transmittance,
                      torch::Tensor next_sample, torch::Tensor suspended_cells, int64_t threads) {
  check_rays(origins, directions, table);
  const int64_t num_rays = origins.size(0);
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == num_rays && sums.is_contiguous() &&
                  sums.scalar_type() == table.scalar_type(),
              "raymarch: sums must be a contiguous (R, C) tensor of the table's dtype");
  TORCH_CHECK(transmittance.numel() == num_rays && transmittance.is_contiguous() &&
                  transmittance.scalar_type() == table.scalar_type(),
              "raymarch: transmittance must be a contiguous (R,) tensor of the table's dtype");
  TORCH_CHECK(next_sample.numel() == num_rays && next_sample.is_contiguous() &&
                  next_sample.scalar_type() == torch::kInt64,
              "raymarch: next_sample must be a contiguous int64 (R,) tensor");
  TORCH_CHECK(suspended_cells.dim() == 2 && suspended_cells.size(0) == num_rays && suspended_cells.size(1) == 3 &&
                  suspended_cells.is_contiguous() && suspended_cells.scalar_type() == torch::kInt64,
              "raymarch: suspended_cells must be a contiguous int64 (R, 3) tensor");
  TORCH_CHECK(rays.numel() == 0 || (rays.scalar_type() == torch::kInt64 && rays.is_contiguous()),
              "raymarch: rays must be contiguous int64 indices");
  std::vector<int64_t> totals;
  if (table.scalar_type() == torch::kFloat64)
    totals = forward_impl<double>(origins, directions, box, volume, grid_params, table, occupied, cell_box, offsets,
                                  num_samples, early_stop_eps, normal_eps, shading, suspend_on_nan, rays, sums,
                                  transmittance, next_sample, suspended_cells, thread_count(threads));
  else if (table.scalar_type() == torch::kFloat32)
    totals = forward_impl<float>(origins, directions, box, volume, grid_params, table, occupied, cell_box, offsets,
                                 num_samples, early_stop_eps, normal_eps, shading, suspend_on_nan, rays, sums,
                                 transmittance, next_sample, suspended_cells, thread_count(threads));
  else
    TORCH_CHECK(false, "raymarch: the table must be float32 or float64");
  return torch::tensor(totals, torch::kInt64);
}

// dLoss/dtable (L, 4) for the forward sums `sums` (R, C) and their gradient `grad_sums` (R, C).
torch::Tensor backward(const torch::Tensor& origins, const torch::Tensor& directions, const torch::Tensor& box,
                       const torch::Tensor& volume, const torch::Tensor& grid_params, const torch::Tensor& table,
                       const std::vector<torch::Tensor>& occupied, const torch::Tensor& cell_box, const torch::Tensor& offsets,
                       int64_t num_samples, double early_stop_eps, double normal_eps, bool shading,
                       const torch::Tensor& sums, const torch::Tensor& grad_sums, int64_t threads) {
  check_rays(origins, directions, table);
  const int64_t num_rays = origins.size(0);
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == num_rays && sums.is_contiguous() && grad_sums.sizes() == sums.sizes() &&
                  grad_sums.is_contiguous() && sums.scalar_type() == table.scalar_type() &&
                  grad_sums.scalar_type() == table.scalar_type(),
              "raymarch: sums and grad_sums must be contiguous (R, C) tensors of the table's dtype");
  auto grad_table = torch::zeros_like(table);
  if (table.scalar_type() == torch::kFloat64)
    backward_impl<double>(origins, directions, box, volume, grid_params, table, occupied, cell_box, offsets,
                          num_samples, early_stop_eps, normal_eps, shading, sums, grad_sums, grad_table,
                          thread_count(threads));
  else if (table.scalar_type() == torch::kFloat32)
    backward_impl<float>(origins, directions, box, volume, grid_params, table, occupied, cell_box, offsets,
                         num_samples, early_stop_eps, normal_eps, shading, sums, grad_sums, grad_table,
                          thread_count(threads));
  else
    TORCH_CHECK(false, "raymarch: the table must be float32 or float64");
  return grad_table;
}

// Sets the rays per work item of the forward (>= 1) and returns the previous size.
int64_t set_packet_rays(int64_t rays) {
  TORCH_CHECK(rays >= 1, "raymarch: packets hold at least one ray");
  return g_packet_rays.exchange(rays);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU ray marcher over voxel grids with a transfer-function table (forward and table gradient)";
  // Both take `threads` last (0: torch's intra-op count); their results are the same for any value.
  m.def("forward", &forward, "March rays through the grid; updates sums, transmittance, next_sample in place");
  m.def("backward", &backward, "Gradient of the loss w.r.t. the transfer-function table (L, 4)");
  m.def("set_packet_rays", &set_packet_rays, "Rays per dynamically scheduled work item of the forward; returns the old");
}
