// Fused per-row soft sorting network on the CPU (neco_loss.sorting.kernels.cpp; built by setup.py).
//
// One row at a time, in cache: the relaxed comparator network runs on the values once, the
// permutation state Y (wire-major, n_wires x n) is mixed in place, layer by layer, touching only
// the columns a comparator can reach (bitonic blocks). Backward recomputes the row's forward
// (the values at each layer input and, for the permutation, the touched segments of Y) in a
// per-thread scratch buffer, so nothing but the input x is held between forward and backward.
//
// The values and swap probabilities follow neco_loss/sorting/native.py and relaxations.py
// operation for operation (diffsort 0.2.0's formulas), in double precision for float tensors
// too (values_pass says why), so that both backends agree to rounding in float64 and the
// float32 results do not depend on the CPU, the vector width or the libm.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#include <optional>
#include <vector>

namespace {

using Wide = double;  // the precision of the values pass (values_pass)

constexpr double kPi = 3.14159265358979323846;
constexpr double kPhiEpsilon = 1e-10;      // relaxations.PHI_EPSILON
constexpr double kOptimalEpsilon = 1e-10;  // relaxations.OPTIMAL_EPSILON
// Comparators mix whole blocks of 8 columns (plan.py's COLUMN_BLOCK): no scalar loop tails.
// Columns beyond a comparator's reach are zero in both rows, so the extra work is harmless.
constexpr int64_t kColumnBlock = 8;

enum Relaxation : int64_t {  // plan.py's RELAXATION_CODES
  kCauchy = 0,
  kLogistic = 1,
  kLogisticPhi = 2,
  kGaussian = 3,
  kReciprocal = 4,
  kOptimal = 5,
};

// atan in double: Cephes' atan (range reduction to |x| <= 0.66, then x + x^3 P(x^2) / Q(x^2)
// with degree-4 polynomials; relative error ~2e-16, as libm's), written branch-free so that
// a layer's swap probabilities vectorise (libm's atan is a scalar call: 1.5x slower per step).
inline double atan_of(double v) {
  constexpr double kTan3Pi8 = 2.41421356237309504880;
  constexpr double kMoreBits = 6.123233995736765886130e-17;  // pi / 2 - double(pi / 2)
  const double x = std::abs(v);
  const bool big = x > kTan3Pi8;
  const bool middle = !big && x > 0.66;
  // One division for the three branches (branch-free code evaluates every branch).
  const double reduced = (big ? -1.0 : (middle ? x - 1.0 : x)) / (big ? x : (middle ? x + 1.0 : 1.0));
  const double offset = big ? 1.57079632679489661923 : (middle ? 0.78539816339744830962 : 0.0);
  const double extra = big ? kMoreBits : (middle ? 0.5 * kMoreBits : 0.0);
  const double z = reduced * reduced;
  const double p =
      (((-8.750608600031904122785e-1 * z - 1.615753718733365076637e1) * z -
        7.500855792314704667340e1) * z - 1.228866684490136173410e2) * z -
      6.485021904942025371773e1;
  const double q =
      ((((z + 2.485846490142306297962e1) * z + 1.650270098316988542046e2) * z +
        4.328810604912902668951e2) * z + 4.853903996359136964868e2) * z +
      1.945506571482613964425e2;
  const double result = offset + (reduced * (z * p / q) + reduced + extra);
  return v < 0.0 ? -result : result;
}

// log: the float version is Cephes' logf (exponent split + a degree-9 polynomial, relative
// error ~1e-7) for positive normal inputs, branch-free so that the CE loops vectorise; double
// keeps libm's.
template <typename T>
inline T log_of(T v) {
  return std::log(v);
}

template <>
inline float log_of<float>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  int32_t exponent = static_cast<int32_t>((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x807fffffu) | 0x3f000000u;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool small = m < 0.707106781186547524f;
  exponent -= small ? 1 : 0;
  const float x = small ? m + m - 1.0f : m - 1.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  const float e = static_cast<float>(exponent);
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return x + y + 0.693359375f * e;
}

// The swap probability of a comparator and its derivative, in double precision whatever the
// tensors' dtype: see values_pass.
struct Relax {
  using T = double;
  int64_t kind;
  T steepness;
  T art_lambda;

