// Fused tempered cross-entropy on the CPU (SPEC §1, §1b), forward and backward in one sweep.
//
// Per non-ignored row i (notation of notes/CE_GRADIENTS.md): c = softcap(z), u = c / τ,
// lse = log Σ exp(u), E = Σ p u, S = Σ w u, B = (1−ε) w_y + (ε/V) W̄,
// C = B lse − (1−ε) w_y u_y − (ε/V) S. The row loss is C + λ lse² (plain) or
// τ C + τ (ρ − log V) B + λ lse² (DRO).
//
// Pass 1 streams the row once in blocks of kBlock columns: u of a block is formed in a per-thread
// row scratch, the running max m, s = Σ exp(u − m) and b = Σ exp(u − m)(u − m) are updated online
// (E = m + b / s), and exp(u − m_block) is kept in the scratch with the block's reference max.
// Pass 2 (only when the gradient is wanted) writes ∂R/∂z = (P p − Q w − T 1[k=y]) · chain with
// p = scratch · exp(m_block − lse): no second exp / tanh per element. The gradient may be written
// into the logits buffer itself (the row is fully read by pass 1 before pass 2 writes it).
//
// Ops (namespace tempnet_cpp, CPU):
//   ce_forward(logits, target, tau, class_weight?, row_scale?, grad?, rho?, ignore_index, softcap?,
//              label_smoothing, z_loss) -> (rows, lse, dtau)
//       logits (N, V) float64/32, bfloat16, float16 with unit column stride; target (N,) int64;
//       tau (N,) in the accumulation dtype (any stride, 0 for a scalar); class_weight (V,) and
//       row_scale (N,) in the accumulation dtype. grad, when given, is an (N, V) tensor of the
//       logits' dtype with unit column stride (it may be `logits` itself) that receives
//       row_scale_i · ∂R_i/∂z_i. rows, lse and dtau = ∂R_i/∂τ_i (unscaled) are (N,) in the
//       accumulation dtype; all three are 0 at ignored rows, whose gradient row is zeroed.
//   scale_rows_(grad, scale) -> ()      grad[i, :] *= scale[i], in place.
//   softcap_tanh(x) -> tanh(x)          the softcap's tanh, float32 / float64 (for its accuracy test).
//   linear_ce(hidden, weight, bias?, target, tau, class_weight?, row_scale?, grad_mask, chunk_rows,
//             rho?, ignore_index, softcap?, label_smoothing, z_loss)
//       -> (rows, lse, dtau, grad_hidden, grad_weight, grad_bias)
//       Rows are processed chunk_rows at a time: chunk logits = hidden_c @ weight.T + bias in one
//       reusable (chunk_rows, V) buffer, ce on it with the gradient written in place, then
//       grad_hidden_c = dz @ weight, grad_weight += dz.T @ hidden_c, grad_bias += Σ_rows dz.
//       Half-precision inputs are computed in float32 (weight converted once). Gradients not
//       selected by grad_mask come back as empty tensors.

#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using tempnet::acc_type;

// Columns per block: 1024 float32 (4 KiB) stay in L1 between the sub-passes of a block.
constexpr int64_t kBlock = 1024;

// The hyper-parameters of SPEC §1b, in the accumulation type.
template <typename acc_t>
struct Options {
  bool dro;
  acc_t shift;  // ρ − log V
  bool softcap;
  acc_t cap;
  acc_t inv_cap;
  acc_t eps;    // label smoothing ε
  acc_t eps_v;  // ε / V
  acc_t z_loss;
  int64_t ignore_index;
  const acc_t* weight;  // (V,) or nullptr
  acc_t weight_total;   // W̄ = Σ w (V without weights)
};

template <typename scalar_t>
struct Problem {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* logits;
  int64_t logit_stride;
  const int64_t* target;
  int64_t target_stride;
  const acc_t* tau;
  int64_t tau_stride;
  const acc_t* row_scale;  // nullptr: 1
  int64_t scale_stride;
  scalar_t* grad;  // nullptr: no gradient
  int64_t grad_stride;
  acc_t* rows;
  acc_t* lse;
  acc_t* dtau;
  int64_t n_rows;
  int64_t vocab;
};

