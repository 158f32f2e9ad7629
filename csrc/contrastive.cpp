// One side of the contrastive loss with per-anchor temperatures (SPEC §2), fused on the CPU.
//
// Anchor i (row of anchors, (b, D)) is scored against every candidate j (row of candidates,
// (B, D)): s_ij = <a_i, c_j>, u_ij = s_ij / tau_i; its positive is candidate pos_i = offset + i.
//   plain (rho = None): L_i = lse_j(u_ij) - u_i,pos                      (positive in the sum)
//   DRO   (rho = ρ)   : L_i = tau_i (lse_{j≠pos}(u_ij) - u_i,pos - log(B-1)) + ρ tau_i
// The similarities are produced tile by tile (at::mm of an anchor block against a candidate
// block) and reduced by an online log-sum-exp, so memory is O((b + B) D + tile), never O(b B).
//
// Precision: the forward sweep keeps, per anchor, the running max m of u over the negatives (j ≠ pos),
// n = Σ exp(u - m) and a = Σ exp(u - m)(u - m), and u_pos apart. Everything is then formed from
// shifted values, never as a difference of two O(|u|) or O(log B) quantities:
//   plain: with M = max(m, u_pos), x = u_pos - M ≤ 0 and n, a rescaled to M,
//          L = log1p(n + expm1(x)) - x,  1 - p_pos = n / (n + e^x),
//          ∂L/∂tau = -(Σ_j p_j (u_j - u_pos)) / tau = -((a + x e^x) / (n + e^x) - x) / tau;
//   DRO:   L = tau (m - u_pos + log n - log(B-1) + ρ),  ∂L/∂tau = H(w) - log(B-1) + ρ = log n - a/n - log(B-1) + ρ.
// The backward sweep recomputes p_j = exp((u_j - shift) - log_sum) with the forward's shift and log_sum,
// and writes the positive's entry from the stored p_pos - 1 (accurate even when p_pos ≈ 1).
//
// Ops (namespace tempnet_cpp, CPU):
//   contrastive_forward(anchors, candidates, tau, offset, rho, block_anchors, block_candidates)
//     -> (loss (b,), stats (4, b))   stats rows: shift, log_sum, pos_grad (p_pos - 1 plain, -1 DRO),
//                                    dtau = ∂L_i/∂tau_i.
//   contrastive_backward(grad_loss, anchors, candidates, tau, stats, offset, rho, block_anchors,
//                        block_candidates, output_mask) -> (grad_anchors, grad_candidates, grad_tau)
// Features may be float64 / float32 / bfloat16 / float16; they are accumulated in float64 for
// float64 inputs and float32 otherwise. loss and stats are in the accumulation dtype; each gradient
// has its input's dtype (an empty tensor where output_mask is false).

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

// Everything the sweeps share: the features and per-anchor values in the accumulation dtype.
template <typename acc_t>
struct Side {
  at::Tensor anchors;     // (b, D) contiguous
  at::Tensor candidates;  // (B, D) contiguous
  const acc_t* tau;       // (b,)
  int64_t offset;
  bool dro;
  int64_t n_anchor;
  int64_t n_cand;
  int64_t block_anchors;
  int64_t block_candidates;
};

// Per-anchor results of the forward sweep that the backward needs: rows of the (4, b) stats tensor.
template <typename acc_t>
struct Stats {
  acc_t* shift;     // max of u over the summed candidates
  acc_t* log_sum;   // log Σ exp(u - shift) over the summed candidates
  acc_t* pos_grad;  // p_pos - 1 (plain) or -1 (DRO): the positive's ∂L/∂s divided by the row's coefficient
  acc_t* dtau;      // ∂L/∂tau

  static Stats of(at::Tensor& stats) {
    acc_t* data = stats.data_ptr<acc_t>();
    const int64_t n = stats.size(1);
    return {data, data + n, data + 2 * n, data + 3 * n};
  }
};

