// dhsa_sparse_attention: kernel body for mx.fast.metal_kernel / mx.fast.cuda_kernel (the
// signature is generated; ids_<backend>.h is prepended, prelude_<backend>.h + common.h are
// the header).
// inputs : queries [B, H, L, D] T | keys, values [B, H_kv, S, D] T; any strides with the last
//          dim contiguous, rows 16-byte aligned (cache slices pass without a copy)
//          with DHSA_QUANTIZED_KV (kernels.sources prepends the define): keys, values
//          [B, H_kv, S, D * BITS / 32] uint32 (mx.quantize's words), key_scales, key_biases,
//          value_scales, value_biases [B, H_kv, S, D / GROUP] T; each tile is loaded
//          into registers 16 bytes of words at a time, then dequantized into shared
//          memory as T (common.h, dhsa_qload / dhsa_qstore)
//          kv_index [B, NB, K] int32 (ascending key positions; unused when ALL_KEYS)
//          kv_count [B, NB] int32 (valid slots per block; unused when ALL_KEYS)
//          iparams int32: kernels.sources.SparseParams (iparams[SA_<FIELD>]): L, S,
//                  q_offset, window (0 = none), block_size, H, H_kv, NB, K, qt (queries per
//                  group), n_splits, B
//          fparams float32: kernels.sources.AttentionScalars (fparams[AF_<FIELD>]): scale,
//                  softcap (0 = none)
// outputs: out [B, H, L, D] T (when !SPLIT; else a 1-element placeholder)
//          part [n_splits, B, H, L, D] float32, lse [n_splits, B, H, L] float32 (when SPLIT:
//          each split's normalised output and log-sum-exp, -inf where it saw no key;
//          else 1-element placeholders)
// template: T, D (head dim, a multiple of 16, <= 256), BK (keys per tile), WARPS, WROWS
//          (rows per warp), ALL_KEYS (dense causal attention over keys [0, S) instead of a
//          plan), SPLIT (write per-split partial results), STAGES (K/V tiles in shared
//          memory: 2 loads the next tile while this one is multiplied); with
//          DHSA_QUANTIZED_KV also BITS (4 or 8) and GROUP (values per scale)
// launch : grid (n_qtiles * WARPS * 32, B * H_kv, n_splits), threadgroup (WARPS * 32, 1, 1).
//          A group owns qt consecutive queries of one plan block (ALL_KEYS: any qt queries)
//          and every query head of one KV head: row r = head (r / qt) of the GQA group, query
//          q0 + r % qt, so all heads share each K/V tile. Split z walks the z-th share of
//          the key tiles.
// math   : query at position p = q_offset + i sees key k iff k <= p, k > p - window (window
//          > 0) and, with a plan, k is a valid slot of its block. s = softcap(scale q.k);
//          online softmax in fp32 (exp2 domain); P rounded to T for the P V product on
//          16-bit inputs; a query with no key outputs 0 (lse -inf). Shared memory:
//          max(ROWS, 2 BK STAGES) x (D + 16 / sizeof(T)) x sizeof(T) bytes (sized at launch
//          on CUDA, where it may pass the 48 KB static limit) + STAGES BK ints.
constexpr int NT = WARPS * 32;
constexpr int ROWS = WARPS * WROWS;
constexpr int MT = WROWS / DHSA_MMA_M;
constexpr int KT = D / DHSA_MMA_K;
constexpr int NS = BK / DHSA_MMA_N;
constexpr int PK = BK / DHSA_MMA_K;
constexpr int SPK = DHSA_MMA_K / DHSA_MMA_N;
constexpr int DN = D / DHSA_MMA_N;
constexpr int VEC = int(16 / sizeof(T));
constexpr int DV = D / VEC;
constexpr int LDK = D + VEC;
constexpr int Q_BYTES = ROWS * LDK * int(sizeof(T));
constexpr int KV_BYTES = STAGES * 2 * BK * LDK * int(sizeof(T));
constexpr int Q_ITERS = (ROWS * DV + NT - 1) / NT;
constexpr int KV_ITERS = (BK * DV + NT - 1) / NT;
constexpr int SMEM_BYTES = Q_BYTES > KV_BYTES ? Q_BYTES : KV_BYTES;
constexpr int RPL = DHSA_ACC_N / DHSA_ACC_ROWS;