  static T sigmoid(T z) { return T(1) / (T(1) + std::exp(-z)); }

  T cauchy(T delta) const {
    T v = steepness * delta;
    return T(1 / kPi) * atan_of(v) + T(0.5);
  }
  T logistic(T delta) const { return sigmoid(delta * steepness); }
  T logistic_phi(T delta) const {
    T scale = std::pow(std::abs(delta) + T(kPhiEpsilon), art_lambda);
    return sigmoid(delta * steepness / scale);
  }
  T gaussian(T delta) const {
    T sigma = T(1 / steepness);
    return T(0.5) + T(0.5) * std::erf(delta / sigma / T(std::sqrt(2.0)));
  }
  T reciprocal(T delta) const {
    T v = steepness * delta;
    return T(0.5) * (v / (T(2) + std::abs(v)) + T(1));
  }
  T optimal(T delta) const {
    T v = steepness * delta;
    T outside = T(v > T(0.25)) - T(v < T(-0.25));
    T clamped = std::min(std::max(v, T(-0.25)), T(0.25));
    return clamped + T(0.5) +
           outside * (T(0.25) - T(1.0 / 16) / (std::abs(v) + T(kOptimalEpsilon)));
  }

  // Replace the gaps delta[0 .. count) by their swap probabilities; one loop per kind, so
  // that the loop vectorises where the formula does.
  void alphas(T* delta, int64_t count) const {
    switch (kind) {
      case kCauchy:
#pragma omp simd
        for (int64_t k = 0; k < count; ++k) delta[k] = cauchy(delta[k]);
        break;
      case kLogistic:
        for (int64_t k = 0; k < count; ++k) delta[k] = logistic(delta[k]);
        break;
      case kLogisticPhi:
        for (int64_t k = 0; k < count; ++k) delta[k] = logistic_phi(delta[k]);
        break;
      case kGaussian:
        for (int64_t k = 0; k < count; ++k) delta[k] = gaussian(delta[k]);
        break;
      case kReciprocal:
#pragma omp simd
        for (int64_t k = 0; k < count; ++k) delta[k] = reciprocal(delta[k]);
        break;
      default:
        for (int64_t k = 0; k < count; ++k) delta[k] = optimal(delta[k]);
    }
  }