// Online statistics of one anchor over its negatives (notes/CE_GRADIENTS.md, "Streaming").
template <typename acc_t>
struct Running {
  acc_t m = -std::numeric_limits<acc_t>::infinity();  // running max of u
  acc_t n = 0;                                        // Σ exp(u - m)
  acc_t a = 0;                                        // Σ exp(u - m)(u - m)
};

// s = anchors[i0:i0+bi] @ candidates[j0:j0+bj].T written into the front of `buffer`.
at::Tensor similarity_tile(const at::Tensor& anchors, const at::Tensor& candidates, at::Tensor& buffer,
                           int64_t i0, int64_t bi, int64_t j0, int64_t bj) {
  at::Tensor tile = buffer.narrow(0, 0, bi * bj).view({bi, bj});
  at::mm_out(tile, anchors.narrow(0, i0, bi), candidates.narrow(0, j0, bj).t());
  return tile;
}

// Folds u[0:len] into `run`. NaN propagates through the max; a -inf entry adds exp(-inf) = 0 and
// its (u - m) factor is masked, so it never makes 0·(-inf) = NaN.
template <typename acc_t>
void accumulate(Running<acc_t>& run, const acc_t* u, int64_t len) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (len == 0) return;
  const int64_t nv = len - len % Vec::size();
  acc_t span_max = -std::numeric_limits<acc_t>::infinity();
  if (nv > 0) {
    Vec vmax = Vec::loadu(u);
    for (int64_t k = Vec::size(); k < nv; k += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(u + k));
    span_max = tempnet::horizontal_max(vmax);
  }
  for (int64_t k = nv; k < len; ++k) span_max = (u[k] > span_max || std::isnan(u[k])) ? u[k] : span_max;
  const acc_t m_new = (span_max > run.m || std::isnan(span_max)) ? span_max : run.m;
  if (m_new == -std::numeric_limits<acc_t>::infinity()) return;  // only -inf so far: nothing to add
  if (run.n != acc_t(0)) {  // rescale from m to m_new (NaN stays NaN)
    const acc_t step = run.m - m_new;
    const acc_t scale = std::exp(step);
    run.a = scale * (run.a + step * run.n);
    run.n *= scale;
  }
  run.m = m_new;
  const Vec vm(m_new), zero(acc_t(0));
  Vec vn(zero), va(zero);
  for (int64_t k = 0; k < nv; k += Vec::size()) {
    const Vec x = Vec::loadu(u + k) - vm;
    const Vec e = x.exp();
    vn = vn + e;
    va = at::vec::fmadd(e, Vec::blendv(x, zero, e == zero), va);
  }
  acc_t n = tempnet::horizontal_sum(vn), a = tempnet::horizontal_sum(va);
  for (int64_t k = nv; k < len; ++k) {
    const acc_t x = u[k] - m_new;
    const acc_t e = std::exp(x);
    n += e;
    a += e == acc_t(0) ? acc_t(0) : e * x;
  }
  run.n += n;
  run.a += a;
}

// Loss and stats of anchor i from its negatives' statistics and u_pos (formulas of the file header).
template <typename acc_t>
void finish_row(const Side<acc_t>& side, std::optional<double> rho, int64_t i, Running<acc_t> run, acc_t u_pos,
                acc_t* loss, const Stats<acc_t>& stats) {
  const acc_t tau = side.tau[i];
  if (side.dro) {
    const acc_t log_negatives = std::log(acc_t(side.n_cand - 1));
    const acc_t log_n = std::log(run.n);
    loss[i] = tau * ((run.m - u_pos) + log_n - log_negatives + acc_t(*rho));
    stats.shift[i] = run.m;
    stats.log_sum[i] = log_n;
    stats.pos_grad[i] = acc_t(-1);
    stats.dtau[i] = (log_n - run.a / run.n) - log_negatives + acc_t(*rho);
    return;
  }
  const acc_t shift = (u_pos > run.m || std::isnan(u_pos)) ? u_pos : run.m;
  if (run.n != acc_t(0)) {  // rescale the negatives from m to shift (none when B = 1)
    const acc_t step = run.m - shift;
    const acc_t scale = std::exp(step);
    run.a = scale * (run.a + step * run.n);
    run.n *= scale;
  }
  const acc_t x = u_pos - shift;
  const acc_t e = std::exp(x);
  const acc_t total = run.n + e;
  const acc_t log_sum = std::log1p(run.n + std::expm1(x));
  loss[i] = log_sum - x;
  stats.shift[i] = shift;
  stats.log_sum[i] = log_sum;
  stats.pos_grad[i] = -run.n / total;
  stats.dtau[i] = -((run.a + e * x) / total - x) / tau;
}