// Per-thread buffers, allocated once per parallel chunk of rows.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> e;      // (V,) u of the row, then exp(u − m_block)
  std::vector<acc_t> chain;  // (V,) 1 − tanh²(z / cap), softcap with gradient only
  std::vector<acc_t> ref;    // (blocks,) reference max m_block of each block
  std::vector<acc_t> out;    // (kBlock,) gradient of a block before conversion to the storage type
};

// exp of a vector: float32 uses ATen's exp_u20 (polynomial, ≤ 20 ulp, about twice as fast as SLEEF's
// 1-ulp exp; NaN rows still propagate through the running max), float64 SLEEF's 1-ulp exp.
template <typename acc_t>
at::vec::Vectorized<acc_t> fast_exp(const at::vec::Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return x.exp();
  } else {
    return x.exp_u20();
  }
}

// tanh for the softcap: float32 the rational approximation of common.h (≤ 6 ulp), float64 (the accuracy
// reference) SLEEF's 1-ulp tanh.
template <typename acc_t>
at::vec::Vectorized<acc_t> softcap_tanh(const at::vec::Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return x.tanh();
  } else {
    return tempnet::tanh_rational(x);
  }
}

// u[0:n] = c(z) / τ of one block, with its maximum (NaN-propagating) in max_out and, when kSmooth, Σ w u in sum_out
// (w = 1 without weights), all in one sweep; with kSoftcap and `chain` also chain[0:n] = 1 − tanh²(z / cap) = ∂c/∂z.
// Float32 logits are read in place, other storage types are first converted into u. The tail goes through the same
// vector code (partial load / store), so a column's value does not depend on its position in the row.
template <bool kSoftcap, bool kSmooth, typename scalar_t, typename acc_t>
void tempered_block(const scalar_t* z, acc_t* u, acc_t* chain, const acc_t* w, int64_t n, acc_t inv_tau,
                    const Options<acc_t>& o, acc_t& max_out, acc_t& sum_out) {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t* src;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    src = z;
  } else {
    tempnet::load_as(z, u, n);
    src = u;
  }
  const Vec scale(kSoftcap ? o.cap * inv_tau : inv_tau), inv_cap(o.inv_cap), one(acc_t(1));
  auto tempered = [&](int64_t j, int64_t count) {
    const Vec x = Vec::loadu(src + j, count);
    if constexpr (!kSoftcap) {
      return x * scale;
    } else {
      const Vec t = softcap_tanh(x * inv_cap);
      if (chain != nullptr) at::vec::fnmadd(t, t, one).store(chain + j, count);
      return t * scale;
    }
  };
  const int64_t nv = n - n % Vec::size();
  Vec vmax(-std::numeric_limits<acc_t>::infinity()), vsum(acc_t(0));
  int64_t k = 0;
  for (; k < nv; k += Vec::size()) {
    const Vec v = tempered(k, Vec::size());
    v.store(u + k);
    vmax = at::vec::maximum(vmax, v);
    if constexpr (kSmooth) vsum = w != nullptr ? at::vec::fmadd(v, Vec::loadu(w + k), vsum) : vsum + v;
  }
  acc_t mx = tempnet::horizontal_max(vmax), sm = tempnet::horizontal_sum(vsum);
  if (k < n) tempered(k, n - k).store(u + k, n - k);
  for (; k < n; ++k) {
    mx = (u[k] > mx || std::isnan(u[k])) ? u[k] : mx;
    if constexpr (kSmooth) sm += (w != nullptr ? w[k] : acc_t(1)) * u[k];
  }
  max_out = mx;
  sum_out = sm;
}