  T dalpha(T delta) const {
    switch (kind) {
      case kCauchy: {
        T v = steepness * delta;
        return T(steepness / kPi) / (T(1) + v * v);
      }
      case kLogistic: {
        T a = sigmoid(delta * steepness);
        return a * (T(1) - a) * steepness;
      }
      case kLogisticPhi: {
        T scale = std::abs(delta) + T(kPhiEpsilon);
        T a = sigmoid(delta * steepness / std::pow(scale, art_lambda));
        T inner = steepness * std::pow(scale, -art_lambda - T(1)) *
                  (scale - art_lambda * std::abs(delta));
        return a * (T(1) - a) * inner;
      }
      case kGaussian: {
        T sigma = T(1 / steepness);
        T z = delta / sigma;
        return T(1 / (1 / steepness) / std::sqrt(kPi * 2)) * std::exp(T(-0.5) * (z * z));
      }
      case kReciprocal: {
        T v = steepness * delta;
        T d = T(2) + std::abs(v);
        return steepness / (d * d);
      }
      default: {  // kOptimal
        T v = steepness * delta;
        T inside = T(std::abs(v) < T(0.25));
        T outside = T(std::abs(v) > T(0.25));
        T s = std::abs(v) + T(kOptimalEpsilon);
        T tail = T(1.0 / 16) / (s * s);
        return steepness * (inside + outside * tail);
      }
    }
  }
};

// The network of one (network, n): comparators of all layers, flattened.
struct Plan {
  int64_t n;
  int64_t ld;  // row stride of the permutation state: n rounded up to kColumnBlock
  int64_t n_wires;
  int64_t n_layers;
  const int64_t* layer_offsets;  // (n_layers + 1,) into the comparator arrays
  const int64_t* comparators;    // (C, 5): wire a, wire b, sign (+1, -1, 0), first col, end col
  const double* fixed;           // (C,): c1 of the fixed comparators (sign 0)
  const int64_t* tape_offsets;   // (C + 1,): where a comparator's row difference goes in the tape
  int64_t n_dropped() const { return n_wires - n; }
  int64_t n_comparators() const { return layer_offsets[n_layers]; }
  int64_t tape_size() const { return tape_offsets[n_comparators()]; }
};

inline void coefficients(const Plan& plan, int64_t c, Wide alpha, Wide* c1, Wide* c2) {
  const int64_t sign = plan.comparators[5 * c + 2];
  const Wide one_minus = Wide(1) - alpha;
  if (sign > 0) {
    *c1 = alpha;
    *c2 = one_minus;
  } else if (sign < 0) {
    *c1 = one_minus;
    *c2 = alpha;
  } else {
    *c1 = plan.fixed[c];
    *c2 = Wide(1) - plan.fixed[c];
  }
}

// Mix two rows of the permutation state: a' = b + c1 (a - b), b' = a - c1 (a - b), over
// columns [lo, hi) (multiples of kColumnBlock). With kRecord, also keep a - b in
// difference[lo .. hi) (indexed by column) for backward.
template <bool kRecord, typename T>
inline void mix_rows(T* __restrict ya, T* __restrict yb, int64_t lo, int64_t hi, T c1,
                     T* __restrict difference) {
  for (int64_t j0 = lo; j0 < hi; j0 += kColumnBlock) {
#pragma omp simd
    for (int64_t j = j0; j < j0 + kColumnBlock; ++j) {
      const T a = ya[j], b = yb[j];
      const T gap = a - b;
      if constexpr (kRecord) difference[j] = gap;
      ya[j] = b + c1 * gap;
      yb[j] = a - c1 * gap;
    }
  }
}

// Between the wire-major state (row stride ld; its rows are the ranks) and the element-major
// permutation (row stride n): perm[e * n + rank] = state[rank * ld + e], in tiles that stay
// in L1 (a plain strided loop misses the cache on every store for n >= 64).
template <typename T>
void transpose_block(const T* src, T* dst, int64_t n, int64_t ld, bool to_element_major) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < n; i0 += kTile) {
    const int64_t i1 = std::min(i0 + kTile, n);
    for (int64_t j0 = 0; j0 < n; j0 += kTile) {
      const int64_t j1 = std::min(j0 + kTile, n);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) {
          if (to_element_major) {
            dst[j * n + i] = src[i * ld + j];  // src: state, dst: permutation
          } else {
            dst[i * ld + j] = src[j * n + i];  // src: permutation, dst: state
          }
        }
      }
    }
  }
}

// Per-thread working memory of one row.
// The values and the comparators' weights are held in double (Wide), the permutation state in
// the tensors' dtype T: see values_pass.
template <typename T>
struct Scratch {
  std::vector<Wide> values;        // (n_wires,)
  std::vector<Wide> layer_values;  // (n_layers, n_wires): values at each layer's input
  std::vector<Wide> c1, c2;        // (C,)
  std::vector<T> y;                // (n_wires, n) permutation state, wire-major
  std::vector<T> y_teacher;        // (n_wires, n) the teacher's, for the fused loss
  std::vector<T> tape;             // ya - yb at each comparator's input, its columns only
  std::vector<T> grad_y;           // (n_wires, n)
  std::vector<Wide> grad_alpha;    // (C,) d loss / d c1 through the permutation
  std::vector<Wide> grad_values;   // (n_wires,)
  std::vector<Wide> delta;         // (n_wires,) one layer's gaps, then their swap probabilities

  explicit Scratch(const Plan& plan, bool backward, bool teacher) {
    const int64_t w = plan.n_wires, n = plan.ld;
    values.resize(w);
    y.resize(w * n);
    c1.resize(plan.n_comparators());
    c2.resize(plan.n_comparators());
    delta.resize(w);
    if (teacher) y_teacher.resize(w * n);
    if (backward) {
      layer_values.resize(plan.n_layers * w);
      tape.resize(plan.tape_size());
      grad_y.resize(w * n);
      grad_alpha.resize(plan.n_comparators());
      grad_values.resize(w);
    }
  }
};