DHSA_SHARED_SIZED(float4, dhsa_smem, (SMEM_BYTES + 15) / 16);
DHSA_SHARED(int, kpos_s, STAGES * BK);

const int n_q = iparams[SA_N_Q];
const int n_k = iparams[SA_N_K];
const int q_offset = iparams[SA_Q_OFFSET];
const int window = iparams[SA_WINDOW];
const int block_size = iparams[SA_BLOCK_SIZE];
const int n_heads = iparams[SA_N_HEADS];
const int n_kv = iparams[SA_N_KV];
const int n_blocks = iparams[SA_N_BLOCKS];
const int n_slots_max = iparams[SA_N_SLOTS_MAX];
const int qt = iparams[SA_QT];
const int n_splits = iparams[SA_N_SPLITS];
const int n_batch = iparams[SA_N_BATCH];
const float scale = fparams[AF_SCALE];
const float cap = fparams[AF_CAP];
// logit (log2 units) = c_out * tanh(c_in * q.k) with a cap, else c_in * q.k.
const float c_in = cap > 0.0f ? scale / cap : scale * DHSA_LOG2E;
const float c_out = cap * DHSA_LOG2E;
const dhsa_long q_st0 = queries_strides[0], q_st1 = queries_strides[1], q_st2 = queries_strides[2];
const dhsa_long k_st0 = keys_strides[0], k_st1 = keys_strides[1], k_st2 = keys_strides[2];
const dhsa_long v_st0 = values_strides[0], v_st1 = values_strides[1], v_st2 = values_strides[2];

const int bh = dhsa_gy;
const int b = bh / n_kv;
const int hk = bh % n_kv;
const int reps = n_heads / n_kv;
const int q0 = dhsa_gx * qt;
const int q_end = dhsa_min(q0 + qt, n_q);
const int pos_lo = q_offset + q0;
const int pos_hi = q_offset + q_end - 1;
const int split = dhsa_gz;

// Rows held by this lane: position and validity per (m-tile, row slot).
int row_pos[MT][DHSA_ACC_ROWS];
bool row_ok[MT][DHSA_ACC_ROWS];
DHSA_UNROLL
for (int mt = 0; mt < MT; ++mt) {
  DHSA_UNROLL
  for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
    const int row = dhsa_warp * WROWS + mt * DHSA_MMA_M + dhsa_acc_row(dhsa_lane, r * RPL);
    row_pos[mt][r] = q_offset + q0 + row % qt;
    row_ok[mt][r] = row / qt < reps && q0 + row % qt < n_q;
  }
}

// Stage the group's queries through shared memory into A fragments.
DHSA_SMEM T* qs = reinterpret_cast<DHSA_SMEM T*>(dhsa_smem);
DHSA_UNROLL
for (int it = 0; it < Q_ITERS; ++it) {
  const int c = dhsa_tid + it * NT;
  if (c < ROWS * DV) {
    const int row = c / DV, col = (c % DV) * VEC;
    const int hr = row / qt, qi = q0 + row % qt;
    const bool ok = hr < reps && qi < n_q;
    const dhsa_long off = ok ? b * q_st0 + (hk * reps + hr) * q_st1 + qi * q_st2 : 0;
    dhsa_cp16(qs + row * LDK + col, queries + off + col, ok);
  }
}
dhsa_cp_commit();
dhsa_cp_wait<0>();
DHSA_BARRIER();
dhsa_afrag<T> qf[MT][KT];
DHSA_UNROLL
for (int mt = 0; mt < MT; ++mt) {
  DHSA_UNROLL
  for (int kt = 0; kt < KT; ++kt) {
    dhsa_load_a(qf[mt][kt], qs + (dhsa_warp * WROWS + mt * DHSA_MMA_M) * LDK + kt * DHSA_MMA_K,
                LDK, dhsa_lane);
  }
}

