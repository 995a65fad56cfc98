// dhsa_refine_scores: kernel body for mx.fast.metal_kernel / mx.fast.cuda_kernel (the
// signature is generated; ids_<backend>.h is prepended, prelude_<backend>.h + common.h are
// the header). The scores of prefill refinement (mlx_dhsa.refine; reference:
// mlx_dhsa.reference.refine_scores): how much attention a block's scoring queries give each
// candidate key of its widened plan.
// inputs : queries [B, H, L, D] T | keys [B, H_kv, S, D] T; any strides with the last dim
//          contiguous, rows 16-byte aligned (cache slices pass without a copy)
//          kv_index [B, NB, K] int32 (the widened plan: ascending key positions)
//          kv_count [B, NB] int32 (valid slots per block)
//          iparams int32: kernels.sources.RefineParams (iparams[RS_<FIELD>]): L, q_offset,
//                  window (0 = none), block_size, stride, H, H_kv, NB, K, qt (scoring
//                  queries per query tile), n_qtiles (query tiles per block)
//          fparams float32: kernels.sources.AttentionScalars: scale, softcap (0 = none)
// outputs: scores [B, H_kv, NB, K] float32: per slot, the probability each scoring query of
//          the KV head's query heads gives the slot's key among the block's slots it sees,
//          summed over those queries and heads (0 for padding slots and keys no query
//          sees); the caller sums over H_kv
// template: T, D (head dim, a multiple of 16, <= 256), BK (keys per tile), WARPS, WROWS
//          (rows per warp)
// launch : grid (NB * WARPS * 32, B * H_kv, 1), threadgroup (WARPS * 32, 1, 1), WARPS * 32
//          >= BK. Group (block blk, KV head) walks its query tiles in turn: tile qtile holds
//          the scoring queries j = qtile qt .. + qt - 1 of the block (query n_blk - 1 - j
//          stride of its n_blk, counted back from its last, so a short last block has one)
//          for every query head of that KV head: row r = head (r / qt) of the GQA group,
//          scoring query qtile qt + r % qt. Thread j % BK owns output slot j across the
//          tiles (it writes it first, then adds to it): no other thread touches it.
// math   : query at position p sees slot key k iff the slot is valid, k <= p and k > p -
//          window (window > 0). s = softcap(scale q.k) in fp32 (log2 domain). Pass 1: each
//          row's log-sum-exp over the slots it sees (online, as sparse_attention.metal);
//          pass 2: exp(s - lse) per row and slot, summed over the tile's rows through a
//          ROWS x BK tile of shared memory. Shared memory: max(ROWS, BK) x (D + 16 /
//          sizeof(T)) x sizeof(T) bytes (sized at launch on CUDA) + ROWS BK floats + BK ints.
constexpr int NT = WARPS * 32;
constexpr int ROWS = WARPS * WROWS;
constexpr int MT = WROWS / DHSA_MMA_M;
constexpr int KT = D / DHSA_MMA_K;
constexpr int NS = BK / DHSA_MMA_N;
constexpr int VEC = int(16 / sizeof(T));
constexpr int DV = D / VEC;
constexpr int LDK = D + VEC;
constexpr int Q_BYTES = ROWS * LDK * int(sizeof(T));
constexpr int K_BYTES = BK * LDK * int(sizeof(T));
constexpr int Q_ITERS = (ROWS * DV + NT - 1) / NT;
constexpr int K_ITERS = (BK * DV + NT - 1) / NT;
constexpr int SMEM_BYTES = Q_BYTES > K_BYTES ? Q_BYTES : K_BYTES;
constexpr int RPL = DHSA_ACC_N / DHSA_ACC_ROWS;

DHSA_SHARED_SIZED(float4, dhsa_smem, (SMEM_BYTES + 15) / 16);
DHSA_SHARED(int, kpos, BK);
DHSA_SHARED(float, ps, ROWS * BK);