// Run the network on the values of one row: they end in `values`, every comparator's weights
// in scratch c1 / c2; with `record` also each layer's input values (for backward). The swap
// probabilities of a layer are computed in one loop over its comparators.
//
// In double precision for float tensors too: the values feed back into the next layer's swap
// probabilities, and for nearly tied inputs the relaxed network amplifies a rounding
// difference by orders of magnitude over many layers (odd-even, n = 96, Gaussian: float32
// results 1e-4 from float64 either way, diffsort's included, decided by the last bit of libm's
// or torch's erf). In double that loop stays exact to float32's resolution on every CPU and
// libm; the permutation state, whose mixing is a product of stochastic 2x2 steps and does not
// amplify rounding, stays in the tensors' dtype. Costs ~n log^2 n double operations per row
// against ~n^2 log^2 n for the state.
template <typename T>
void values_pass(const Plan& plan, const Relax& relax, const T* x, Wide* values, bool record,
                 Scratch<T>* s) {
  const int64_t n = plan.n, d = plan.n_dropped();
  for (int64_t w = 0; w < d; ++w) values[w] = Wide(0);
  for (int64_t e = 0; e < n; ++e) values[d + e] = Wide(x[e]);
  Wide* alpha = s->delta.data();
  for (int64_t layer = 0; layer < plan.n_layers; ++layer) {
    if (record) {
      std::copy(values, values + plan.n_wires, s->layer_values.data() + layer * plan.n_wires);
    }
    const int64_t first = plan.layer_offsets[layer], count = plan.layer_offsets[layer + 1] - first;
    const int64_t* comparators = plan.comparators + 5 * first;
    for (int64_t k = 0; k < count; ++k) {
      alpha[k] = values[comparators[5 * k + 1]] - values[comparators[5 * k]];
    }
    relax.alphas(alpha, count);
    for (int64_t k = 0; k < count; ++k) {
      const int64_t a = comparators[5 * k], b = comparators[5 * k + 1], c = first + k;
      Wide c1, c2;
      coefficients(plan, c, alpha[k], &c1, &c2);
      const Wide va = values[a], vb = values[b];
      values[a] = va * c1 + vb * c2;
      values[b] = va * c2 + vb * c1;
      s->c1[c] = c1;
      s->c2[c] = c2;
    }
  }
}

// Build the permutation state `y` (wire-major, n_wires x n) from the weights in scratch c1;
// with `record`, keep each comparator's input difference ya - yb in the tape: all that
// backward needs of the state (d loss / d c1 = sum_j (ga_j - gb_j) (ya_j - yb_j)).
template <typename T>
void permutation_pass(const Plan& plan, T* y, bool record, Scratch<T>* s) {
  const int64_t ld = plan.ld, d = plan.n_dropped();
  std::fill(y, y + plan.n_wires * ld, T(0));
  for (int64_t e = 0; e < plan.n; ++e) y[(d + e) * ld + e] = T(1);
  for (int64_t c = 0; c < plan.n_comparators(); ++c) {
    const int64_t* comparator = plan.comparators + 5 * c;
    const int64_t lo = comparator[3], hi = comparator[4];
    T* ya = y + comparator[0] * ld;
    T* yb = y + comparator[1] * ld;
    if (record) {
      T* tape = s->tape.data() + plan.tape_offsets[c] - lo;  // indexed by column
      mix_rows<true>(ya, yb, lo, hi, T(s->c1[c]), tape);
    } else {
      mix_rows<false>(ya, yb, lo, hi, T(s->c1[c]), static_cast<T*>(nullptr));
    }
  }
}

// Both passes on one row: values in `values`, the permutation (if `y`) in `y`.
template <typename T>
void run_row(const Plan& plan, const Relax& relax, const T* x, Wide* values, T* y, bool record,
             Scratch<T>* s) {
  values_pass(plan, relax, x, values, record, s);
  if (y != nullptr) permutation_pass(plan, y, record, s);
}