// Streams the tiles of one anchor block; fills loss and stats of anchors [i0, i0 + bi).
template <typename acc_t>
void forward_anchor_block(const Side<acc_t>& side, std::optional<double> rho, at::Tensor& buffer, int64_t i0,
                          int64_t bi, acc_t* loss, const Stats<acc_t>& stats) {
  using Vec = at::vec::Vectorized<acc_t>;
  std::vector<Running<acc_t>> running(bi);
  std::vector<acc_t> u_pos(bi, 0);
  for (int64_t j0 = 0; j0 < side.n_cand; j0 += side.block_candidates) {
    const int64_t bj = std::min(side.block_candidates, side.n_cand - j0);
    at::Tensor tile = similarity_tile(side.anchors, side.candidates, buffer, i0, bi, j0, bj);
    acc_t* data = tile.data_ptr<acc_t>();
    for (int64_t r = 0; r < bi; ++r) {
      const int64_t pos = side.offset + i0 + r - j0;  // the positive's column in this tile
      const acc_t inv_tau = acc_t(1) / side.tau[i0 + r];
      acc_t* row = data + r * bj;
      at::vec::map([inv_tau](Vec s) { return s * Vec(inv_tau); }, row, row, bj);
      if (pos >= 0 && pos < bj) {  // the positive is kept apart, the negatives on either side are summed
        u_pos[r] = row[pos];
        accumulate(running[r], row, pos);
        accumulate(running[r], row + pos + 1, bj - pos - 1);
      } else {
        accumulate(running[r], row, bj);
      }
    }
  }
  for (int64_t r = 0; r < bi; ++r) finish_row(side, rho, i0 + r, running[r], u_pos[r], loss, stats);
}

// Overwrites a similarity tile with g_i ∂L_i/∂s_ij = coef_i (p_ij - 1[j=pos]), coef_i = g_i / tau_i (plain)
// or g_i (DRO); p_ij = exp((u_ij - shift_i) - log_sum_i) off the positive, coef_i pos_grad_i at it.
template <typename acc_t>
void gradient_tile(const Side<acc_t>& side, at::Tensor& tile, int64_t i0, int64_t j0, const acc_t* grad,
                   const Stats<acc_t>& stats) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t bi = tile.size(0), bj = tile.size(1);
  acc_t* data = tile.data_ptr<acc_t>();
  for (int64_t r = 0; r < bi; ++r) {
    const int64_t i = i0 + r;
    const int64_t pos = side.offset + i - j0;
    const acc_t inv_tau = acc_t(1) / side.tau[i];
    const acc_t coef = side.dro ? grad[i] : grad[i] * inv_tau;
    const acc_t shift = stats.shift[i], log_sum = stats.log_sum[i];
    acc_t* row = data + r * bj;
    // u = s·(1/tau) is rounded first, as in the forward sweep.
    at::vec::map([=](Vec s) { return (((s * Vec(inv_tau)) - Vec(shift)) - Vec(log_sum)).exp() * Vec(coef); }, row,
                 row, bj);
    if (pos >= 0 && pos < bj) row[pos] = coef * stats.pos_grad[i];
  }
}