// u[k] ← exp(u[k] − m); adds Σ exp(u − m) to s and Σ exp(u − m)(u − m) to b. A masked logit (u = −inf)
// adds its limit 0 to b: its (u − m) factor is zeroed where exp(u − m) = 0, so 0·(−inf) never makes NaN.
// With m = −inf (every u so far −inf) nothing is added and the exps are 0.
template <typename acc_t>
void exp_block(acc_t* u, int64_t n, acc_t m, acc_t& s, acc_t& b) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (m == -std::numeric_limits<acc_t>::infinity()) {
    std::fill(u, u + n, acc_t(0));
    return;
  }
  const int64_t nv = n - n % Vec::size();
  const Vec vm(m), zero(acc_t(0));
  Vec vs(zero), vb(zero);
  int64_t k = 0;
  for (; k < nv; k += Vec::size()) {
    const Vec x = Vec::loadu(u + k) - vm;
    const Vec e = fast_exp(x);
    e.store(u + k);
    vs = vs + e;
    vb = at::vec::fmadd(e, Vec::blendv(x, zero, e == zero), vb);
  }
  acc_t ss = tempnet::horizontal_sum(vs), bb = tempnet::horizontal_sum(vb);
  for (; k < n; ++k) {
    const acc_t x = u[k] - m;
    const acc_t e = std::exp(x);
    u[k] = e;
    ss += e;
    bb += e == acc_t(0) ? acc_t(0) : e * x;
  }
  s += ss;
  b += bb;
}

// out[0:n] = (alpha e − q w) · chain, with w = 1 without weights and chain = 1 without softcap; one loop per
// combination of the options (kSmooth: q ≠ 0), so none of them is tested per element.
template <bool kSmooth, bool kWeight, bool kChain, typename acc_t>
void grad_block_for(const acc_t* e, const acc_t* w, const acc_t* chain, acc_t* out, int64_t n, acc_t alpha, acc_t q) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t nv = n - n % Vec::size();
  const Vec va(alpha), vq(q);
  int64_t k = 0;
  for (; k < nv; k += Vec::size()) {
    Vec g = Vec::loadu(e + k) * va;
    if constexpr (kSmooth) g = kWeight ? at::vec::fnmadd(vq, Vec::loadu(w + k), g) : g - vq;
    if constexpr (kChain) g = g * Vec::loadu(chain + k);
    g.store(out + k);
  }
  for (; k < n; ++k) {  // the same roundings as a vector lane
    acc_t g = alpha * e[k];
    if constexpr (kSmooth) g = kWeight ? std::fma(-q, w[k], g) : g - q;
    out[k] = kChain ? g * chain[k] : g;
  }
}

template <typename acc_t>
void grad_block(const acc_t* e, const acc_t* w, const acc_t* chain, acc_t* out, int64_t n, acc_t alpha, acc_t q) {
  using Fn = void (*)(const acc_t*, const acc_t*, const acc_t*, acc_t*, int64_t, acc_t, acc_t);
  static constexpr Fn kVariants[8] = {
      grad_block_for<false, false, false, acc_t>, grad_block_for<false, false, true, acc_t>,
      grad_block_for<false, true, false, acc_t>,  grad_block_for<false, true, true, acc_t>,
      grad_block_for<true, false, false, acc_t>,  grad_block_for<true, false, true, acc_t>,
      grad_block_for<true, true, false, acc_t>,   grad_block_for<true, true, true, acc_t>};
  const int variant = (q != acc_t(0)) * 4 + (w != nullptr) * 2 + (chain != nullptr);
  kVariants[variant](e, w, chain, out, n, alpha, q);
}

// row[0:n] *= g (the per-row incoming gradient).
template <typename scalar_t>
void scale_row(scalar_t* row, int64_t n, acc_type<scalar_t> g) {
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const int64_t nv = n - n % Vec::size();
    const Vec vg(g);
    int64_t k = 0;
    for (; k < nv; k += Vec::size()) (Vec::loadu(row + k) * vg).store(row + k);
    for (; k < n; ++k) row[k] *= g;
  } else {
    for (int64_t k = 0; k < n; ++k) row[k] = static_cast<scalar_t>(static_cast<acc_t>(row[k]) * g);
  }
}