// Backward of one row from the recorded forward: gradient of the permutation state `grad_y`
// (wire-major; may be null) and of the sorted values (may be null) -> d loss / d x.
template <typename T>
void backward_row(const Plan& plan, const Relax& relax, const T* grad_sorted, bool has_grad_y,
                  Scratch<T>* s, T* grad_x) {
  const int64_t n = plan.n, d = plan.n_dropped(), w = plan.n_wires;
  if (has_grad_y) {
    T* g = s->grad_y.data();
    for (int64_t layer = plan.n_layers - 1; layer >= 0; --layer) {
      for (int64_t c = plan.layer_offsets[layer]; c < plan.layer_offsets[layer + 1]; ++c) {
        const int64_t* comparator = plan.comparators + 5 * c;
        const int64_t a = comparator[0], b = comparator[1], lo = comparator[3], hi = comparator[4];
        const T* difference = s->tape.data() + plan.tape_offsets[c] - lo;  // by column
        T* __restrict ga = g + a * plan.ld;
        T* __restrict gb = g + b * plan.ld;
        const T c1 = T(s->c1[c]);
        T sum = T(0);  // a vectorised reduction: summed in SIMD lanes, not in column order
        // One pass: d loss / d c1 from the output gradients, then the (symmetric) mix.
#pragma omp simd reduction(+ : sum)
        for (int64_t j = lo; j < hi; ++j) {
          const T grad_a = ga[j], grad_b = gb[j];
          const T grad_difference = grad_a - grad_b;
          sum += grad_difference * difference[j];
          const T change = c1 * grad_difference;
          ga[j] = grad_b + change;
          gb[j] = grad_a - change;
        }
        s->grad_alpha[c] = sum;
      }
    }
  }
  Wide* gv = s->grad_values.data();  // the values' gradients, in double as the values
  for (int64_t i = 0; i < d; ++i) gv[i] = Wide(0);
  for (int64_t e = 0; e < n; ++e) gv[d + e] = grad_sorted != nullptr ? Wide(grad_sorted[e]) : 0;
  for (int64_t layer = plan.n_layers - 1; layer >= 0; --layer) {
    const Wide* v = s->layer_values.data() + layer * w;
    for (int64_t c = plan.layer_offsets[layer]; c < plan.layer_offsets[layer + 1]; ++c) {
      const int64_t* comparator = plan.comparators + 5 * c;
      const int64_t a = comparator[0], b = comparator[1], sign = comparator[2];
      const Wide ga = gv[a], gb = gv[b];
      Wide grad_alpha = (ga - gb) * (v[a] - v[b]);
      if (has_grad_y) grad_alpha = grad_alpha + s->grad_alpha[c];
      grad_alpha = grad_alpha * Wide(sign);
      const Wide grad_delta = grad_alpha * relax.dalpha(v[b] - v[a]);
      const Wide c1 = s->c1[c], c2 = s->c2[c];
      gv[a] = c1 * ga + c2 * gb - grad_delta;
      gv[b] = c2 * ga + c1 * gb + grad_delta;
    }
  }
  for (int64_t e = 0; e < n; ++e) grad_x[e] = T(gv[d + e]);
}

Plan make_plan(const torch::Tensor& layer_offsets, const torch::Tensor& comparators,
               const torch::Tensor& fixed, const torch::Tensor& tape_offsets, int64_t n,
               int64_t n_wires) {
  TORCH_CHECK(layer_offsets.dtype() == torch::kInt64 && comparators.dtype() == torch::kInt64 &&
                  tape_offsets.dtype() == torch::kInt64 && fixed.dtype() == torch::kFloat64,
              "plan tensors have the wrong dtypes");
  TORCH_CHECK(layer_offsets.is_contiguous() && comparators.is_contiguous() &&
                  fixed.is_contiguous() && tape_offsets.is_contiguous(),
              "plan tensors must be contiguous");
  return Plan{n,
              (n + kColumnBlock - 1) / kColumnBlock * kColumnBlock,
              n_wires,
              layer_offsets.numel() - 1,
              layer_offsets.data_ptr<int64_t>(),
              comparators.data_ptr<int64_t>(),
              fixed.data_ptr<double>(),
              tape_offsets.data_ptr<int64_t>()};
}

Relax make_relax(int64_t kind, double steepness, double art_lambda) {
  return Relax{kind, steepness, art_lambda};
}

// Flush denormals to zero in this thread while a kernel runs: permutation entries far below
// any probability that matters (products of many small swap weights) would otherwise run
// through the CPU's slow denormal path. Results change by less than 1.2e-38 (float).
class FlushDenormals {
 public:
  FlushDenormals() {
#if defined(__SSE__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040);  // FTZ | DAZ
#endif
  }
  ~FlushDenormals() {
#if defined(__SSE__)
    _mm_setcsr(saved_);
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned int saved_ = 0;
};

constexpr int64_t kGrain = 8;  // rows per task of at::parallel_for

void check_rows(const torch::Tensor& x, int64_t n, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == n, name, " must be (rows, ", n, ")");
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

}  // namespace