// The key slots this group walks: a plan block's valid slots, or the causal key range.
int n_slots;
int key_lo = 0;
dhsa_long idx_base = 0;
if (ALL_KEYS) {
  key_lo = window > 0 ? dhsa_imax(pos_lo - window + 1, 0) : 0;
  n_slots = dhsa_imax(dhsa_min(n_k, pos_hi + 1) - key_lo, 0);
} else {
  const int blk = q0 / block_size;
  idx_base = ((dhsa_long)b * n_blocks + blk) * n_slots_max;
  n_slots = kv_count[b * n_blocks + blk];
}
const int n_tiles = (n_slots + BK - 1) / BK;
const int per_split = (n_tiles + n_splits - 1) / n_splits;
const int t_begin = split * per_split;
const int t_end = dhsa_min(t_begin + per_split, n_tiles);
#define DHSA_SLOT(j) (ALL_KEYS ? key_lo + (j) : int(kv_index[idx_base + (j)]))
// Slots ascend, so the tiles wholly past the last query are a suffix and those wholly left of
// the window a prefix: the group walks the tiles [t_lo, t_hi) between.
int t_lo = t_begin;
int t_hi = t_end;
while (t_hi > t_lo && DHSA_SLOT((t_hi - 1) * BK) > pos_hi) {
  --t_hi;
}
while (window > 0 && t_lo < t_hi &&
       DHSA_SLOT(dhsa_min((t_lo + 1) * BK, n_slots) - 1) <= pos_lo - window) {
  ++t_lo;
}

DHSA_SMEM T* kv_s = qs;  // stage st: K tile at kv_s + 2 st BK LDK, its V tile after it
const dhsa_long k_base = b * k_st0 + hk * k_st1;
const dhsa_long v_base = b * v_st0 + hk * v_st1;
// Tile t_'s key positions into stage st_ (-1 past its jn_ slots).
#define DHSA_KPOS(t_, st_, jn_)                                                           \
  if (dhsa_tid < BK) {                                                                    \
    kpos_s[(st_) * BK + dhsa_tid] = dhsa_tid < (jn_) ? DHSA_SLOT((t_) * BK + dhsa_tid) : -1; \
  }
#ifdef DHSA_QUANTIZED_KV
// Quantized K/V: a thread loads its units of a K or V tile (common.h, dhsa_qunit: 16 bytes of
// words and their scale and bias) into registers, all of them before it uses any, then
// dequantizes them into shared memory. Unit c of a tile (c = dhsa_tid + it NT) is row c / QPR,
// values from (c % QPR) QV. With two stages the next tile's K units are loaded before this
// tile's S and stored after it, its V units loaded before this tile's P V and stored after it,
// into the other stage (free once every thread is past this tile's first barrier).
constexpr bool ASYNC = false;  // tiles are stored by the threads, not by cp.async
constexpr int QV = 128 / BITS;  // values per unit
constexpr int QPR = D / QV;     // units per row
constexpr int Q_UNITS = (BK * QPR + NT - 1) / NT;  // a thread's units per K (or V) tile
const dhsa_qrows<decltype(keys), decltype(key_scales)> k_rows = {
    keys + k_base,
    key_scales + b * key_scales_strides[0] + hk * key_scales_strides[1],
    key_biases + b * key_biases_strides[0] + hk * key_biases_strides[1],
    k_st2, key_scales_strides[2], key_biases_strides[2]};
const dhsa_qrows<decltype(values), decltype(value_scales)> v_rows = {
    values + v_base,
    value_scales + b * value_scales_strides[0] + hk * value_scales_strides[1],
    value_biases + b * value_biases_strides[0] + hk * value_biases_strides[1],
    v_st2, value_scales_strides[2], value_biases_strides[2]};
// Tile t_'s units of rows_ (k_rows or v_rows) into registers u_ (zeros past the slots).
#define DHSA_QLOAD(t_, u_, rows_)                                                         \
  {                                                                                       \
    const int jn_ = dhsa_min(BK, n_slots - (t_) * BK);                                    \
    DHSA_UNROLL                                                                           \
    for (int it = 0; it < Q_UNITS; ++it) {                                                \
      const int c = dhsa_tid + it * NT;                                                   \
      const int j = c / QPR;                                                              \
      const bool ok = j < jn_;                                                            \
      const int kp = ok ? DHSA_SLOT((t_) * BK + j) : 0;                                   \
      dhsa_qload<BITS, GROUP>(u_[it], rows_, kp, (c % QPR) * QV, ok);                     \
    }                                                                                     \
  }