template <typename scalar_t>
void ce_row(const Problem<scalar_t>& p, const Options<acc_type<scalar_t>>& o, int64_t i,
            Scratch<acc_type<scalar_t>>& scratch) {
  using acc_t = acc_type<scalar_t>;
  const int64_t V = p.vocab;
  const int64_t y = p.target[i * p.target_stride];
  scalar_t* grad_row = p.grad != nullptr ? p.grad + i * p.grad_stride : nullptr;
  if (y == o.ignore_index) {
    p.rows[i] = p.lse[i] = p.dtau[i] = acc_t(0);
    if (grad_row != nullptr) std::fill(grad_row, grad_row + V, scalar_t(0));
    return;
  }
  const acc_t tau = p.tau[i * p.tau_stride];
  const acc_t inv_tau = acc_t(1) / tau;
  const scalar_t* z = p.logits + i * p.logit_stride;
  const bool smooth = o.eps > acc_t(0);
  acc_t* chain_row = (o.softcap && grad_row != nullptr) ? scratch.chain.data() : nullptr;

  // Pass 1: online max / sum-exp / entropy statistics (CE_GRADIENTS.md, "Streaming").
  acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0, b = 0, S = 0, u_y = 0;
  for (int64_t j0 = 0, blk = 0; j0 < V; j0 += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, V - j0);
    acc_t* u = scratch.e.data() + j0;
    acc_t* chain = chain_row != nullptr ? chain_row + j0 : nullptr;
    const acc_t* w = o.weight != nullptr ? o.weight + j0 : nullptr;
    acc_t block_max, block_sum;
    if (o.softcap) {
      smooth ? tempered_block<true, true>(z + j0, u, chain, w, n, inv_tau, o, block_max, block_sum)
             : tempered_block<true, false>(z + j0, u, chain, w, n, inv_tau, o, block_max, block_sum);
    } else {
      smooth ? tempered_block<false, true>(z + j0, u, chain, w, n, inv_tau, o, block_max, block_sum)
             : tempered_block<false, false>(z + j0, u, chain, w, n, inv_tau, o, block_max, block_sum);
    }
    if (y >= j0 && y < j0 + n) u_y = u[y - j0];
    S += block_sum;
    const acc_t m_new = (block_max > m || std::isnan(block_max)) ? block_max : m;
    if (s > acc_t(0)) {  // rescale s and b from the old max m to m_new
      const acc_t a = std::exp(m - m_new);
      b = a * (b + (m - m_new) * s);
      s *= a;
    }
    m = m_new;
    exp_block(u, n, m, s, b);
    scratch.ref[blk] = m;
  }
  const acc_t lse = m + std::log(s);
  const acc_t E = m + b / s;
  const acc_t w_y = o.weight != nullptr ? o.weight[y] : acc_t(1);
  const acc_t target_weight = (acc_t(1) - o.eps) * w_y;
  const acc_t B = target_weight + o.eps_v * o.weight_total;
  const acc_t C = B * lse - target_weight * u_y - o.eps_v * S;
  const acc_t z_term = o.z_loss * lse * lse;
  if (o.dro) {
    p.rows[i] = tau * C + tau * o.shift * B + z_term;
    p.dtau[i] = B * (lse - E + o.shift) - acc_t(2) * o.z_loss * lse * E * inv_tau;
  } else {
    p.rows[i] = C + z_term;
    p.dtau[i] = -inv_tau * ((B + acc_t(2) * o.z_loss * lse) * E - target_weight * u_y - o.eps_v * S);
  }
  p.lse[i] = lse;
  if (grad_row == nullptr) return;

  // Pass 2: ∂R/∂c_k = P p_k − Q w_k − T 1[k=y], then the softcap chain rule, then the row scale g.
  const acc_t g = p.row_scale != nullptr ? p.row_scale[i * p.scale_stride] : acc_t(1);
  acc_t P, Q, T;
  if (o.dro) {
    P = B + acc_t(2) * o.z_loss * lse * inv_tau;
    Q = o.eps_v;
    T = target_weight;
  } else {
    P = (B + acc_t(2) * o.z_loss * lse) * inv_tau;
    Q = o.eps_v * inv_tau;
    T = target_weight * inv_tau;
  }
  for (int64_t j0 = 0, blk = 0; j0 < V; j0 += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, V - j0);
    acc_t* out;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      out = grad_row + j0;
    } else {
      out = scratch.out.data();
    }
    const acc_t* chain = chain_row != nullptr ? chain_row + j0 : nullptr;
    grad_block(scratch.e.data() + j0, o.weight != nullptr ? o.weight + j0 : nullptr, chain, out, n,
               P * std::exp(scratch.ref[blk] - lse), Q);
    if (y >= j0 && y < j0 + n) out[y - j0] -= T * (chain != nullptr ? chain[y - j0] : acc_t(1));
    if (p.row_scale != nullptr) scale_row(out, n, g);  // the same rounding as scale_rows_ after the fact
    if constexpr (!std::is_same_v<scalar_t, acc_t>) tempnet::store_as(out, grad_row + j0, n);
  }
}