// Forward: x (rows, n) -> sorted (rows, n), perm (rows, n, n) element-major (perm[r, i, j] =
// probability that element i lands at rank j); with_perm = false skips the permutation.
std::vector<torch::Tensor> sort_forward(torch::Tensor x, torch::Tensor layer_offsets,
                                        torch::Tensor comparators, torch::Tensor fixed,
                                        torch::Tensor tape_offsets, int64_t n_wires,
                                        int64_t relaxation, double steepness, double art_lambda,
                                        bool with_perm) {
  const int64_t n = x.size(1), rows = x.size(0);
  check_rows(x, n, "x");
  const Plan plan = make_plan(layer_offsets, comparators, fixed, tape_offsets, n, n_wires);
  auto sorted = torch::empty_like(x);
  auto perm = with_perm ? torch::empty({rows, n, n}, x.options()) : torch::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "neco_sort_forward", [&] {
    const auto relax = make_relax(relaxation, steepness, art_lambda);
    const scalar_t* xs = x.data_ptr<scalar_t>();
    scalar_t* out = sorted.data_ptr<scalar_t>();
    scalar_t* out_perm = with_perm ? perm.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
      FlushDenormals flush;
      Scratch<scalar_t> s(plan, false, false);
      const int64_t d = plan.n_dropped();
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* y = with_perm ? s.y.data() : nullptr;
        run_row(plan, relax, xs + r * n, s.values.data(), y, false, &s);
        for (int64_t e = 0; e < n; ++e) out[r * n + e] = scalar_t(s.values[d + e]);
        if (with_perm) transpose_block(y + d * plan.ld, out_perm + r * n * n, n, plan.ld, true);
      }
    });
  });
  return {sorted, perm};
}

// Backward: d loss / d x from d loss / d sorted and d loss / d perm (either may be undefined).
torch::Tensor sort_backward(torch::Tensor x, std::optional<torch::Tensor> grad_sorted_opt,
                            std::optional<torch::Tensor> grad_perm_opt,
                            torch::Tensor layer_offsets, torch::Tensor comparators,
                            torch::Tensor fixed, torch::Tensor tape_offsets, int64_t n_wires,
                            int64_t relaxation, double steepness, double art_lambda) {
  const int64_t n = x.size(1), rows = x.size(0);
  check_rows(x, n, "x");
  const torch::Tensor grad_sorted = grad_sorted_opt.value_or(torch::Tensor());
  const torch::Tensor grad_perm = grad_perm_opt.value_or(torch::Tensor());
  const bool has_sorted = grad_sorted.defined(), has_perm = grad_perm.defined();
  if (has_sorted) check_rows(grad_sorted, n, "grad_sorted");
  if (has_perm) {
    TORCH_CHECK(grad_perm.dim() == 3 && grad_perm.size(0) == rows && grad_perm.size(1) == n &&
                    grad_perm.size(2) == n && grad_perm.is_contiguous(),
                "grad_perm must be contiguous (rows, n, n)");
  }
  const Plan plan = make_plan(layer_offsets, comparators, fixed, tape_offsets, n, n_wires);
  auto grad_x = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "neco_sort_backward", [&] {
    const auto relax = make_relax(relaxation, steepness, art_lambda);
    const scalar_t* xs = x.data_ptr<scalar_t>();
    const scalar_t* gs = has_sorted ? grad_sorted.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = has_perm ? grad_perm.data_ptr<scalar_t>() : nullptr;
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
      FlushDenormals flush;
      Scratch<scalar_t> s(plan, true, false);
      const int64_t d = plan.n_dropped();
      for (int64_t r = begin; r < end; ++r) {
        run_row(plan, relax, xs + r * n, s.values.data(), has_perm ? s.y.data() : nullptr, true,
                &s);
        if (has_perm) {
          scalar_t* g = s.grad_y.data();
          std::fill(g, g + plan.n_wires * plan.ld, scalar_t(0));
          transpose_block(gp + r * n * n, g + d * plan.ld, n, plan.ld, false);
        }
        backward_row(plan, relax, gs != nullptr ? gs + r * n : nullptr, has_perm, &s, gx + r * n);
      }
    });
  });
  return grad_x;
}