// Units u_ dequantized into the K or V tile at dst_ (shared memory).
#define DHSA_QSTORE(dst_, u_)                                                             \
  {                                                                                       \
    DHSA_UNROLL                                                                           \
    for (int it = 0; it < Q_UNITS; ++it) {                                                \
      const int c = dhsa_tid + it * NT;                                                   \
      if (c < BK * QPR) {                                                                 \
        dhsa_qstore<BITS>((dst_) + (c / QPR) * LDK + (c % QPR) * QV, u_[it]);             \
      }                                                                                   \
    }                                                                                     \
  }
// Tile t_ into stage st_, now.
#define DHSA_ISSUE(t_, st_)                                                               \
  {                                                                                       \
    dhsa_qunit<T> kq_[Q_UNITS], vq_[Q_UNITS];                                             \
    DHSA_QLOAD(t_, kq_, k_rows);                                                          \
    DHSA_QLOAD(t_, vq_, v_rows);                                                          \
    DHSA_KPOS(t_, st_, dhsa_min(BK, n_slots - (t_) * BK));                                \
    DHSA_QSTORE(kv_s + (st_) * 2 * BK * LDK, kq_);                                        \
    DHSA_QSTORE(kv_s + (st_) * 2 * BK * LDK + BK * LDK, vq_);                             \
  }
#else
constexpr bool ASYNC = true;  // tiles land by cp.async (dhsa_cp16) in commit groups
// Tile t_ into stage st_: key positions, then K and V as two copy groups (S = Q K^T starts
// once K has landed).
#define DHSA_ISSUE(t_, st_)                                                               \
  {                                                                                       \
    const int j0_ = (t_) * BK;                                                            \
    const int jn_ = dhsa_min(BK, n_slots - j0_);                                          \
    DHSA_SMEM T* ks_ = kv_s + (st_) * 2 * BK * LDK;                                       \
    DHSA_SMEM T* vs_ = ks_ + BK * LDK;                                                    \
    DHSA_KPOS(t_, st_, jn_);                                                              \
    DHSA_UNROLL                                                                           \
    for (int it = 0; it < KV_ITERS; ++it) {                                               \
      const int c = dhsa_tid + it * NT;                                                   \
      if (c < BK * DV) {                                                                  \
        const int j = c / DV, col = (c % DV) * VEC;                                       \
        const int kp = j < jn_ ? DHSA_SLOT(j0_ + j) : 0;                                  \
        dhsa_cp16(ks_ + j * LDK + col, keys + k_base + kp * k_st2 + col, j < jn_);        \
      }                                                                                   \
    }                                                                                     \
    dhsa_cp_commit();                                                                     \
    DHSA_UNROLL                                                                           \
    for (int it = 0; it < KV_ITERS; ++it) {                                               \
      const int c = dhsa_tid + it * NT;                                                   \
      if (c < BK * DV) {                                                                  \
        const int j = c / DV, col = (c % DV) * VEC;                                       \
        const int kp = j < jn_ ? DHSA_SLOT(j0_ + j) : 0;                                  \
        dhsa_cp16(vs_ + j * LDK + col, values + v_base + kp * v_st2 + col, j < jn_);      \
      }                                                                                   \
    }                                                                                     \
    dhsa_cp_commit();                                                                     \
  }
#endif

dhsa_acc o[MT][DN];
float m_run[MT][DHSA_ACC_ROWS];
float l_run[MT][DHSA_ACC_ROWS];
DHSA_UNROLL
for (int mt = 0; mt < MT; ++mt) {
  DHSA_UNROLL
  for (int dn = 0; dn < DN; ++dn) {
    DHSA_UNROLL
    for (int i = 0; i < DHSA_ACC_N; ++i) {
      o[mt][dn].x[i] = 0.0f;
    }
  }
  DHSA_UNROLL
  for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
    m_run[mt][r] = -DHSA_INF;
    l_run[mt][r] = 0.0f;
  }
}

