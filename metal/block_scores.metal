// dhsa_block_scores: kernel body for mx.fast.metal_kernel / mx.fast.cuda_kernel (signature
// generated; ids_<backend>.h prepended; prelude_<backend>.h + common.h as header).
// The first half of a DHSA plan over a chunk table (cache.ChunkTable); select_keys.metal is
// the second.
// inputs : queries [B, H, L, D] T, keys [B, H_kv, S - keys_start, D] T: any strides, last dim
//          contiguous
//          summaries [B, cap, D] float16 (cache.SUMMARY_DTYPE; read through dhsa_to_float,
//                  any float type works) (closed chunks in slots [0, n_closed))
//          spreads [B, cap, D] float16 (as summaries): the closed chunks' key variances
//                  (DHSAConfig.key_spread; read only when fparams[0] != 0)
//          open_prev [B, D] float32: sum_h sum_i k_i over keys [open_start, prev_end) from
//                  an earlier call (read only when prev_end > open_start)
//          iparams int32: kernels.sources.BlockScoreParams (read as iparams[BS_<FIELD>]):
//                  L, H, H_kv, block_size, n_closed, open_start, S, cap, chunks per group,
//                  1 for sqrt(n) summaries (paper) / 0 for plain means, prev_end,
//                  n_open (open slots), open_piece (keys per open piece, 0: one open chunk),
//                  keys_start: key position p is row p - keys_start of `keys` (0, or at
//                  most open_start: a quantized cache's table holds model-dtype keys from
//                  its first unchunked one on); only keys from open_start on are read
//          fparams float32: [spread factor w = key_spread * scale / 2; 0: no spread term]
// outputs: scores [B, NB, n_closed + n_open] float32: S_bc = q_b . k_c with q_b the mean of
//          block b's queries over queries and heads, k_c the closed summaries (plus
//          w * q_b^2 . v_c, v_c their spreads, when w != 0) and, in the
//          slots from n_closed on, the open part [open_start, S) summarised here as
//          sum_i mean_h k_i / sqrt(n) (or / n); 0 when empty. One open chunk (open_piece 0):
//          only keys [prev_end, S) are read, the rest of the sum comes from open_prev. Open
//          pieces (DHSAConfig.open_pieces): slot n_closed + p is the piece
//          [open_start + p * open_piece, + open_piece) cut at S, summed whole by one warp.
//          open_sum [B, D] float32: sum_h sum_i k_i over [open_start, S), for the next call
//          (one open chunk only; not written with open pieces)
// template: T, D (a multiple of 32, <= 256), NT (threads per group, a multiple of 32)
// launch : grid (n_tiles * NT, NB, B), threadgroup (NT, 1, 1). Every group forms
//          its block's q_b (warps take rows, lanes take columns, shared-memory reduction),
//          then each warp dots q_b with chunks of the group's tile, lanes splitting D.
constexpr int NW = NT / 32;
constexpr int DL = D / 32;
constexpr int UR = 4;
DHSA_SHARED(float, part_s, NW * D);
DHSA_SHARED(float, qb_s, D);
DHSA_SHARED(float, open_s, D);

const int n_q = iparams[BS_N_Q];
const int n_heads = iparams[BS_N_HEADS];
const int n_kv = iparams[BS_N_KV];
const int block_size = iparams[BS_BLOCK_SIZE];
const int n_closed = iparams[BS_N_CLOSED];
const int open_start = iparams[BS_OPEN_START];
const int n_k = iparams[BS_N_K];
const int cap = iparams[BS_CAP];
const int per_group = iparams[BS_PER_GROUP];
const bool sqrt_norm = iparams[BS_SQRT_NORM] != 0;
const int prev_end = iparams[BS_PREV_END];
const int n_open = iparams[BS_N_OPEN];
const int open_piece = iparams[BS_OPEN_PIECE];
const int keys_start = iparams[BS_KEYS_START];
const int n_chunks = n_closed + n_open;
const int n_blocks = (n_q + block_size - 1) / block_size;
const int blk = dhsa_gy;
const int b = dhsa_gz;
const int c_lo = dhsa_gx * per_group;
const int c_hi = dhsa_min(c_lo + per_group, n_chunks);
const dhsa_long q_st0 = queries_strides[0], q_st1 = queries_strides[1], q_st2 = queries_strides[2];
const dhsa_long k_st0 = keys_strides[0], k_st1 = keys_strides[1], k_st2 = keys_strides[2];

// q_b: rows (head, query) of the block, summed per warp, then across warps.
const int q0 = blk * block_size;
const int nq = dhsa_min(block_size, n_q - q0);
float acc[DL];
DHSA_UNROLL
for (int j = 0; j < DL; ++j) {
  acc[j] = 0.0f;
}
// UR rows per warp and step, loaded before they are added: UR x DL loads in flight.
for (int r0 = dhsa_warp; r0 < n_heads * nq; r0 += UR * NW) {
  float x[UR][DL];
  DHSA_UNROLL
  for (int u = 0; u < UR; ++u) {
    const int r = r0 + u * NW;
    const bool ok = r < n_heads * nq;
    const dhsa_long row = ok ? b * q_st0 + (r / nq) * q_st1 + (q0 + r % nq) * q_st2 : 0;
    DHSA_UNROLL
    for (int j = 0; j < DL; ++j) {
      x[u][j] = ok ? dhsa_to_float(queries[row + dhsa_lane + 32 * j]) : 0.0f;
    }
  }
  DHSA_UNROLL
  for (int u = 0; u < UR; ++u) {
    DHSA_UNROLL
    for (int j = 0; j < DL; ++j) {
      acc[j] += x[u][j];
    }
  }
}
DHSA_UNROLL
for (int j = 0; j < DL; ++j) {
  part_s[dhsa_warp * D + dhsa_lane + 32 * j] = acc[j];
}
DHSA_BARRIER();
for (int d = dhsa_tid; d < D; d += NT) {
  float s = 0.0f;
  for (int w = 0; w < NW; ++w) {
    s += part_s[w * D + d];
  }
  qb_s[d] = s / float(n_heads * nq);
}

