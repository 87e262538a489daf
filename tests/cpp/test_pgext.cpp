// C++ tests of libpgext through its public header, built with CMake against an
// installed pgext (find_package(pgext)). Expected values are computed here, in
// double precision, from the definitions (log-softmax, entropy and their
// derivatives), never by pgext.
//
//   pgext_cpp_tests values|grads|errors|info        one group of checks
//   pgext_cpp_tests script <module.pt>              a TorchScript module saved
//                                                   by Python that calls
//                                                   torch.ops.pgext.pg_error
#include <pgext/pgext.h>

#include <torch/script.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

namespace {

int g_passed = 0;
int g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::cerr << "FAILED: " << what << "\n";
  }
}

void check_close(double got, double want, double tol, const std::string& what) {
  const bool ok = std::abs(got - want) <= tol * (1.0 + std::abs(want));
  check(ok, what + ": got " + std::to_string(got) + ", want " + std::to_string(want));
}

// The notebook's math for one row, in double: log p_j, entropy.
struct RowRef {
  std::vector<double> logp;
  double entropy = 0;
};

RowRef row_reference(const std::vector<double>& x) {
  double m = -std::numeric_limits<double>::infinity();
  for (double v : x) m = std::max(m, v);
  double s = 0;
  for (double v : x) s += std::exp(v - m);
  RowRef r;
  const double lse = m + std::log(s);
  for (double v : x) {
    r.logp.push_back(v - lse);
    const double p = std::exp(v - lse);
    if (p > 0) r.entropy -= p * (v - lse);
  }
  return r;
}

std::vector<double> row_of(const torch::Tensor& logit, int64_t i) {
  auto row = logit[i].to(torch::kDouble).contiguous();
  return std::vector<double>(row.data_ptr<double>(), row.data_ptr<double>() + row.numel());
}

struct Case {
  torch::Tensor logit, action, ret, weight;
};

Case make_case(int64_t rows, int64_t n, bool masked) {
  torch::manual_seed(1234 + rows * 7 + n);
  Case c;
  c.logit = torch::randn({rows, n}) * 2;
  c.action = torch::randint(0, n, {rows}, torch::kLong);
  c.ret = torch::randn({rows});
  c.weight = torch::rand({rows}) + 0.5;
  if (masked) {
    // Mask every third class but never the action.
    auto a = c.action.accessor<int64_t, 1>();
    auto x = c.logit.accessor<float, 2>();
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < n; j += 3) {
        if (j != a[i]) x[i][j] = -std::numeric_limits<float>::infinity();
      }
    }
  }
  return c;
}

void test_values() {
  for (bool masked : {false, true}) {
    const Case c = make_case(6, 11, masked);
    const std::string tag = masked ? " (masked)" : "";
    auto a = c.action.accessor<int64_t, 1>();
    auto R = c.ret.accessor<float, 1>();
    auto W = c.weight.accessor<float, 1>();
    double pol_mean = 0, ent_mean = 0, pol_wsum = 0, ent_wsum = 0;
    std::vector<double> pol_rows, ent_rows;
    for (int64_t i = 0; i < 6; ++i) {
      const RowRef r = row_reference(row_of(c.logit, i));
      const double pol = -R[i] * r.logp[a[i]];
      pol_rows.push_back(pol * W[i]);
      ent_rows.push_back(r.entropy * W[i]);
      pol_mean += pol / 6;
      ent_mean += r.entropy / 6;
      pol_wsum += pol * W[i];
      ent_wsum += r.entropy * W[i];
    }
    const pgext::PgLoss mean = pgext::pg_error({c.logit, c.action, c.ret});
    check(mean.policy_loss.dim() == 0 && mean.policy_loss.scalar_type() == torch::kFloat, "mean is a float 0-d tensor");
    check_close(mean.policy_loss.item<double>(), pol_mean, 1e-5, "policy_loss mean" + tag);
    check_close(mean.entropy_loss.item<double>(), ent_mean, 1e-5, "entropy_loss mean" + tag);

    const pgext::PgLoss sum =
        pgext::pg_error({c.logit, c.action, c.ret}, {.weight = c.weight, .reduction = pgext::Reduction::Sum});
    check_close(sum.policy_loss.item<double>(), pol_wsum, 1e-5, "weighted policy_loss sum" + tag);
    check_close(sum.entropy_loss.item<double>(), ent_wsum, 1e-5, "weighted entropy_loss sum" + tag);

    const pgext::PgLoss none =
        pgext::pg_error({c.logit, c.action, c.ret}, {.weight = c.weight, .reduction = pgext::Reduction::None});
    check(none.policy_loss.sizes() == c.action.sizes(), "'none' has the actions' shape");
    for (int64_t i = 0; i < 6; ++i) {
      check_close(none.policy_loss[i].item<double>(), pol_rows[i], 1e-5, "per-sample policy" + tag);
      check_close(none.entropy_loss[i].item<double>(), ent_rows[i], 1e-5, "per-sample entropy" + tag);
    }
  }
  // Leading dims: (2, 3, N) with (2, 3) actions equals the flattened batch.
  const Case c = make_case(6, 5, false);
  const auto flat = pgext::pg_error({c.logit, c.action, c.ret});
  const auto nested = pgext::pg_error({c.logit.view({2, 3, 5}), c.action.view({2, 3}), c.ret.view({2, 3})});
  check(torch::allclose(flat.policy_loss, nested.policy_loss), "leading dims flatten to rows");
}