template <typename scalar_t>
void ce_rows(const Problem<scalar_t>& p, const Options<acc_type<scalar_t>>& o) {
  using acc_t = acc_type<scalar_t>;
  const int64_t blocks = (p.vocab + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  at::parallel_for(0, p.n_rows, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch;
    scratch.e.resize(p.vocab);
    if (o.softcap && p.grad != nullptr) scratch.chain.resize(p.vocab);
    scratch.ref.resize(blocks);
    scratch.out.resize(kBlock);
    for (int64_t i = begin; i < end; ++i) ce_row(p, o, i, scratch);
  });
}

template <typename acc_t>
Options<acc_t> make_options(int64_t vocab, std::optional<double> rho, int64_t ignore_index,
                            std::optional<double> softcap, double label_smoothing, double z_loss,
                            const at::Tensor& weight) {
  Options<acc_t> o{};
  o.dro = rho.has_value();
  o.shift = o.dro ? static_cast<acc_t>(*rho - std::log(static_cast<double>(vocab))) : acc_t(0);
  o.softcap = softcap.has_value();
  o.cap = o.softcap ? static_cast<acc_t>(*softcap) : acc_t(1);
  o.inv_cap = acc_t(1) / o.cap;
  o.eps = static_cast<acc_t>(label_smoothing);
  o.eps_v = static_cast<acc_t>(label_smoothing / static_cast<double>(vocab));
  o.z_loss = static_cast<acc_t>(z_loss);
  o.ignore_index = ignore_index;
  o.weight = weight.defined() ? weight.data_ptr<acc_t>() : nullptr;
  o.weight_total = weight.defined() ? weight.sum().item<acc_t>() : static_cast<acc_t>(vocab);
  return o;
}

