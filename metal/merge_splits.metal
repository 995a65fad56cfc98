// dhsa_merge_splits: kernel body for mx.fast.metal_kernel / mx.fast.cuda_kernel (signature
// generated; ids_<backend>.h prepended; prelude_<backend>.h + common.h as header).
// Joins the per-split results of sparse_attention.metal (SPLIT) and decode_attention.metal.
// inputs : part [n_splits, R, D] float32 (each split's normalised output)
//          lse [n_splits, R] float32 (each split's log-sum-exp, natural log; -inf: no key)
//          iparams int32: kernels.sources.MergeParams (iparams[MS_<FIELD>]): n_splits, R
// outputs: out [R, D] T: sum_z w_z part_z / sum_z w_z with w_z = exp(lse_z - max lse);
//          0 for a row no split saw a key of
// template: T, D, NW (warps per group)
// launch : grid (NW * 32 * ceil(D / 32), R, 1), threadgroup (NW * 32, 1, 1): group (c, r)
//          owns columns [32 c, 32 c + 32) of row r, a lane one column; warp w sums the
//          splits w, w + NW, ..., ZB of them per step so that their loads are in flight
//          together, and the warps' sums meet in shared memory.
constexpr int ZB = 4;

DHSA_SHARED(float, num_s, NW * 32);
DHSA_SHARED(float, red_s, NW);

const int n_splits = iparams[MS_N_SPLITS];
const int n_rows = iparams[MS_N_ROWS];
const int r = dhsa_gy;
const int col = dhsa_gx * 32 + dhsa_lane;

// The largest log-sum-exp of the row.
float m = -DHSA_INF;
for (int z = dhsa_tid; z < n_splits; z += NW * 32) {
  m = dhsa_max(m, lse[(dhsa_long)z * n_rows + r]);
}
DHSA_UNROLL
for (int s = 16; s > 0; s >>= 1) {
  m = dhsa_max(m, dhsa_shfl_xor(m, s));
}
if (dhsa_lane == 0) {
  red_s[dhsa_warp] = m;
}
DHSA_BARRIER();
m = -DHSA_INF;
for (int w = 0; w < NW; ++w) {
  m = dhsa_max(m, red_s[w]);
}
DHSA_BARRIER();  // red_s is reused below

float num = 0.0f, den = 0.0f;
if (m > -DHSA_INF) {
  for (int z0 = dhsa_warp; z0 < n_splits; z0 += NW * ZB) {
    float l[ZB];
    float x[ZB];
    DHSA_UNROLL
    for (int u = 0; u < ZB; ++u) {
      const int z = z0 + u * NW;
      l[u] = z < n_splits ? lse[(dhsa_long)z * n_rows + r] : -DHSA_INF;
      x[u] = z < n_splits && col < D ? part[((dhsa_long)z * n_rows + r) * D + col] : 0.0f;
    }
    DHSA_UNROLL
    for (int u = 0; u < ZB; ++u) {
      const float w = l[u] > -DHSA_INF ? dhsa_exp2((l[u] - m) * DHSA_LOG2E) : 0.0f;
      num += w * x[u];
      den += w;
    }
  }
}
num_s[dhsa_warp * 32 + dhsa_lane] = num;
if (dhsa_lane == 0) {
  red_s[dhsa_warp] = den;
}
DHSA_BARRIER();
if (dhsa_warp == 0 && col < D) {
  float n_all = 0.0f, d_all = 0.0f;
  for (int w = 0; w < NW; ++w) {
    n_all += num_s[w * 32 + dhsa_lane];
    d_all += red_s[w];
  }
  out[(dhsa_long)r * D + col] = dhsa_from_float<T>(d_all > 0.0f ? n_all / d_all : 0.0f);
}