void test_grads() {
  for (bool masked : {false, true}) {
    const std::string tag = masked ? " (masked)" : "";
    Case c = make_case(5, 9, masked);
    auto logit = c.logit.clone().requires_grad_(true);
    auto ret = c.ret.clone().requires_grad_(true);
    auto weight = c.weight.clone().requires_grad_(true);
    const auto loss = pgext::pg_error({logit, c.action, ret}, {.weight = weight});
    // Independent upstream gradients: 3 for the policy loss, -0.5 for the entropy.
    (3 * loss.policy_loss - 0.5 * loss.entropy_loss).backward();
    check(logit.grad().defined() && ret.grad().defined() && weight.grad().defined(), "gradients reach all leaves");

    auto a = c.action.accessor<int64_t, 1>();
    auto R = c.ret.accessor<float, 1>();
    auto W = c.weight.accessor<float, 1>();
    auto G = logit.grad().accessor<float, 2>();
    auto GR = ret.grad().accessor<float, 1>();
    auto GW = weight.grad().accessor<float, 1>();
    const double C = 5, gP = 3, gE = -0.5;
    bool masked_zero = true;
    for (int64_t i = 0; i < 5; ++i) {
      const auto x = row_of(c.logit, i);
      const RowRef r = row_reference(x);
      for (int64_t j = 0; j < 9; ++j) {
        const double p = std::exp(r.logp[j]);
        // d/dx_j of -R log p_a is R (p_j - [j == a]); of H it is -p_j (log p_j + H).
        const double dpol = R[i] * (p - (j == a[i] ? 1.0 : 0.0));
        const double dent = p > 0 ? -p * (r.logp[j] + r.entropy) : 0.0;
        const double want = W[i] * (gP * dpol + gE * dent) / C;
        check_close(G[i][j], want, 1e-5, "grad logit" + tag);
        if (std::isinf(x[j])) masked_zero = masked_zero && G[i][j] == 0.0f;
      }
      check_close(GR[i], -gP * W[i] * r.logp[a[i]] / C, 1e-5, "grad return" + tag);
      check_close(GW[i], (-gP * R[i] * r.logp[a[i]] + gE * r.entropy) / C, 1e-5, "grad weight" + tag);
    }
    check(masked_zero, "masked logits get exactly zero gradient" + tag);
    check(std::isfinite(loss.entropy_loss.item<double>()), "masked rows have a finite entropy" + tag);
  }
}