// One open chunk's summary, in the group whose tile holds its slot.
const bool has_open = open_piece == 0 && c_lo <= n_closed && n_closed < c_hi;
if (has_open) {
  DHSA_BARRIER();
  const int n_new = n_k - prev_end;  // keys not yet in open_prev
  DHSA_UNROLL
  for (int j = 0; j < DL; ++j) {
    acc[j] = 0.0f;
  }
  for (int r0 = dhsa_warp; r0 < n_kv * n_new; r0 += UR * NW) {
    float x[UR][DL];
    DHSA_UNROLL
    for (int u = 0; u < UR; ++u) {
      const int r = r0 + u * NW;
      const bool ok = r < n_kv * n_new;
      const dhsa_long row =
          ok ? b * k_st0 + (r / n_new) * k_st1 + (prev_end - keys_start + r % n_new) * k_st2
             : 0;
      DHSA_UNROLL
      for (int j = 0; j < DL; ++j) {
        x[u][j] = ok ? dhsa_to_float(keys[row + dhsa_lane + 32 * j]) : 0.0f;
      }
    }
    DHSA_UNROLL
    for (int u = 0; u < UR; ++u) {
      DHSA_UNROLL
      for (int j = 0; j < DL; ++j) {
        acc[j] += x[u][j];
      }
    }
  }
  DHSA_UNROLL
  for (int j = 0; j < DL; ++j) {
    part_s[dhsa_warp * D + dhsa_lane + 32 * j] = acc[j];
  }
  DHSA_BARRIER();
  const float n = float(dhsa_imax(n_k - open_start, 1));
  const float norm = (sqrt_norm ? dhsa_rsqrt(n) : 1.0f / n) / float(n_kv);
  for (int d = dhsa_tid; d < D; d += NT) {
    float s = prev_end > open_start ? open_prev[(dhsa_long)b * D + d] : 0.0f;
    for (int w = 0; w < NW; ++w) {
      s += part_s[w * D + d];
    }
    if (blk == 0) {
      open_sum[(dhsa_long)b * D + d] = s;
    }
    open_s[d] = s * norm;
  }
}
DHSA_BARRIER();

const float spread_w = fparams[0];
float qv[DL];
DHSA_UNROLL
for (int j = 0; j < DL; ++j) {
  qv[j] = qb_s[dhsa_lane + 32 * j];
}
for (int c = c_lo + dhsa_warp; c < c_hi; c += NW) {
  float dot = 0.0f;
  if (c < n_closed) {
    const dhsa_long row = ((dhsa_long)b * cap + c) * D;
    DHSA_UNROLL
    for (int j = 0; j < DL; ++j) {
      dot += qv[j] * dhsa_to_float(summaries[row + dhsa_lane + 32 * j]);
    }
    if (spread_w != 0.0f) {
      float spread = 0.0f;
      DHSA_UNROLL
      for (int j = 0; j < DL; ++j) {
        spread += qv[j] * qv[j] * dhsa_to_float(spreads[row + dhsa_lane + 32 * j]);
      }
      dot += spread_w * spread;
    }
  } else if (open_piece == 0) {
    DHSA_UNROLL
    for (int j = 0; j < DL; ++j) {
      dot += qv[j] * open_s[dhsa_lane + 32 * j];
    }
  } else {
    // Open piece c - n_closed: this warp sums its rows (head, key), UR loads in flight.
    const int st = open_start + (c - n_closed) * open_piece;
    const int np = dhsa_imax(dhsa_min(open_piece, n_k - st), 0);
    const int st_row = st - keys_start;
    float ps[DL];
    DHSA_UNROLL
    for (int j = 0; j < DL; ++j) {
      ps[j] = 0.0f;
    }
    for (int r0 = 0; r0 < n_kv * np; r0 += UR) {
      float x[UR][DL];
      DHSA_UNROLL
      for (int u = 0; u < UR; ++u) {
        const int r = r0 + u;
        const bool ok = r < n_kv * np;
        const dhsa_long row = ok ? b * k_st0 + (r / np) * k_st1 + (st_row + r % np) * k_st2 : 0;
        DHSA_UNROLL
        for (int j = 0; j < DL; ++j) {
          x[u][j] = ok ? dhsa_to_float(keys[row + dhsa_lane + 32 * j]) : 0.0f;
        }
      }
      DHSA_UNROLL
      for (int u = 0; u < UR; ++u) {
        DHSA_UNROLL
        for (int j = 0; j < DL; ++j) {
          ps[j] += x[u][j];
        }
      }
    }
    const float n = float(dhsa_imax(np, 1));
    const float norm = (sqrt_norm ? dhsa_rsqrt(n) : 1.0f / n) / float(n_kv);
    DHSA_UNROLL
    for (int j = 0; j < DL; ++j) {
      dot += qv[j] * (ps[j] * norm);
    }
  }
  dot = dhsa_warp_sum(dot);
  if (dhsa_lane == 0) {
    scores[((dhsa_long)b * n_blocks + blk) * n_chunks + c] = dot;
  }
}
