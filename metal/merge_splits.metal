// dhsa_merge_splits: kernel body for mx.fast.metal_kernel / mx.fast.cuda_kernel (signature
// generated; ids_<backend>.h prepended; prelude_<backend>.h + common.h as header).
// Joins the per-split results of sparse_attention.metal (SPLIT) into one output.
// inputs : part [n_splits, R, D] float32 (each split's normalised output)
//          lse [n_splits, R] float32 (each split's log-sum-exp, natural log; -inf: no key)
//          iparams int32 [2]: n_splits, R
// outputs: out [R, D] T: sum_z w_z part_z / sum_z w_z with w_z = exp(lse_z - max lse);
//          0 for a row no split saw a key of
// template: T, D
// launch : grid (D, R, 1), threadgroup (D, 1, 1): one group per row, one thread per column.
const int n_splits = iparams[0];
const int n_rows = iparams[1];
const int r = dhsa_gy;
const int d = dhsa_tid;
float m = -DHSA_INF;
for (int z = 0; z < n_splits; ++z) {
  m = dhsa_max(m, lse[(dhsa_long)z * n_rows + r]);
}
float num = 0.0f, den = 0.0f;
if (m > -DHSA_INF) {
  for (int z = 0; z < n_splits; ++z) {
    const float l = lse[(dhsa_long)z * n_rows + r];
    const float w = l > -DHSA_INF ? dhsa_exp2((l - m) * DHSA_LOG2E) : 0.0f;
    num += w * part[((dhsa_long)z * n_rows + r) * D + d];
    den += w;
  }
}
out[(dhsa_long)r * D + d] = dhsa_from_float<T>(den > 0.0f ? num / den : 0.0f);
