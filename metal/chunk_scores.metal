// dhsa_chunk_scores: kernel body for mx.fast.metal_kernel / mx.fast.cuda_kernel (signature
// generated; ids_<backend>.h prepended; prelude_<backend>.h + common.h as header).
// inputs : keys [B, H_kv, S, D] T | starts, lengths [B, N_c] int32 (chunks, one segment each)
//          block_q [B, NB, D] float32 (block representatives q_b)
//          iparams int32 [4]: S, H_kv, N_c, NB
// outputs: summaries [B, N_c, D] float32: k_c = (sum over the chunk's keys of the head-mean
//          key) / sqrt(max(n_c, 1)); zero for empty chunks
//          scores [B, NB, N_c] float32: S_bc = q_b . k_c
// template: T, D
// launch : grid (NT, N_c, B), threadgroup (NT, 1, 1) with NT = 256: one group per chunk;
//          thread d sums column d (and d + NT, ...) in fp32, then each warp takes blocks
//          w, w + NT / 32, ... and reduces q_b . k_c across its lanes.
constexpr int NT = 256;
DHSA_SHARED(float, summary_s, D);

const int n_k = iparams[0];
const int n_kv = iparams[1];
const int n_chunks = iparams[2];
const int n_blocks = iparams[3];
const int c = dhsa_gy;
const int b = dhsa_gz;
const int start = starts[b * n_chunks + c];
const int len = lengths[b * n_chunks + c];
const float norm = dhsa_rsqrt(float(len > 0 ? len : 1)) / float(n_kv);

for (int d = dhsa_tid; d < D; d += NT) {
  float acc = 0.0f;
  for (int h = 0; h < n_kv; ++h) {
    const dhsa_long base = ((dhsa_long)(b * n_kv + h) * n_k + start) * D + d;
    for (int i = 0; i < len; ++i) {
      acc += dhsa_to_float(keys[base + (dhsa_long)i * D]);
    }
  }
  acc *= norm;
  summary_s[d] = acc;
  summaries[((dhsa_long)b * n_chunks + c) * D + d] = acc;
}
DHSA_BARRIER();

for (int blk = dhsa_warp; blk < n_blocks; blk += NT / 32) {
  const dhsa_long qrow = ((dhsa_long)b * n_blocks + blk) * D;
  float dot = 0.0f;
  for (int d = dhsa_lane; d < D; d += 32) {
    dot += block_q[qrow + d] * summary_s[d];
  }
  dot = dhsa_warp_sum(dot);
  if (dhsa_lane == 0) {
    scores[((dhsa_long)b * n_blocks + blk) * n_chunks + c] = dot;
  }
}