namespace {

// Per-row permutation loss of the student's state ys against the teacher's yt (both
// wire-major), over ranks [first_rank, n): CE teacher->student and/or student->teacher, mean
// over elements. Probabilities are clamped to >= epsilon before their log, as in
// permutation_losses.
template <typename T>
T cross_entropy_row(const Plan& plan, const T* ys, const T* yt, int64_t first_rank, T weight_ts,
                    T weight_st, T epsilon) {
  const int64_t n = plan.n, ld = plan.ld, d = plan.n_dropped();
  T total = T(0);
  for (int64_t rank = first_rank; rank < n; ++rank) {
    const T* s_row = ys + (d + rank) * ld;
    const T* t_row = yt + (d + rank) * ld;
    if (weight_st == T(0)) {  // the reference's direction: no log of the teacher's entries
#pragma omp simd reduction(+ : total)
      for (int64_t e = 0; e < n; ++e) {
        const T qs = s_row[e];
        total -= weight_ts * t_row[e] * log_of(qs < epsilon ? epsilon : qs);
      }
      continue;
    }
#pragma omp simd reduction(+ : total)
    for (int64_t e = 0; e < n; ++e) {
      const T qs = s_row[e], qt = t_row[e];
      const T log_s = log_of(qs < epsilon ? epsilon : qs);
      const T log_t = log_of(qt < epsilon ? epsilon : qt);
      total -= weight_ts * qt * log_s + weight_st * qs * log_t;
    }
  }
  return total / T(n);
}

// d cross_entropy_row / d ys, times `scale`, into grad (wire-major, zero elsewhere). The clamp
// passes the gradient where qs >= epsilon, as torch.clamp_min.
template <typename T>
void cross_entropy_grad_row(const Plan& plan, const T* ys, const T* yt, int64_t first_rank,
                            T weight_ts, T weight_st, T epsilon, T scale, T* grad) {
  const int64_t n = plan.n, ld = plan.ld, d = plan.n_dropped();
  std::fill(grad, grad + plan.n_wires * ld, T(0));
  const T scale_ts = weight_ts * scale, scale_st = weight_st * scale;
  for (int64_t rank = first_rank; rank < n; ++rank) {
    const T* s_row = ys + (d + rank) * ld;
    const T* t_row = yt + (d + rank) * ld;
    T* g_row = grad + (d + rank) * ld;
    if (weight_st == T(0)) {
#pragma omp simd
      for (int64_t e = 0; e < n; ++e) {
        const T qs = s_row[e];
        const bool passes = qs >= epsilon;
        g_row[e] = passes ? -scale_ts * t_row[e] / (passes ? qs : T(1)) : T(0);
      }
      continue;
    }
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) {
      const T qs = s_row[e], qt = t_row[e];
      const bool passes = qs >= epsilon;
      const T ratio = qt / (passes ? qs : T(1));
      const T log_t = log_of(qt < epsilon ? epsilon : qt);
      g_row[e] = -(passes ? scale_ts * ratio : T(0)) - scale_st * log_t;
    }
  }
}

}  // namespace

// Fused student sort + teacher sort + CE: per-row loss (rows,) without materialising either
// permutation; backward recomputes both rows.
torch::Tensor sort_ce_forward(torch::Tensor x_student, torch::Tensor x_teacher,
                              torch::Tensor layer_offsets, torch::Tensor comparators,
                              torch::Tensor fixed, torch::Tensor tape_offsets, int64_t n_wires,
                              int64_t relaxation, double steepness_student,
                              double steepness_teacher, double art_lambda, int64_t first_rank,
                              double weight_ts, double weight_st, double epsilon) {
  const int64_t n = x_student.size(1), rows = x_student.size(0);
  check_rows(x_student, n, "x_student");
  check_rows(x_teacher, n, "x_teacher");
  TORCH_CHECK(x_teacher.size(0) == rows && x_teacher.scalar_type() == x_student.scalar_type(),
              "x_teacher must match x_student");
  const Plan plan = make_plan(layer_offsets, comparators, fixed, tape_offsets, n, n_wires);
  auto loss = torch::empty({rows}, x_student.options());
  AT_DISPATCH_FLOATING_TYPES(x_student.scalar_type(), "neco_sort_ce_forward", [&] {
    const auto student = make_relax(relaxation, steepness_student, art_lambda);
    const auto teacher = make_relax(relaxation, steepness_teacher, art_lambda);
    const scalar_t* xs = x_student.data_ptr<scalar_t>();
    const scalar_t* xt = x_teacher.data_ptr<scalar_t>();
    scalar_t* out = loss.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
      FlushDenormals flush;
      Scratch<scalar_t> s(plan, false, true);
      for (int64_t r = begin; r < end; ++r) {
        run_row(plan, teacher, xt + r * n, s.values.data(), s.y_teacher.data(), false, &s);
        run_row(plan, student, xs + r * n, s.values.data(), s.y.data(), false, &s);
        out[r] = cross_entropy_row(plan, s.y.data(), s.y_teacher.data(), first_rank,
                                   scalar_t(weight_ts), scalar_t(weight_st), scalar_t(epsilon));
      }
    });
  });
  return loss;
}