for (int t = t_lo; t < t_hi; ++t) {
  const int j0 = t * BK;
  const int jn = dhsa_min(BK, n_slots - j0);
  const int kp_first = DHSA_SLOT(j0);
  const int kp_last = DHSA_SLOT(j0 + jn - 1);
  // Every row sees every key of a full tile: no per-element mask.
  const bool full = jn == BK && kp_last <= pos_lo && (window <= 0 || kp_first > pos_hi - window);
  const int st = STAGES > 1 ? (t - t_lo) % STAGES : 0;
  const bool ahead = STAGES > 1 && t + 1 < t_hi;  // load tile t + 1 during this one
  if (STAGES == 1 || t == t_lo) {
    DHSA_BARRIER();  // shared memory free: the queries staged, the last tile done
    DHSA_ISSUE(t, st);
  }
#ifdef DHSA_QUANTIZED_KV
  DHSA_SMEM T* ks_next = kv_s + (st + 1) % STAGES * 2 * BK * LDK;
  dhsa_qunit<T> next[Q_UNITS];  // tile t + 1's K units, then its V units
  if (ahead) {
    DHSA_QLOAD(t + 1, next, k_rows);
  }
#else
  if (ahead) {
    DHSA_BARRIER();  // tile t - 1 done with the other stage
    DHSA_ISSUE(t + 1, (st + 1) % STAGES);
  }
#endif
  if (ASYNC && ahead) {
    dhsa_cp_wait<3>();  // this tile's K (its V and the next tile may still be in flight)
  } else if (ASYNC) {
    dhsa_cp_wait<1>();
  }
  DHSA_BARRIER();
  DHSA_SMEM T* ks = kv_s + st * 2 * BK * LDK;
  DHSA_SMEM T* vs = ks + BK * LDK;
  DHSA_SMEM int* kpos = kpos_s + st * BK;

  // S = Q K^T for this warp's rows.
  dhsa_acc s[MT][NS];
  DHSA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    DHSA_UNROLL
    for (int ns = 0; ns < NS; ++ns) {
      DHSA_UNROLL
      for (int i = 0; i < DHSA_ACC_N; ++i) {
        s[mt][ns].x[i] = 0.0f;
      }
    }
  }
  DHSA_UNROLL
  for (int kt = 0; kt < KT; ++kt) {
    DHSA_UNROLL
    for (int ns = 0; ns < NS; ++ns) {
      dhsa_bfrag<T> kb;
      dhsa_load_bt(kb, ks + ns * DHSA_MMA_N * LDK + kt * DHSA_MMA_K, LDK, dhsa_lane);
      DHSA_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        dhsa_mma(s[mt][ns], qf[mt][kt], kb);
      }
    }
  }

#ifdef DHSA_QUANTIZED_KV
  if (ahead) {
    DHSA_QSTORE(ks_next, next);
    DHSA_QLOAD(t + 1, next, v_rows);
  }
#endif

  // Mask, soft cap and online softmax (log2 domain).
  float m_use[MT][DHSA_ACC_ROWS];
  float alpha[MT][DHSA_ACC_ROWS];
  bool same_max = true;
  DHSA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    float row_max[DHSA_ACC_ROWS];
    DHSA_UNROLL
    for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
      row_max[r] = -DHSA_INF;
    }
    DHSA_UNROLL
    for (int ns = 0; ns < NS; ++ns) {
      DHSA_UNROLL
      for (int i = 0; i < DHSA_ACC_N; ++i) {
        const int r = dhsa_acc_rslot(i);
        float x = s[mt][ns].x[i] * c_in;
        x = cap > 0.0f ? c_out * dhsa_tanh_t<T>(x) : x;
        if (!full) {
          const int kp = kpos[ns * DHSA_MMA_N + dhsa_acc_col(dhsa_lane, i)];
          const int p = row_pos[mt][r];
          const bool ok = row_ok[mt][r] && kp >= 0 && kp <= p && (window <= 0 || kp > p - window);
          x = ok ? x : -DHSA_INF;
        }
        s[mt][ns].x[i] = x;
        row_max[r] = dhsa_max(row_max[r], x);
      }
    }
    DHSA_UNROLL
    for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
      const float m_new = dhsa_max(m_run[mt][r], dhsa_row_max(row_max[r]));
      m_use[mt][r] = m_new == -DHSA_INF ? 0.0f : m_new;
      alpha[mt][r] = dhsa_exp2(m_run[mt][r] - m_use[mt][r]);
      // Rescaling O can be skipped while the max stays (or O is still zero).
      same_max = same_max && (m_new == m_run[mt][r] || m_run[mt][r] == -DHSA_INF);
      m_run[mt][r] = m_new;
    }
    float row_sum[DHSA_ACC_ROWS];
    DHSA_UNROLL
    for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
      row_sum[r] = 0.0f;
    }
    DHSA_UNROLL
    for (int ns = 0; ns < NS; ++ns) {
      DHSA_UNROLL
      for (int i = 0; i < DHSA_ACC_N; ++i) {
        const int r = dhsa_acc_rslot(i);
        s[mt][ns].x[i] = dhsa_exp2(s[mt][ns].x[i] - m_use[mt][r]);
        row_sum[r] += s[mt][ns].x[i];
      }
    }
    DHSA_UNROLL
    for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
      l_run[mt][r] = l_run[mt][r] * alpha[mt][r] + row_sum[r];
    }
  }
  if (!dhsa_warp_all(same_max)) {
    DHSA_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      DHSA_UNROLL
      for (int dn = 0; dn < DN; ++dn) {
        DHSA_UNROLL
        for (int i = 0; i < DHSA_ACC_N; ++i) {
          o[mt][dn].x[i] *= alpha[mt][dhsa_acc_rslot(i)];
        }
      }
    }
  }

  // O += P V, once V has landed (stored tiles: with K).
  if (ASYNC) {
    if (ahead) {
      dhsa_cp_wait<2>();
    } else {
      dhsa_cp_wait<0>();
    }
    DHSA_BARRIER();
  }
  DHSA_UNROLL
  for (int pk = 0; pk < PK; ++pk) {
    dhsa_afrag<T> pa[MT];
    DHSA_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      dhsa_p_to_a(pa[mt], &s[mt][pk * SPK]);
    }
    DHSA_UNROLL
    for (int dn = 0; dn < DN; ++dn) {
      dhsa_bfrag<T> vb;
      dhsa_load_b(vb, vs + pk * DHSA_MMA_K * LDK + dn * DHSA_MMA_N, LDK, dhsa_lane);
      DHSA_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        dhsa_mma(o[mt][dn], pa[mt], vb);
      }
    }
  }
