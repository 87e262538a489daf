// pg_error's schema, a fragment of the pgext library (core/library.cpp).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pgext, m) {
  // policy_loss and entropy_loss of a categorical policy: its forward and
  // backward are the row kernels' pg_error_forward / pg_error_backward
  // (core/library.cpp), its autograd pg_error_autograd.cpp.
  m.def(
      "pg_error(Tensor logit, Tensor action, Tensor return_, Tensor? weight=None, "
      "str reduction='mean', float temperature=1.0) -> (Tensor policy_loss, Tensor entropy_loss)");
}