torch::Tensor sort_ce_backward(torch::Tensor x_student, torch::Tensor x_teacher,
                               torch::Tensor grad_loss, torch::Tensor layer_offsets,
                               torch::Tensor comparators, torch::Tensor fixed,
                               torch::Tensor tape_offsets, int64_t n_wires, int64_t relaxation,
                               double steepness_student, double steepness_teacher,
                               double art_lambda, int64_t first_rank, double weight_ts,
                               double weight_st, double epsilon) {
  const int64_t n = x_student.size(1), rows = x_student.size(0);
  check_rows(x_student, n, "x_student");
  check_rows(x_teacher, n, "x_teacher");
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == rows && grad_loss.is_contiguous(),
              "grad_loss must be (rows,)");
  const Plan plan = make_plan(layer_offsets, comparators, fixed, tape_offsets, n, n_wires);
  auto grad_x = torch::empty_like(x_student);
  AT_DISPATCH_FLOATING_TYPES(x_student.scalar_type(), "neco_sort_ce_backward", [&] {
    const auto student = make_relax(relaxation, steepness_student, art_lambda);
    const auto teacher = make_relax(relaxation, steepness_teacher, art_lambda);
    const scalar_t* xs = x_student.data_ptr<scalar_t>();
    const scalar_t* xt = x_teacher.data_ptr<scalar_t>();
    const scalar_t* gl = grad_loss.data_ptr<scalar_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
      FlushDenormals flush;
      Scratch<scalar_t> s(plan, true, true);
      for (int64_t r = begin; r < end; ++r) {
        run_row(plan, teacher, xt + r * n, s.values.data(), s.y_teacher.data(), false, &s);
        run_row(plan, student, xs + r * n, s.values.data(), s.y.data(), true, &s);
        cross_entropy_grad_row(plan, s.y.data(), s.y_teacher.data(), first_rank,
                               scalar_t(weight_ts), scalar_t(weight_st), scalar_t(epsilon),
                               gl[r] / scalar_t(n), s.grad_y.data());
        backward_row(plan, student, static_cast<const scalar_t*>(nullptr), true, &s,
                     gx + r * n);
      }
    });
  });
  return grad_x;
}

// How this module was built (setup.py defines these): neco_loss.sorting.kernels.cpp reports them and
// refuses a build whose source or torch differs from the installed ones.
#ifndef NECO_BUILD_FLAGS
#define NECO_BUILD_FLAGS "unknown"
#endif
#ifndef NECO_TORCH_VERSION
#define NECO_TORCH_VERSION "unknown"
#endif
#ifndef NECO_SOURCE_SHA256
#define NECO_SOURCE_SHA256 "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("BUILD_FLAGS") = NECO_BUILD_FLAGS;
  m.attr("TORCH_VERSION") = NECO_TORCH_VERSION;
  m.attr("SOURCE_SHA256") = NECO_SOURCE_SHA256;
  m.def("sort_forward", &sort_forward, "soft sorting network, forward (CPU)");
  m.def("sort_backward", &sort_backward, "soft sorting network, backward (CPU)");
  m.def("sort_ce_forward", &sort_ce_forward, "fused student/teacher sort + CE, forward (CPU)");
  m.def("sort_ce_backward", &sort_ce_backward, "fused student/teacher sort + CE, backward (CPU)");
}