// Sweep over candidates for one anchor block: the block's rows of grad_anchors.
template <typename acc_t>
void backward_anchor_block(const Side<acc_t>& side, at::Tensor& buffer, int64_t i0, int64_t bi, const acc_t* grad,
                           const Stats<acc_t>& stats, at::Tensor& grad_anchors) {
  at::Tensor grad_block = grad_anchors.narrow(0, i0, bi);
  for (int64_t j0 = 0; j0 < side.n_cand; j0 += side.block_candidates) {
    const int64_t bj = std::min(side.block_candidates, side.n_cand - j0);
    at::Tensor tile = similarity_tile(side.anchors, side.candidates, buffer, i0, bi, j0, bj);
    gradient_tile(side, tile, i0, j0, grad, stats);
    grad_block.addmm_(tile, side.candidates.narrow(0, j0, bj));
  }
}

// Sweep over anchors for one candidate block: grad_candidates of the block (race-free: each
// thread owns whole candidate blocks).
template <typename acc_t>
void backward_candidate_block(const Side<acc_t>& side, at::Tensor& buffer, int64_t j0, int64_t bj,
                              const acc_t* grad, const Stats<acc_t>& stats, at::Tensor& grad_candidates) {
  at::Tensor grad_block = grad_candidates.narrow(0, j0, bj);
  for (int64_t i0 = 0; i0 < side.n_anchor; i0 += side.block_anchors) {
    const int64_t bi = std::min(side.block_anchors, side.n_anchor - i0);
    at::Tensor tile = similarity_tile(side.anchors, side.candidates, buffer, i0, bi, j0, bj);
    gradient_tile(side, tile, i0, j0, grad, stats);
    grad_block.addmm_(tile.t(), side.anchors.narrow(0, i0, bi));
  }
}

void check_inputs(const at::Tensor& anchors, const at::Tensor& candidates, const at::Tensor& tau, int64_t offset,
                  std::optional<double> rho, int64_t block_anchors, int64_t block_candidates) {
  TORCH_CHECK(anchors.dim() == 2 && candidates.dim() == 2 && anchors.size(1) == candidates.size(1),
              "contrastive: anchors (b, D) and candidates (B, D) must share D");
  TORCH_CHECK(tau.dim() == 1 && tau.size(0) == anchors.size(0), "contrastive: tau must have shape (b,)");
  TORCH_CHECK(anchors.scalar_type() == candidates.scalar_type(), "contrastive: anchors and candidates dtypes differ");
  TORCH_CHECK(offset >= 0 && offset + anchors.size(0) <= candidates.size(0),
              "contrastive: positives offset + [0, b) must lie in [0, B)");
  TORCH_CHECK(!rho.has_value() || candidates.size(0) >= 2, "contrastive: rho needs B >= 2 candidates");
  TORCH_CHECK(block_anchors > 0 && block_candidates > 0, "contrastive: block sizes must be positive");
}

template <typename acc_t>
Side<acc_t> make_side(const at::Tensor& anchors, const at::Tensor& candidates, const at::Tensor& tau_acc,
                      int64_t offset, std::optional<double> rho, int64_t block_anchors, int64_t block_candidates) {
  const auto acc = tau_acc.scalar_type();
  // Detached: the kernels call out= ATen ops, which refuse inputs that require grad.
  return Side<acc_t>{anchors.detach().to(acc).contiguous(), candidates.detach().to(acc).contiguous(),
                     tau_acc.data_ptr<acc_t>(), offset, rho.has_value(), anchors.size(0), candidates.size(0),
                     block_anchors, block_candidates};
}