const int n_q = iparams[RS_N_Q];
const int q_offset = iparams[RS_Q_OFFSET];
const int window = iparams[RS_WINDOW];
const int block_size = iparams[RS_BLOCK_SIZE];
const int stride = iparams[RS_STRIDE];
const int n_heads = iparams[RS_N_HEADS];
const int n_kv = iparams[RS_N_KV];
const int n_blocks = iparams[RS_N_BLOCKS];
const int n_slots_max = iparams[RS_N_SLOTS_MAX];
const int qt = iparams[RS_QT];
const int n_qtiles = iparams[RS_N_QTILES];
const float scale = fparams[AF_SCALE];
const float cap = fparams[AF_CAP];
// logit (log2 units) = c_out * tanh(c_in * q.k) with a cap, else c_in * q.k.
const float c_in = cap > 0.0f ? scale / cap : scale * DHSA_LOG2E;
const float c_out = cap * DHSA_LOG2E;
const dhsa_long q_st0 = queries_strides[0], q_st1 = queries_strides[1], q_st2 = queries_strides[2];
const dhsa_long k_st0 = keys_strides[0], k_st1 = keys_strides[1], k_st2 = keys_strides[2];

const int bh = dhsa_gy;
const int b = bh / n_kv;
const int hk = bh % n_kv;
const int reps = n_heads / n_kv;
const int blk = dhsa_gx;
const int n_blk = dhsa_min(n_q - blk * block_size, block_size);  // queries of the block
const int n_score = (n_blk + stride - 1) / stride;                // its scoring queries
const int blk_last = q_offset + blk * block_size + n_blk - 1;     // the block's last position
const dhsa_long idx_base = ((dhsa_long)b * n_blocks + blk) * n_slots_max;
const dhsa_long out_base = (((dhsa_long)b * n_kv + hk) * n_blocks + blk) * n_slots_max;
const dhsa_long k_base = b * k_st0 + hk * k_st1;
#define DHSA_SLOT(j) int(kv_index[idx_base + (j)])
DHSA_SMEM T* qs = reinterpret_cast<DHSA_SMEM T*>(dhsa_smem);
DHSA_SMEM T* ks = qs;  // the key tile (a tile's queries are in registers by then)

for (int qtile = 0; qtile < n_qtiles; ++qtile) {
const int j_first = qtile * qt;                                    // this tile's first
const int j_last = dhsa_min(j_first + qt, n_score) - 1;           // and last (may be < first)
const int pos_hi = blk_last - j_first * stride;
const int pos_lo = blk_last - dhsa_imax(j_last, j_first) * stride;

// Rows held by this lane: position and validity per (m-tile, row slot).
int row_pos[MT][DHSA_ACC_ROWS];
bool row_ok[MT][DHSA_ACC_ROWS];
DHSA_UNROLL
for (int mt = 0; mt < MT; ++mt) {
  DHSA_UNROLL
  for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
    const int row = dhsa_warp * WROWS + mt * DHSA_MMA_M + dhsa_acc_row(dhsa_lane, r * RPL);
    const int j = j_first + row % qt;
    row_pos[mt][r] = blk_last - j * stride;
    row_ok[mt][r] = row / qt < reps && j < n_score;
  }
}