#ifdef DHSA_QUANTIZED_KV
  if (ahead) {
    DHSA_KPOS(t + 1, (st + 1) % STAGES, dhsa_min(BK, n_slots - (t + 1) * BK));
    DHSA_QSTORE(ks_next + BK * LDK, next);
  }
#endif
}

#undef DHSA_ISSUE
#undef DHSA_KPOS
#ifdef DHSA_QUANTIZED_KV
#undef DHSA_QLOAD
#undef DHSA_QSTORE
#endif
#undef DHSA_SLOT

// Normalise and write this lane's rows.
DHSA_UNROLL
for (int mt = 0; mt < MT; ++mt) {
  float l_tot[DHSA_ACC_ROWS];
  DHSA_UNROLL
  for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
    l_tot[r] = dhsa_row_sum(l_run[mt][r]);
  }
  DHSA_UNROLL
  for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
    const int row = dhsa_warp * WROWS + mt * DHSA_MMA_M + dhsa_acc_row(dhsa_lane, r * RPL);
    const dhsa_long q_row =
        (dhsa_long)(b * n_heads + hk * reps + row / qt) * n_q + q0 + row % qt;
    if (SPLIT && row_ok[mt][r] && dhsa_acc_col(dhsa_lane, r * RPL) == 0) {
      const float lse_v = l_tot[r] > 0.0f ? (m_run[mt][r] + dhsa_log2(l_tot[r])) * DHSA_LN2
                                          : -DHSA_INF;
      lse[(dhsa_long)split * n_batch * n_heads * n_q + q_row] = lse_v;
    }
  }
  DHSA_UNROLL
  for (int dn = 0; dn < DN; ++dn) {
    DHSA_UNROLL
    for (int i = 0; i < DHSA_ACC_N; ++i) {
      const int r = dhsa_acc_rslot(i);
      if (row_ok[mt][r]) {
        const int row = dhsa_warp * WROWS + mt * DHSA_MMA_M + dhsa_acc_row(dhsa_lane, i);
        const dhsa_long q_row =
            (dhsa_long)(b * n_heads + hk * reps + row / qt) * n_q + q0 + row % qt;
        const dhsa_long off = q_row * D + dn * DHSA_MMA_N + dhsa_acc_col(dhsa_lane, i);
        const float val = l_tot[r] > 0.0f ? o[mt][dn].x[i] / l_tot[r] : 0.0f;
        if (SPLIT) {
          part[(dhsa_long)split * n_batch * n_heads * n_q * D + off] = val;
        } else {
          out[off] = dhsa_from_float<T>(val);
        }
      }
    }
  }
}