template <typename E>
void expect_throw(const std::function<void()>& f, const std::string& needle, const std::string& what) {
  try {
    f();
    check(false, what + ": no exception");
  } catch (const E& e) {
    const std::string msg = e.what();
    check(msg.find(needle) != std::string::npos, what + ": message lacks '" + needle + "': " + msg.substr(0, 300));
  } catch (const std::exception& e) {
    check(false, what + ": wrong exception type: " + std::string(e.what()).substr(0, 300));
  }
}

// A centralized critic's (B, 1) return against (B, A) actions: the same as the
// return expanded, with its gradient summed over the agents.
void test_broadcast() {
  torch::manual_seed(11);
  const auto logit = torch::randn({6, 3, 5});
  const auto action = torch::randint(0, 5, {6, 3});
  auto ret = torch::randn({6, 1}).requires_grad_(true);
  auto full = ret.detach().expand({6, 3}).clone().requires_grad_(true);
  const auto a = pgext::pg_error({logit, action, ret});
  const auto b = pgext::pg_error({logit, action, full});
  check_close(a.policy_loss.item<double>(), b.policy_loss.item<double>(), 1e-6, "broadcast return: policy loss");
  check_close(a.entropy_loss.item<double>(), b.entropy_loss.item<double>(), 1e-6, "broadcast return: entropy loss");
  a.policy_loss.backward();
  b.policy_loss.backward();
  check(ret.grad().sizes() == ret.sizes(), "broadcast return: gradient of the return's shape");
  check(torch::allclose(ret.grad(), full.grad().sum(1, /*keepdim=*/true), 1e-5, 1e-6),
        "broadcast return: gradient summed over the broadcast dimension");
  // a (B, 1) return against (B,) actions would grow the samples: refused
  expect_throw<c10::ValueError>(
      [&] { pgext::pg_error({logit.select(1, 0), action.select(1, 0), ret.detach()}); }, "[6, 1]",
      "a (B, 1) return against (B,) actions");
}

