// One side of the contrastive loss with per-anchor temperatures (SPEC §2), fused on the CPU.
//
// Anchor i (row of anchors, (b, D)) is scored against every candidate j (row of candidates,
// (B, D)): s_ij = <a_i, c_j>, u_ij = s_ij / tau_i; its positive is candidate pos_i = offset + i.
//   plain (rho = None): L_i = lse_j(u_ij) - u_i,pos                      (positive in the sum)
//   DRO   (rho = ρ)   : L_i = tau_i (lse_{j≠pos}(u_ij) - u_i,pos - log(B-1)) + ρ tau_i
// The similarities are produced tile by tile (at::mm of an anchor block against a candidate
// block) and reduced by an online log-sum-exp, so memory is O((b + B) D + tile), never O(b B).
//
// Ops (namespace tempnet_cpp, CPU):
//   contrastive_forward(anchors, candidates, tau, offset, rho, block_anchors, block_candidates)
//     -> (loss (b,), lse (b,))   lse: the log-sum-exp of u_i over the summed candidates.
//   contrastive_backward(grad_loss, anchors, candidates, tau, lse, offset, rho, block_anchors,
//                        block_candidates, output_mask) -> (grad_anchors, grad_candidates, grad_tau)
// Features may be float64 / float32 / bfloat16 / float16; they are accumulated in float64 for
// float64 inputs and float32 otherwise. loss and lse are in the accumulation dtype; each gradient
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

// s = anchors[i0:i0+bi] @ candidates[j0:j0+bj].T written into the front of `buffer`.
at::Tensor similarity_tile(const at::Tensor& anchors, const at::Tensor& candidates, at::Tensor& buffer,
                           int64_t i0, int64_t bi, int64_t j0, int64_t bj) {
  at::Tensor tile = buffer.narrow(0, 0, bi * bj).view({bi, bj});
  at::mm_out(tile, anchors.narrow(0, i0, bi), candidates.narrow(0, j0, bj).t());
  return tile;
}

// Streams the tiles of one anchor block; fills lse and loss of anchors [i0, i0 + bi).
template <typename acc_t>
void forward_anchor_block(const Side<acc_t>& side, std::optional<double> rho, at::Tensor& buffer, int64_t i0,
                          int64_t bi, acc_t* lse, acc_t* loss) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  std::array<acc_t, 2> init{neg_inf, 0};
  std::vector<std::array<acc_t, 2>> running(bi, init);  // per anchor: (max m, Σ exp(u - m))
  std::vector<acc_t> u_pos(bi, 0);
  for (int64_t j0 = 0; j0 < side.n_cand; j0 += side.block_candidates) {
    const int64_t bj = std::min(side.block_candidates, side.n_cand - j0);
    at::Tensor tile = similarity_tile(side.anchors, side.candidates, buffer, i0, bi, j0, bj);
    acc_t* data = tile.data_ptr<acc_t>();
    for (int64_t r = 0; r < bi; ++r) {
      const int64_t i = i0 + r;
      const int64_t pos = side.offset + i - j0;  // the positive's column in this tile
      const acc_t inv_tau = acc_t(1) / side.tau[i];
      acc_t* row = data + r * bj;
      at::vec::map([inv_tau](Vec x) { return x * Vec(inv_tau); }, row, row, bj);
      if (pos >= 0 && pos < bj) {
        u_pos[r] = row[pos];
        if (side.dro) row[pos] = neg_inf;  // the DRO sum runs over negatives only
      }
      const acc_t tile_max = at::vec::reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); },
                                                        row, bj);
      if (tile_max == neg_inf) continue;  // a tile holding only the DRO positive adds nothing
      auto& [m, sum] = running[r];
      const acc_t new_max = std::max(m, tile_max);
      const acc_t tile_sum = at::vec::map_reduce_all<acc_t>([new_max](Vec x) { return (x - Vec(new_max)).exp(); },
                                                            [](Vec a, Vec b) { return a + b; }, row, bj);
      sum = sum * std::exp(m - new_max) + tile_sum;
      m = new_max;
    }
  }
  const acc_t log_negatives = side.n_cand > 1 ? std::log(acc_t(side.n_cand - 1)) : acc_t(0);
  for (int64_t r = 0; r < bi; ++r) {
    const int64_t i = i0 + r;
    const auto& [m, sum] = running[r];
    lse[i] = m + std::log(sum);
    const acc_t margin = lse[i] - u_pos[r];
    loss[i] = side.dro ? side.tau[i] * (margin - log_negatives + acc_t(*rho)) : margin;
  }
}