void check_row_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// Runs the fused kernel of the file header on (N, V) logits, writing rows / lse / dtau into the
// given (N,) tensors (contiguous, accumulation dtype) and the gradient into `grad` if defined.
void ce_into(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tau, const at::Tensor& weight,
             const at::Tensor& row_scale, const at::Tensor& grad, std::optional<double> rho, int64_t ignore_index,
             std::optional<double> softcap, double label_smoothing, double z_loss, at::Tensor& rows,
             at::Tensor& lse, at::Tensor& dtau) {
  TORCH_CHECK(logits.dim() == 2, "logits must be (N, V), got ", logits.sizes());
  const int64_t n_rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab == 1 || logits.stride(1) == 1, "logits must have unit column stride");
  const at::ScalarType acc = tempnet::acc_scalar_type(logits.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n_rows && target.scalar_type() == at::kLong,
              "target must be (N,) int64");
  check_row_vector(tau, "tau", n_rows, acc);
  if (weight.defined()) {
    check_row_vector(weight, "class_weight", vocab, acc);
    TORCH_CHECK(weight.is_contiguous(), "class_weight must be contiguous");
  }
  if (row_scale.defined()) check_row_vector(row_scale, "row_scale", n_rows, acc);
  if (grad.defined()) {
    TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type(),
                "grad must match the logits' shape and dtype");
    TORCH_CHECK(vocab == 1 || grad.stride(1) == 1, "grad must have unit column stride");
  }
  if (n_rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "tempnet_cross_entropy", [&] {
    using acc_t = acc_type<scalar_t>;
    Problem<scalar_t> p{};
    p.logits = logits.const_data_ptr<scalar_t>();
    p.logit_stride = logits.stride(0);
    p.target = target.const_data_ptr<int64_t>();
    p.target_stride = target.stride(0);
    p.tau = tau.const_data_ptr<acc_t>();
    p.tau_stride = tau.stride(0);
    p.row_scale = row_scale.defined() ? row_scale.const_data_ptr<acc_t>() : nullptr;
    p.scale_stride = row_scale.defined() ? row_scale.stride(0) : 0;
    p.grad = grad.defined() ? grad.data_ptr<scalar_t>() : nullptr;
    p.grad_stride = grad.defined() ? grad.stride(0) : 0;
    p.rows = rows.data_ptr<acc_t>();
    p.lse = lse.data_ptr<acc_t>();
    p.dtau = dtau.data_ptr<acc_t>();
    p.n_rows = n_rows;
    p.vocab = vocab;
    ce_rows(p, make_options<acc_t>(vocab, rho, ignore_index, softcap, label_smoothing, z_loss, weight));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_forward(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tau,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& grad, std::optional<double> rho, int64_t ignore_index,
    std::optional<double> softcap, double label_smoothing, double z_loss) {
  const auto options = logits.options().dtype(tempnet::acc_scalar_type(logits.scalar_type()));
  at::Tensor rows = at::empty({logits.size(0)}, options);
  at::Tensor lse = at::empty_like(rows);
  at::Tensor dtau = at::empty_like(rows);
  ce_into(logits, target, tau, class_weight.value_or(at::Tensor()), row_scale.value_or(at::Tensor()),
          grad.value_or(at::Tensor()), rho, ignore_index, softcap, label_smoothing, z_loss, rows, lse, dtau);
  return {rows, lse, dtau};
}

// tanh(x) elementwise as the softcap computes it (float32 / float64), exposed for its accuracy test.
at::Tensor softcap_tanh_op(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64");
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "tempnet_softcap_tanh", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t n = in.numel();
    for (int64_t k = 0; k < n; k += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), n - k);
      softcap_tanh(Vec::loadu(src + k, count)).store(dst + k, count);
    }
  });
  return out;
}