// The per-sample primitive: log p(a) and H, padding ignored, gradients of both.
void test_log_prob_entropy() {
  torch::manual_seed(12);
  auto logit = torch::randn({4, 6, 9}).requires_grad_(true);
  auto action = torch::randint(0, 9, {4, 6});
  action.index_put_({1, 2}, -100);
  const auto out = pgext::log_prob_entropy(logit, action, {.ignore_index = -100});
  const auto keep = action != -100;
  const auto logp = torch::log_softmax(logit.detach(), -1);
  const auto want_lp = logp.gather(-1, action.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep;
  const auto want_h = -(logp.exp() * logp).sum(-1) * keep;
  check(out.log_prob.sizes() == action.sizes() && out.entropy.sizes() == action.sizes(), "log_prob_entropy: shapes");
  check(torch::allclose(out.log_prob, want_lp, 1e-5, 1e-6), "log_prob_entropy: log_prob");
  check(torch::allclose(out.entropy, want_h, 1e-5, 1e-6), "log_prob_entropy: entropy");
  check(out.log_prob[1][2].item<float>() == 0.0f && out.entropy[1][2].item<float>() == 0.0f,
        "log_prob_entropy: ignored sample is 0");
  (out.log_prob.sum() - 0.5 * out.entropy.sum()).backward();
  check(logit.grad().defined() && logit.grad()[1][2].abs().max().item<float>() == 0.0f,
        "log_prob_entropy: ignored sample gets no gradient");
  expect_throw<c10::IndexError>(
      [&] { pgext::log_prob_entropy(logit.detach(), action.clamp_min(0) + 9); }, "out of range",
      "log_prob_entropy: out-of-range action");

  // The sampling temperature: the distribution of logit / T, the gradient
  // with respect to logit (that of the composition), bad values refused.
  const double T = 0.7;
  auto x = logit.detach().clone().requires_grad_(true);
  const auto hot = pgext::log_prob_entropy(x, action, {.ignore_index = -100, .temperature = T});
  auto y = logit.detach().clone().requires_grad_(true);
  const auto logp_t = torch::log_softmax(y / T, -1);
  const auto want_lp_t = logp_t.gather(-1, action.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep;
  const auto want_h_t = -(logp_t.exp() * logp_t).sum(-1) * keep;
  check(torch::allclose(hot.log_prob, want_lp_t, 1e-5, 1e-5), "log_prob_entropy: log_prob at T = 0.7");
  check(torch::allclose(hot.entropy, want_h_t, 1e-5, 1e-5), "log_prob_entropy: entropy at T = 0.7");
  check(!torch::allclose(hot.entropy, out.entropy, 1e-3, 1e-3), "log_prob_entropy: the temperature applies");
  (hot.log_prob.sum() - 0.5 * hot.entropy.sum()).backward();
  (want_lp_t.sum() - 0.5 * want_h_t.sum()).backward();
  check(torch::allclose(x.grad(), y.grad(), 1e-4, 1e-5), "log_prob_entropy: gradient at T = 0.7");
  const auto loss_t = pgext::pg_error({logit.detach(), action.clamp_min(0), torch::ones({4, 6})},
                                      {.reduction = pgext::Reduction::None, .temperature = T});
  const auto plain_t = pgext::log_prob_entropy(logit.detach(), action.clamp_min(0), {.temperature = T});
  check(torch::allclose(loss_t.policy_loss, -plain_t.log_prob, 1e-6, 1e-6) &&
            torch::allclose(loss_t.entropy_loss, plain_t.entropy, 1e-6, 1e-6),
        "pg_error: PgOptions::temperature");
  for (const double bad : {0.0, -2.0, std::numeric_limits<double>::infinity(), std::nan("")}) {
    expect_throw<c10::ValueError>(
        [&] { pgext::log_prob_entropy(logit.detach(), action, {.ignore_index = -100, .temperature = bad}); },
        "log_prob_entropy: temperature must be a finite number > 0", "log_prob_entropy: bad temperature");
    expect_throw<c10::ValueError>(
        [&] { pgext::pg_error({logit.detach(), action.clamp_min(0), torch::ones({4, 6})}, {.temperature = bad}); },
        "pg_error: temperature must be a finite number > 0", "pg_error: bad temperature");
  }
}

// The fused output layer against log_prob_entropy / pg_error on the logits
// of torch::linear, with gradients of input, weight and bias, chunk by chunk.
void test_linear() {
  torch::manual_seed(15);
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto x = torch::randn({3, 5, 8}, opts).requires_grad_(true);
  auto w = torch::randn({11, 8}, opts).requires_grad_(true);
  auto b = torch::randn({11}, opts).requires_grad_(true);
  auto action = torch::randint(0, 11, {3, 5});
  action.index_put_({0, 1}, -100);
  const auto out = pgext::linear_log_prob_entropy(
      x, w, action, {.linear_bias = b, .temperature = 0.7, .ignore_index = -100, .chunk_size = 4});
  auto x2 = x.detach().clone().requires_grad_(true);
  auto w2 = w.detach().clone().requires_grad_(true);
  auto b2 = b.detach().clone().requires_grad_(true);
  const auto want = pgext::log_prob_entropy(torch::linear(x2, w2, b2) / 0.7, action, {.ignore_index = -100});
  check(torch::allclose(out.log_prob, want.log_prob, 1e-10, 1e-12), "linear: log_prob");
  check(torch::allclose(out.entropy, want.entropy, 1e-10, 1e-12), "linear: entropy");
  (out.log_prob.sum() - 0.3 * out.entropy.sum()).backward();
  (want.log_prob.sum() - 0.3 * want.entropy.sum()).backward();
  check(torch::allclose(x.grad(), x2.grad(), 1e-10, 1e-12), "linear: input gradient");
  check(torch::allclose(w.grad(), w2.grad(), 1e-10, 1e-12), "linear: weight gradient");
  check(torch::allclose(b.grad(), b2.grad(), 1e-10, 1e-12), "linear: bias gradient");
  const auto a = action.clamp_min(0);
  const auto ret = torch::randn({3, 5}, opts);
  const auto loss = pgext::linear_pg_error(x.detach(), w.detach(), a, ret, {.reduction = pgext::Reduction::Sum});
  const auto ref = pgext::pg_error({torch::linear(x.detach(), w.detach()), a, ret}, {.reduction = pgext::Reduction::Sum});
  check_close(loss.policy_loss.item<double>(), ref.policy_loss.item<double>(), 1e-10, "linear_pg_error: policy");
  check_close(loss.entropy_loss.item<double>(), ref.entropy_loss.item<double>(), 1e-10, "linear_pg_error: entropy");
  expect_throw<c10::ValueError>(
      [&] { pgext::linear_log_prob_entropy(x.detach(), w.detach().narrow(1, 0, 7), a); }, "H = 7",
      "linear: H mismatch");
  expect_throw<c10::ValueError>(
      [&] { pgext::linear_log_prob_entropy(x.detach(), w.detach(), a, {.chunk_size = 0}); }, "chunk_size",
      "linear: chunk_size 0");
  expect_throw<c10::IndexError>(
      [&] { pgext::linear_log_prob_entropy(x.detach(), w.detach(), a + 11); }, "out of range",
      "linear: out-of-range action");
}

// PPO and A2C against their formulas written out here with log_softmax, and
// gradients reaching the logits and the values.
void test_losses() {
  torch::manual_seed(13);
  const int64_t B = 32, N = 6;
  auto logit = torch::randn({B, N}, torch::kDouble).requires_grad_(true);
  const auto logit_old = logit.detach() + 0.3 * torch::randn({B, N}, torch::kDouble);
  const auto action = torch::randint(0, N, {B});
  auto value = torch::randn({B}, torch::kDouble).requires_grad_(true);
  const auto value_old = value.detach() + 0.3 * torch::randn({B}, torch::kDouble);
  const auto adv = torch::randn({B}, torch::kDouble);
  const auto ret = torch::randn({B}, torch::kDouble);
  const auto weight = torch::rand({B}, torch::kDouble);
  const auto [loss, info] = pgext::ppo_error({logit, logit_old, action, value, value_old, adv, ret, weight},
                                             {.clip_ratio = 0.2, .dual_clip = 3.0});
  const auto logp = torch::log_softmax(logit.detach(), -1);
  const auto lp = logp.gather(-1, action.unsqueeze(-1)).squeeze(-1);
  const auto lp_old = torch::log_softmax(logit_old, -1).gather(-1, action.unsqueeze(-1)).squeeze(-1);
  const auto ratio = (lp - lp_old).exp();
  const auto clip1 = torch::min(ratio * adv, ratio.clamp(0.8, 1.2) * adv);
  const auto term = torch::where(adv < 0, torch::max(clip1, 3.0 * adv), clip1);
  const double want_policy = -(term * weight).mean().item<double>();
  const double want_entropy = (-(logp.exp() * logp).sum(-1) * weight).mean().item<double>();
  const auto v = value.detach();
  const auto v_clip = value_old + (v - value_old).clamp(-0.2, 0.2);
  const double want_value = 0.5 * (torch::max((ret - v).pow(2), (ret - v_clip).pow(2)) * weight).mean().item<double>();
  check_close(loss.policy_loss.item<double>(), want_policy, 1e-10, "ppo_error: policy loss");
  check_close(loss.entropy_loss.item<double>(), want_entropy, 1e-10, "ppo_error: entropy loss");
  check_close(loss.value_loss.item<double>(), want_value, 1e-10, "ppo_error: value loss");
  check_close(info.approx_kl.item<double>(), (lp_old - lp).mean().item<double>(), 1e-10, "ppo_error: approx_kl");
  check(info.approx_kl.dim() == 0 && info.clipfrac.dim() == 0, "ppo_error: info as 0-d tensors");
  (loss.policy_loss + 0.5 * loss.value_loss - 0.01 * loss.entropy_loss).backward();
  check(logit.grad().defined() && value.grad().defined(), "ppo_error: gradients reach the logits and values");
  // the value loss is one fused node, whose gradient is DI-engine's eager ops'
  check(loss.value_loss.grad_fn() != nullptr && loss.value_loss.grad_fn()->name() == "PpoValueBackward",
        "ppo_error: the value loss is one PpoValueBackward node");
  const auto v_eager = v.clone().requires_grad_(true);
  const auto v_eager_clip = value_old + (v_eager - value_old).clamp(-0.2, 0.2);
  (0.25 * (torch::max((ret - v_eager).pow(2), (ret - v_eager_clip).pow(2)) * weight).mean()).backward();
  check(torch::allclose(value.grad(), v_eager.grad(), 1e-12, 1e-15), "ppo_error: the value gradient is eager's");
  // stored old log-probabilities give the same loss
  const auto from_lp = pgext::ppo_policy_error({logit.detach(), lp_old, action, adv, weight}, {.dual_clip = 3.0});
  check_close(from_lp.first.policy_loss.item<double>(), want_policy, 1e-10, "ppo_policy_error: old log-probs");
  expect_throw<c10::ValueError>(
      [&] { pgext::ppo_policy_error({logit.detach(), logit_old, action, adv}, {.dual_clip = 0.5}); }, "dual_clip",
      "ppo: dual_clip <= 1");
  // bad input raises c10::ValueError naming the argument, where the eager ATen
  // expressions would fail with a c10::Error naming none
  const auto longer = torch::randn({B + 1}, torch::kDouble);
  expect_throw<c10::ValueError>(
      [&] { pgext::ppo_policy_error({logit.detach(), logit_old, action, longer}); }, "must have the actions' shape",
      "ppo: an advantage of another length");
  expect_throw<c10::ValueError>(
      [&] { pgext::ppo_error({logit.detach(), logit_old, action, v, value_old.to(torch::kMeta), adv, ret}); },
      "value_old is on meta", "ppo: value_old on another device");
  expect_throw<c10::ValueError>(
      [&] { pgext::a2c_error({logit.detach(), action, v, adv, longer}); }, "do not broadcast",
      "a2c: a return of another length");
  expect_throw<c10::ValueError>(
      [&] { pgext::a2c_error({logit.detach(), action, v.to(torch::kMeta), adv, ret}); }, "value is on meta",
      "a2c: value on another device");
  // a2c_error's policy loss is pg_error's, its errors in a2c_error's names
  expect_throw<c10::ValueError>(
      [&] { pgext::a2c_error({logit.detach(), action, v, adv.view({B, 1}), ret}); }, "pgext::a2c_error: adv must",
      "a2c: a (B, 1) advantage");
  expect_throw<c10::IndexError>(
      [&] { pgext::a2c_error({logit.detach(), action + N, v, adv, ret}); }, "pgext::a2c_error: action",
      "a2c: an out-of-range action");
  // several agents sharing one advantage: DI-engine's shapes still compute
  const auto agents = pgext::ppo_policy_error(
      {logit.detach().view({B / 4, 4, N}), logit_old.view({B / 4, 4, N}), action.view({B / 4, 4}), adv.narrow(0, 0, B / 4)});
  check(torch::isfinite(agents.first.policy_loss).item<bool>(), "ppo: (B, A, N) logits with a (B,) advantage");
  const auto a2c = pgext::a2c_error({logit.detach(), action, v, adv, ret, weight});
  check_close(a2c.policy_loss.item<double>(), -(lp * adv * weight).mean().item<double>(), 1e-10, "a2c: policy");
  check_close(a2c.value_loss.item<double>(), ((ret - v).pow(2) * weight).mean().item<double>(), 1e-10, "a2c: value");
  check_close(a2c.entropy_loss.item<double>(), want_entropy, 1e-10, "a2c: entropy");
}

void test_errors() {
  const Case c = make_case(4, 7, false);
  for (int64_t bad : {int64_t{-1}, int64_t{7}, int64_t{1} << 40}) {
    auto action = c.action.clone();
    action[2] = bad;
    expect_throw<c10::IndexError>([&] { pgext::pg_error({c.logit, action, c.ret}); }, std::to_string(bad),
                                  "out-of-range action " + std::to_string(bad));
  }
  expect_throw<c10::TypeError>([&] { pgext::pg_error({c.logit, c.action.to(torch::kFloat), c.ret}); }, "action",
                               "float actions");
  expect_throw<c10::TypeError>([&] { pgext::pg_error({c.logit.to(torch::kLong), c.action, c.ret}); }, "logit",
                               "integer logits");
  expect_throw<c10::ValueError>([&] { pgext::pg_error({c.logit, c.action, c.ret.view({4, 1})}); }, "[4, 1]",
                                "a (B, 1) return");
  expect_throw<c10::ValueError>([&] { pgext::pg_error({torch::randn({4, 0}), c.action, c.ret}); }, "N = 0",
                                "no classes");
  expect_throw<c10::ValueError>(
      [&] { pgext::pg_error({c.logit, c.action, c.ret}, {.reduction = static_cast<pgext::Reduction>(7)}); },
      "reduction", "unknown reduction");
  expect_throw<c10::ValueError>([&] { pgext::pg_error({c.logit, torch::Tensor(), c.ret}); }, "tensors",
                                "undefined action");
  // Every c10 error derives from c10::Error.
  expect_throw<c10::Error>([&] { pgext::pg_error({c.logit, c.action.view({2, 2}), c.ret}); }, "shape",
                           "action of the wrong shape");
}

void test_info() {
  check(std::strlen(pgext::version()) > 0, "version");
  const std::string cap = pgext::cpu_capability();
  check(cap == "DEFAULT" || cap == "AVX2" || cap == "AVX512", "cpu_capability: " + cap);
  // bfloat16 logits: the same build, or the AVX512_BF16 one on top of AVX512.
  const std::string bf16_cap = pgext::cpu_capability(at::kBFloat16);
  check(bf16_cap == cap || (cap == "AVX512" && bf16_cap == "AVX512_BF16"), "cpu_capability(bf16): " + bf16_cap);
  check(std::string(pgext::reduction_name(pgext::Reduction::None)) == "none", "reduction_name");
  // The op is registered with the dispatcher, as Python sees it.
  check(c10::Dispatcher::singleton().findSchema({"pgext::pg_error", ""}).has_value(), "pgext::pg_error registered");
  std::cout << "pgext " << pgext::version() << ", CPU kernels " << cap << ", CUDA kernels "
            << (pgext::cuda_compiled() ? "compiled" : "not compiled") << "\n";
}

// The module's forward(logit, action, return_) returns (policy, entropy) from
// torch.ops.pgext.pg_error; it must agree with the C++ API on the same inputs.
void test_script(const std::string& path) {
  torch::jit::Module module = torch::jit::load(path);
  const Case c = make_case(8, 13, true);
  auto out = module.forward({c.logit, c.action, c.ret}).toTuple();
  const auto direct = pgext::pg_error({c.logit, c.action, c.ret});
  check(torch::equal(out->elements()[0].toTensor(), direct.policy_loss), "scripted policy_loss");
  check(torch::equal(out->elements()[1].toTensor(), direct.entropy_loss), "scripted entropy_loss");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string group = argc > 1 ? argv[1] : "all";
  try {
    if (group == "values" || group == "all") test_values();
    if (group == "grads" || group == "all") test_grads();
    if (group == "errors" || group == "all") test_errors();
    if (group == "broadcast" || group == "all") test_broadcast();
    if (group == "log_prob_entropy" || group == "all") test_log_prob_entropy();
    if (group == "losses" || group == "all") test_losses();
    if (group == "linear" || group == "all") test_linear();
    if (group == "info" || group == "all") test_info();
    if (group == "script") {
      if (argc < 3) {
        std::cerr << "usage: pgext_cpp_tests script <module.pt>\n";
        return 2;
      }
      test_script(argv[2]);
    }
  } catch (const std::exception& e) {
    std::cerr << "unexpected exception: " << e.what() << "\n";
    ++g_failed;
  }
  if (g_passed + g_failed == 0) {
    std::cerr << "unknown test group '" << group << "'\n";
    return 2;
  }
  std::cout << g_passed << " passed, " << g_failed << " failed\n";
  return g_failed == 0 ? 0 : 1;
}