// row[c] <- scale · p_c with p_c = exp(row[c] / tau - lse) for c in [0, n); returns Σ_c p_c (lse - u_c).
template <typename acc_t>
acc_t softmax_span(acc_t* row, int64_t n, acc_t inv_tau, acc_t lse, acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec entropy(0);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec gap = Vec(lse) - Vec::loadu(row + c) * Vec(inv_tau);
    const Vec p = gap.neg().exp();
    entropy = at::vec::fmadd(p, gap, entropy);
    (p * Vec(scale)).store(row + c);
  }
  acc_t h = tempnet::horizontal_sum(entropy);
  for (; c < n; ++c) {
    const acc_t gap = lse - row[c] * inv_tau;
    const acc_t p = std::exp(-gap);
    h += p * gap;
    row[c] = scale * p;
  }
  return h;
}

// Overwrites a similarity tile with g_i ∂L_i/∂s_ij. With `entropy` set (a whole row sweep), also
// accumulates H_i += Σ_j p_ij (lse_i - u_ij) over the summed candidates and records u_i,pos.
//   plain: ∂L/∂s_ij = (p_ij - 1[j=pos]) / tau_i;  DRO: ∂L/∂s_ij = w_ij (j≠pos), -1 at pos.
template <typename acc_t>
void gradient_tile(const Side<acc_t>& side, at::Tensor& tile, int64_t i0, int64_t j0, const acc_t* grad,
                   const acc_t* lse, acc_t* entropy, acc_t* u_pos) {
  const int64_t bi = tile.size(0), bj = tile.size(1);
  acc_t* data = tile.data_ptr<acc_t>();
  for (int64_t r = 0; r < bi; ++r) {
    const int64_t i = i0 + r;
    const int64_t pos = side.offset + i - j0;
    const bool has_pos = pos >= 0 && pos < bj;
    const acc_t inv_tau = acc_t(1) / side.tau[i];
    acc_t* row = data + r * bj;
    if (has_pos && u_pos != nullptr) u_pos[r] = row[pos] * inv_tau;
    acc_t h;
    if (!side.dro) {
      h = softmax_span(row, bj, inv_tau, lse[i], grad[i] * inv_tau);
      if (has_pos) row[pos] -= grad[i] * inv_tau;
    } else if (has_pos) {
      // The positive is left out of the DRO softmax (its exp could overflow): two spans around it.
      h = softmax_span(row, pos, inv_tau, lse[i], grad[i]) +
          softmax_span(row + pos + 1, bj - pos - 1, inv_tau, lse[i], grad[i]);
      row[pos] = -grad[i];
    } else {
      h = softmax_span(row, bj, inv_tau, lse[i], grad[i]);
    }
    if (entropy != nullptr) entropy[r] += h;
  }
}

// Sweep over candidates for one anchor block: grad_tau and, when grad_anchors is defined, the
// block's rows of grad_anchors.
template <typename acc_t>
void backward_anchor_block(const Side<acc_t>& side, std::optional<double> rho, at::Tensor& buffer, int64_t i0,
                           int64_t bi, const acc_t* grad, const acc_t* lse, at::Tensor& grad_anchors,
                           acc_t* grad_tau) {
  std::vector<acc_t> entropy(bi, 0), u_pos(bi, 0);
  at::Tensor grad_block = grad_anchors.defined() ? grad_anchors.narrow(0, i0, bi) : at::Tensor();
  for (int64_t j0 = 0; j0 < side.n_cand; j0 += side.block_candidates) {
    const int64_t bj = std::min(side.block_candidates, side.n_cand - j0);
    at::Tensor tile = similarity_tile(side.anchors, side.candidates, buffer, i0, bi, j0, bj);
    gradient_tile(side, tile, i0, j0, grad, lse, entropy.data(), u_pos.data());
    if (grad_block.defined()) grad_block.addmm_(tile, side.candidates.narrow(0, j0, bj));
  }
  const acc_t log_negatives = side.n_cand > 1 ? std::log(acc_t(side.n_cand - 1)) : acc_t(0);
  for (int64_t r = 0; r < bi; ++r) {
    const int64_t i = i0 + r;
    // plain: ∂L/∂tau = -(Σ p u - u_pos)/tau = (H - L)/tau with L = lse - u_pos (SPEC §2);
    // DRO:   ∂L/∂tau = H(w) - log(B-1) + ρ.
    const acc_t dtau = side.dro ? entropy[r] - log_negatives + acc_t(*rho)
                                : (entropy[r] - (lse[i] - u_pos[r])) / side.tau[i];
    grad_tau[i] = grad[i] * dtau;
  }
}