// Stage the tile's queries through shared memory into A fragments (the last tile's keys
// done with the buffer).
DHSA_BARRIER();
DHSA_UNROLL
for (int it = 0; it < Q_ITERS; ++it) {
  const int c = dhsa_tid + it * NT;
  if (c < ROWS * DV) {
    const int row = c / DV, col = (c % DV) * VEC;
    const int hr = row / qt, j = j_first + row % qt;
    const bool ok = hr < reps && j < n_score;
    const int qi = blk * block_size + n_blk - 1 - j * stride;
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

// The block's valid slots; ascending, so the key tiles wholly past this query tile's last
// query are a suffix and those wholly left of its window a prefix: it walks [t_lo, t_hi).
const int n_slots = j_last >= j_first ? kv_count[b * n_blocks + blk] : 0;
const int n_tiles = (n_slots + BK - 1) / BK;
int t_lo = 0;
int t_hi = n_tiles;
while (t_hi > t_lo && DHSA_SLOT((t_hi - 1) * BK) > pos_hi) {
  --t_hi;
}
while (window > 0 && t_lo < t_hi &&
       DHSA_SLOT(dhsa_min((t_lo + 1) * BK, n_slots) - 1) <= pos_lo - window) {
  ++t_lo;
}

// The first tile writes every slot: 0 where its rows see nothing (later tiles add).
if (qtile == 0 && dhsa_tid < BK) {
  for (int j = dhsa_tid; j < n_slots_max; j += BK) {
    if (j < t_lo * BK || j >= t_hi * BK) {
      scores[out_base + j] = 0.0f;
    }
  }
}

// Tile t_ of the slots into shared memory: its key positions (-1 past the slots) and keys.
#define DHSA_LOAD_KEYS(t_)                                                                \
  {                                                                                       \
    const int j0_ = (t_) * BK;                                                            \
    const int jn_ = dhsa_min(BK, n_slots - j0_);                                          \
    if (dhsa_tid < BK) {                                                                  \
      kpos[dhsa_tid] = dhsa_tid < jn_ ? DHSA_SLOT(j0_ + dhsa_tid) : -1;                   \
    }                                                                                     \
    DHSA_UNROLL                                                                           \
    for (int it = 0; it < K_ITERS; ++it) {                                                \
      const int c = dhsa_tid + it * NT;                                                   \
      if (c < BK * DV) {                                                                  \
        const int j = c / DV, col = (c % DV) * VEC;                                       \
        const int kp = j < jn_ ? DHSA_SLOT(j0_ + j) : 0;                                  \
        dhsa_cp16(ks + j * LDK + col, keys + k_base + kp * k_st2 + col, j < jn_);         \
      }                                                                                   \
    }                                                                                     \
    dhsa_cp_commit();                                                                     \
    dhsa_cp_wait<0>();                                                                    \
  }
// s = the masked logits (log2 units, -inf where the row does not see the slot) of this
// warp's rows against the tile in shared memory.
#define DHSA_LOGITS(s)                                                                    \
  {                                                                                       \
    DHSA_UNROLL                                                                           \
    for (int mt = 0; mt < MT; ++mt) {                                                     \
      DHSA_UNROLL                                                                         \
      for (int ns = 0; ns < NS; ++ns) {                                                   \
        DHSA_UNROLL                                                                       \
        for (int i = 0; i < DHSA_ACC_N; ++i) {                                            \
          s[mt][ns].x[i] = 0.0f;                                                          \
        }                                                                                 \
      }                                                                                   \
    }                                                                                     \
    DHSA_UNROLL                                                                           \
    for (int kt = 0; kt < KT; ++kt) {                                                     \
      DHSA_UNROLL                                                                         \
      for (int ns = 0; ns < NS; ++ns) {                                                   \
        dhsa_bfrag<T> kb;                                                                 \
        dhsa_load_bt(kb, ks + ns * DHSA_MMA_N * LDK + kt * DHSA_MMA_K, LDK, dhsa_lane);   \
        DHSA_UNROLL                                                                       \
        for (int mt = 0; mt < MT; ++mt) {                                                 \
          dhsa_mma(s[mt][ns], qf[mt][kt], kb);                                            \
        }                                                                                 \
      }                                                                                   \
    }                                                                                     \
    DHSA_UNROLL                                                                           \
    for (int mt = 0; mt < MT; ++mt) {                                                     \
      DHSA_UNROLL                                                                         \
      for (int ns = 0; ns < NS; ++ns) {                                                   \
        DHSA_UNROLL                                                                       \
        for (int i = 0; i < DHSA_ACC_N; ++i) {                                            \
          const int r = dhsa_acc_rslot(i);                                                \
          float x = s[mt][ns].x[i] * c_in;                                                \
          x = cap > 0.0f ? c_out * dhsa_tanh_t<T>(x) : x;                                 \
          const int kp = kpos[ns * DHSA_MMA_N + dhsa_acc_col(dhsa_lane, i)];              \
          const int p = row_pos[mt][r];                                                   \
          const bool ok =                                                                 \
              row_ok[mt][r] && kp >= 0 && kp <= p && (window <= 0 || kp > p - window);    \
          s[mt][ns].x[i] = ok ? x : -DHSA_INF;                                            \
        }                                                                                 \
      }                                                                                   \
    }                                                                                     \
  }

// Pass 1: each row's log-sum-exp (log2 units) over the slots it sees.
float m_run[MT][DHSA_ACC_ROWS];
float l_run[MT][DHSA_ACC_ROWS];
DHSA_UNROLL
for (int mt = 0; mt < MT; ++mt) {
  DHSA_UNROLL
  for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
    m_run[mt][r] = -DHSA_INF;
    l_run[mt][r] = 0.0f;
  }
}
for (int t = t_lo; t < t_hi; ++t) {
  DHSA_BARRIER();  // shared memory free: the queries staged, the last tile done
  DHSA_LOAD_KEYS(t);
  DHSA_BARRIER();
  dhsa_acc s[MT][NS];
  DHSA_LOGITS(s);
  DHSA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    float row_max[DHSA_ACC_ROWS];
    float row_sum[DHSA_ACC_ROWS];
    DHSA_UNROLL
    for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
      row_max[r] = -DHSA_INF;
      row_sum[r] = 0.0f;
    }
    DHSA_UNROLL
    for (int ns = 0; ns < NS; ++ns) {
      DHSA_UNROLL
      for (int i = 0; i < DHSA_ACC_N; ++i) {
        const int r = dhsa_acc_rslot(i);
        row_max[r] = dhsa_max(row_max[r], s[mt][ns].x[i]);
      }
    }
    float m_use[DHSA_ACC_ROWS];
    DHSA_UNROLL
    for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
      const float m_new = dhsa_max(m_run[mt][r], dhsa_row_max(row_max[r]));
      m_use[r] = m_new == -DHSA_INF ? 0.0f : m_new;
      l_run[mt][r] *= dhsa_exp2(m_run[mt][r] - m_use[r]);
      m_run[mt][r] = m_new;
    }
    DHSA_UNROLL
    for (int ns = 0; ns < NS; ++ns) {
      DHSA_UNROLL
      for (int i = 0; i < DHSA_ACC_N; ++i) {
        const int r = dhsa_acc_rslot(i);
        row_sum[r] += dhsa_exp2(s[mt][ns].x[i] - m_use[r]);
      }
    }
    DHSA_UNROLL
    for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
      l_run[mt][r] += row_sum[r];
    }
  }
}
float lse[MT][DHSA_ACC_ROWS];  // +inf for a row that sees no slot: its probabilities are 0
DHSA_UNROLL
for (int mt = 0; mt < MT; ++mt) {
  DHSA_UNROLL
  for (int r = 0; r < DHSA_ACC_ROWS; ++r) {
    const float l_tot = dhsa_row_sum(l_run[mt][r]);
    lse[mt][r] = l_tot > 0.0f ? m_run[mt][r] + dhsa_log2(l_tot) : DHSA_INF;
  }
}