std::tuple<at::Tensor, at::Tensor> contrastive_forward(const at::Tensor& anchors, const at::Tensor& candidates,
                                                       const at::Tensor& tau, int64_t offset, std::optional<double> rho,
                                                       int64_t block_anchors, int64_t block_candidates) {
  check_inputs(anchors, candidates, tau, offset, rho, block_anchors, block_candidates);
  const auto acc = tempnet::acc_scalar_type(anchors.scalar_type());
  const at::Tensor tau_acc = tau.to(acc).contiguous();
  at::Tensor loss = at::empty({anchors.size(0)}, anchors.options().dtype(acc));
  at::Tensor stats = at::empty({4, anchors.size(0)}, loss.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "contrastive_forward", [&] {
    const auto side = make_side<scalar_t>(anchors, candidates, tau_acc, offset, rho, block_anchors, block_candidates);
    const auto row_stats = Stats<scalar_t>::of(stats);
    const int64_t n_blocks = (side.n_anchor + block_anchors - 1) / block_anchors;
    scalar_t* loss_data = loss.data_ptr<scalar_t>();
    at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = at::empty({block_anchors * block_candidates}, loss.options());
      for (int64_t block = begin; block < end; ++block) {
        const int64_t i0 = block * block_anchors;
        forward_anchor_block(side, rho, buffer, i0, std::min(block_anchors, side.n_anchor - i0), loss_data, row_stats);
      }
    });
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward(
    const at::Tensor& grad_loss, const at::Tensor& anchors, const at::Tensor& candidates, const at::Tensor& tau,
    const at::Tensor& stats, int64_t offset, std::optional<double> rho, int64_t block_anchors,
    int64_t block_candidates, std::array<bool, 3> output_mask) {
  check_inputs(anchors, candidates, tau, offset, rho, block_anchors, block_candidates);
  const auto acc = tempnet::acc_scalar_type(anchors.scalar_type());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 4 && stats.size(1) == anchors.size(0),
              "contrastive: stats must have shape (4, b)");
  const at::Tensor tau_acc = tau.to(acc).contiguous();
  const at::Tensor grad_acc = grad_loss.to(acc).contiguous();
  at::Tensor stats_acc = stats.to(acc).contiguous();
  const auto options = anchors.options().dtype(acc);
  at::Tensor grad_anchors, grad_candidates;  // undefined until computed
  AT_DISPATCH_FLOATING_TYPES(acc, "contrastive_backward", [&] {
    const auto side = make_side<scalar_t>(anchors, candidates, tau_acc, offset, rho, block_anchors, block_candidates);
    const auto row_stats = Stats<scalar_t>::of(stats_acc);
    const scalar_t* grad = grad_acc.data_ptr<scalar_t>();
    if (output_mask[0]) {
      grad_anchors = at::zeros_like(side.anchors);
      const int64_t n_blocks = (side.n_anchor + block_anchors - 1) / block_anchors;
      at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
        at::Tensor buffer = at::empty({block_anchors * block_candidates}, options);
        for (int64_t block = begin; block < end; ++block) {
          const int64_t i0 = block * block_anchors;
          backward_anchor_block(side, buffer, i0, std::min(block_anchors, side.n_anchor - i0), grad, row_stats,
                                grad_anchors);
        }
      });
    }
    if (output_mask[1]) {
      grad_candidates = at::zeros_like(side.candidates);
      const int64_t n_blocks = (side.n_cand + block_candidates - 1) / block_candidates;
      at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
        at::Tensor buffer = at::empty({block_anchors * block_candidates}, options);
        for (int64_t block = begin; block < end; ++block) {
          const int64_t j0 = block * block_candidates;
          backward_candidate_block(side, buffer, j0, std::min(block_candidates, side.n_cand - j0), grad, row_stats,
                                   grad_candidates);
        }
      });
    }
  });
  const auto empty = anchors.new_empty({0});
  return {output_mask[0] ? grad_anchors.to(anchors.scalar_type()) : empty,
          output_mask[1] ? grad_candidates.to(candidates.scalar_type()) : empty,
          output_mask[2] ? (grad_acc * stats_acc[3]).to(tau.scalar_type()) : empty};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tempnet_cpp, m) {
  m.def("contrastive_forward(Tensor anchors, Tensor candidates, Tensor tau, int offset, float? rho, "
        "int block_anchors, int block_candidates) -> (Tensor, Tensor)");
  m.def("contrastive_backward(Tensor grad_loss, Tensor anchors, Tensor candidates, Tensor tau, Tensor stats, "
        "int offset, float? rho, int block_anchors, int block_candidates, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tempnet_cpp, CPU, m) {
  m.impl("contrastive_forward", &contrastive_forward);
  m.impl("contrastive_backward", &contrastive_backward);
}