// Sweep over anchors for one candidate block: grad_candidates of the block (race-free: each
// thread owns whole candidate blocks).
template <typename acc_t>
void backward_candidate_block(const Side<acc_t>& side, at::Tensor& buffer, int64_t j0, int64_t bj,
                              const acc_t* grad, const acc_t* lse, at::Tensor& grad_candidates) {
  at::Tensor grad_block = grad_candidates.narrow(0, j0, bj);
  for (int64_t i0 = 0; i0 < side.n_anchor; i0 += side.block_anchors) {
    const int64_t bi = std::min(side.block_anchors, side.n_anchor - i0);
    at::Tensor tile = similarity_tile(side.anchors, side.candidates, buffer, i0, bi, j0, bj);
    gradient_tile<acc_t>(side, tile, i0, j0, grad, lse, nullptr, nullptr);
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
  at::Tensor lse = at::empty_like(loss);
  AT_DISPATCH_FLOATING_TYPES(acc, "contrastive_forward", [&] {
    const auto side = make_side<scalar_t>(anchors, candidates, tau_acc, offset, rho, block_anchors, block_candidates);
    const int64_t n_blocks = (side.n_anchor + block_anchors - 1) / block_anchors;
    scalar_t* lse_data = lse.data_ptr<scalar_t>();
    scalar_t* loss_data = loss.data_ptr<scalar_t>();
    at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = at::empty({block_anchors * block_candidates}, loss.options());
      for (int64_t block = begin; block < end; ++block) {
        const int64_t i0 = block * block_anchors;
        forward_anchor_block(side, rho, buffer, i0, std::min(block_anchors, side.n_anchor - i0), lse_data, loss_data);
      }
    });
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward(
    const at::Tensor& grad_loss, const at::Tensor& anchors, const at::Tensor& candidates, const at::Tensor& tau,
    const at::Tensor& lse, int64_t offset, std::optional<double> rho, int64_t block_anchors, int64_t block_candidates,
    std::array<bool, 3> output_mask) {
  check_inputs(anchors, candidates, tau, offset, rho, block_anchors, block_candidates);
  const auto acc = tempnet::acc_scalar_type(anchors.scalar_type());
  const at::Tensor tau_acc = tau.to(acc).contiguous();
  const at::Tensor grad_acc = grad_loss.to(acc).contiguous();
  const at::Tensor lse_acc = lse.to(acc).contiguous();
  const auto options = anchors.options().dtype(acc);
  at::Tensor grad_anchors, grad_candidates, grad_tau;  // undefined until computed
  AT_DISPATCH_FLOATING_TYPES(acc, "contrastive_backward", [&] {
    const auto side = make_side<scalar_t>(anchors, candidates, tau_acc, offset, rho, block_anchors, block_candidates);
    const scalar_t* grad = grad_acc.data_ptr<scalar_t>();
    const scalar_t* lse_data = lse_acc.data_ptr<scalar_t>();
    if (output_mask[0] || output_mask[2]) {
      if (output_mask[0]) grad_anchors = at::zeros_like(side.anchors);
      grad_tau = at::empty({side.n_anchor}, options);
      scalar_t* grad_tau_data = grad_tau.data_ptr<scalar_t>();
      const int64_t n_blocks = (side.n_anchor + block_anchors - 1) / block_anchors;
      at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
        at::Tensor buffer = at::empty({block_anchors * block_candidates}, options);
        for (int64_t block = begin; block < end; ++block) {
          const int64_t i0 = block * block_anchors;
          backward_anchor_block(side, rho, buffer, i0, std::min(block_anchors, side.n_anchor - i0), grad, lse_data,
                                grad_anchors, grad_tau_data);
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
          backward_candidate_block(side, buffer, j0, std::min(block_candidates, side.n_cand - j0), grad, lse_data,
                                   grad_candidates);
        }
      });
    }
  });
  const auto empty = anchors.new_empty({0});
  return {output_mask[0] ? grad_anchors.to(anchors.scalar_type()) : empty,
          output_mask[1] ? grad_candidates.to(candidates.scalar_type()) : empty,
          output_mask[2] ? grad_tau.to(tau.scalar_type()) : empty};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tempnet_cpp, m) {
  m.def("contrastive_forward(Tensor anchors, Tensor candidates, Tensor tau, int offset, float? rho, "
        "int block_anchors, int block_candidates) -> (Tensor, Tensor)");
  m.def("contrastive_backward(Tensor grad_loss, Tensor anchors, Tensor candidates, Tensor tau, Tensor lse, "
        "int offset, float? rho, int block_anchors, int block_candidates, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tempnet_cpp, CPU, m) {
  m.impl("contrastive_forward", &contrastive_forward);
  m.impl("contrastive_backward", &contrastive_backward);
}