void scale_rows_(at::Tensor grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.dim() == 2 && (grad.size(1) == 1 || grad.stride(1) == 1), "grad must be (N, V), unit column stride");
  const int64_t n_rows = grad.size(0), vocab = grad.size(1);
  check_row_vector(scale, "scale", n_rows, tempnet::acc_scalar_type(grad.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "tempnet_scale_rows", [&] {
    using acc_t = acc_type<scalar_t>;
    scalar_t* data = grad.data_ptr<scalar_t>();
    const acc_t* g = scale.const_data_ptr<acc_t>();
    const int64_t row_stride = grad.stride(0), scale_stride = scale.stride(0);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1));
    at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) scale_row(data + i * row_stride, vocab, g[i * scale_stride]);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& tau, const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& row_scale, std::array<bool, 3> grad_mask, int64_t chunk_rows,
    std::optional<double> rho, int64_t ignore_index, std::optional<double> softcap, double label_smoothing,
    double z_loss) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden must be (N, D) and weight (V, D)");
  TORCH_CHECK(chunk_rows >= 1, "chunk_rows must be >= 1");
  const int64_t n_rows = hidden.size(0), vocab = weight.size(0);
  const at::ScalarType acc = tempnet::acc_scalar_type(hidden.scalar_type());
  const auto acc_options = hidden.options().dtype(acc);
  const at::Tensor w = weight.to(acc);
  const at::Tensor b = bias.has_value() ? bias->to(acc) : at::Tensor();
  const at::Tensor cw = class_weight.value_or(at::Tensor());
  const at::Tensor scale = row_scale.value_or(at::Tensor());
  const bool need_dz = grad_mask[0] || grad_mask[1] || grad_mask[2];

  at::Tensor rows = at::empty({n_rows}, acc_options);
  at::Tensor lse = at::empty_like(rows);
  at::Tensor dtau = at::empty_like(rows);
  at::Tensor grad_hidden = grad_mask[0] ? at::empty({n_rows, hidden.size(1)}, acc_options) : at::Tensor();
  at::Tensor grad_weight = grad_mask[1] ? at::zeros({vocab, weight.size(1)}, acc_options) : at::Tensor();
  at::Tensor grad_bias = grad_mask[2] && bias.has_value() ? at::zeros({vocab}, acc_options) : at::Tensor();
  const int64_t chunk = std::min(chunk_rows, std::max<int64_t>(n_rows, 1));
  at::Tensor buffer = at::empty({chunk, vocab}, acc_options);

  for (int64_t c0 = 0; c0 < n_rows; c0 += chunk) {
    const int64_t n = std::min(chunk, n_rows - c0);
    const at::Tensor h = hidden.narrow(0, c0, n).to(acc);
    at::Tensor z = buffer.narrow(0, 0, n);
    if (b.defined()) {
      at::addmm_out(z, b, h, w.t());
    } else {
      at::mm_out(z, h, w.t());
    }
    at::Tensor rows_c = rows.narrow(0, c0, n), lse_c = lse.narrow(0, c0, n), dtau_c = dtau.narrow(0, c0, n);
    ce_into(z, target.narrow(0, c0, n), tau.narrow(0, c0, n), cw, scale.defined() ? scale.narrow(0, c0, n) : scale,
            need_dz ? z : at::Tensor(), rho, ignore_index, softcap, label_smoothing, z_loss, rows_c, lse_c, dtau_c);
    if (grad_hidden.defined()) {
      at::Tensor out = grad_hidden.narrow(0, c0, n);
      at::mm_out(out, z, w);
    }
    if (grad_weight.defined()) grad_weight.addmm_(z.t(), h);
    if (grad_bias.defined()) grad_bias.add_(z.sum(0));
  }
  auto to_input = [](const at::Tensor& g, const at::Tensor& like) { return g.defined() ? g.to(like.scalar_type()) : g; };
  return {rows, lse, dtau, to_input(grad_hidden, hidden), to_input(grad_weight, weight),
          bias.has_value() ? to_input(grad_bias, *bias) : at::Tensor()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tempnet_cpp, m) {
  m.def("ce_forward(Tensor logits, Tensor target, Tensor tau, Tensor? class_weight, Tensor? row_scale, "
        "Tensor(a!)? grad, float? rho, int ignore_index, float? softcap, float label_smoothing, float z_loss) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("scale_rows_(Tensor(a!) grad, Tensor scale) -> ()");
  m.def("softcap_tanh(Tensor x) -> Tensor");
  m.def("linear_ce(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor tau, Tensor? class_weight, "
        "Tensor? row_scale, bool[3] grad_mask, int chunk_rows, float? rho, int ignore_index, float? softcap, "
        "float label_smoothing, float z_loss) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tempnet_cpp, CPU, m) {
  m.impl("ce_forward", &ce_forward);
  m.impl("scale_rows_", &scale_rows_);
  m.impl("softcap_tanh", &softcap_tanh_op);
  m.impl("linear_ce", &linear_ce);
}