// Pass 2: the probabilities, summed over the rows per slot.
for (int t = t_lo; t < t_hi; ++t) {
  DHSA_BARRIER();  // the last tile's keys and column sums done
  DHSA_LOAD_KEYS(t);
  DHSA_BARRIER();
  dhsa_acc s[MT][NS];
  DHSA_LOGITS(s);
  DHSA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    DHSA_UNROLL
    for (int ns = 0; ns < NS; ++ns) {
      DHSA_UNROLL
      for (int i = 0; i < DHSA_ACC_N; ++i) {
        const int row = dhsa_warp * WROWS + mt * DHSA_MMA_M + dhsa_acc_row(dhsa_lane, i);
        const int col = ns * DHSA_MMA_N + dhsa_acc_col(dhsa_lane, i);
        ps[row * BK + col] = dhsa_exp2(s[mt][ns].x[i] - lse[mt][dhsa_acc_rslot(i)]);
      }
    }
  }
  DHSA_BARRIER();
  if (dhsa_tid < BK) {
    float sum = 0.0f;
    for (int row = 0; row < ROWS; ++row) {
      sum += ps[row * BK + dhsa_tid];
    }
    const int j = t * BK + dhsa_tid;
    if (j < n_slots_max) {
      scores[out_base + j] = qtile == 0 ? sum : scores[out_base + j] + sum;
    }
  }
}

#undef DHSA_LOGITS
#undef DHSA_LOAD_KEYS
}  // query tiles
#undef DHSA_SLOT
