// dhsa_decode_attention: kernel body for mx.fast.metal_kernel / mx.fast.cuda_kernel (signature
// generated; ids_<backend>.h prepended; prelude_<backend>.h + common.h as header).
// One query per (batch, head) -- a decode step -- over many keys: split-K ("flash decoding").
// sparse_attention.metal runs the same math on the matrix unit for query tiles; with one query
// most of its tile rows would be padding, so here each warp walks keys itself: a lane holds
// D / 32 elements of every row, a key's logit is a warp sum, and the softmax runs online.
// inputs : queries [B, H, 1, D] T | keys, values [B, H_kv, S, D] T; any strides with the last
//          dim contiguous, rows 16-byte aligned
//          with DHSA_QUANTIZED_KV (kernels.sources prepends the define): keys, values
//          [B, H_kv, S, D * BITS / 32] uint32 (mx.quantize's words), key_scales, key_biases,
//          value_scales, value_biases [B, H_kv, S, D / GROUP] T; a lane dequantizes its
//          D / 32 values of each row in registers (common.h, dhsa_dequant)
//          kv_index [B, NB, K] int32 (ascending key positions of block 0; unused when ALL_KEYS)
//          kv_count [B, NB] int32 (valid slots; unused when ALL_KEYS)
//          tickets [B * H_kv] int32, zeros (FOLD: each group of a KV head takes a ticket; the
//          group with the last one merges, then sets the ticket back to 0, so one buffer
//          serves launches that run one after another, e.g. a layer's decode steps)
//          iparams int32: kernels.sources.DecodeParams (iparams[DA_<FIELD>]): S, q_pos (the query's position), window (0 = none), H, H_kv,
//                  NB, K, n_splits, per_split (slots per split, a multiple of NW * KB), B
//          fparams float32: kernels.sources.AttentionScalars (fparams[AF_<FIELD>]): scale,
//                  softcap (0 = none)
// outputs: part [n_splits, B, H, D] float32 (each split's normalised output, 0 if it saw no
//          key), lse [n_splits, B, H] float32 (its log-sum-exp, natural log; -inf: no key);
//          out [B, H, 1, D] T when FOLD (else a 1-element placeholder): the splits joined as
//          merge_splits.metal joins them, by the last group of each KV head to finish
// template: T, D (a multiple of 32, <= 256), REPS (query heads per KV head), NW (warps per
//          group), KB (keys a warp loads per step: K and V rows in flight together), ALL_KEYS (keys [0, S) instead of a plan), FOLD (merge here; needs
//          device-scope fences and atomics: without FOLD merge_splits.metal runs after); with
//          DHSA_QUANTIZED_KV also BITS (4 or 8) and GROUP (values per scale, a multiple of D / 32)
// launch : grid (n_splits * NW * 32, B * H_kv, 1), threadgroup (NW * 32, 1, 1). Group (z, b,
//          kv head) takes slots [z * per_split, (z + 1) * per_split); warp w of it the runs of
//          KB slots w, w + NW, ... of those; all REPS query heads share each K/V row read.
// math   : the query sees key k iff k <= q_pos and k > q_pos - window (window > 0); logits
//          softcap(scale q.k) in fp32, online softmax (exp2 domain), all in fp32.
constexpr int NT = NW * 32;
constexpr int EPL = D / 32;  // elements of a row per lane
constexpr int ZB = REPS * EPL <= 16 ? 4 : REPS * EPL <= 32 ? 2 : 1;  // splits a merge step loads

DHSA_SHARED(float, wm_s, NW * REPS);
DHSA_SHARED(float, wl_s, NW * REPS);
DHSA_SHARED(float, tot_s, 2 * REPS);
DHSA_SHARED(float, o_s, REPS * D);
DHSA_SHARED(int, last_s, 1);

const int n_k = iparams[DA_N_K];
const int q_pos = iparams[DA_Q_POS];
const int window = iparams[DA_WINDOW];
const int n_heads = iparams[DA_N_HEADS];
const int n_kv = iparams[DA_N_KV];
const int n_blocks = iparams[DA_N_BLOCKS];
const int n_slots_max = iparams[DA_N_SLOTS_MAX];
const int n_splits = iparams[DA_N_SPLITS];
const int per_split = iparams[DA_PER_SPLIT];
const int n_batch = iparams[DA_N_BATCH];
const float scale = fparams[AF_SCALE];
const float cap = fparams[AF_CAP];
// logit (log2 units) = c_out * tanh(c_in * q.k) with a cap, else c_in * q.k.
const float c_in = cap > 0.0f ? scale / cap : scale * DHSA_LOG2E;
const float c_out = cap * DHSA_LOG2E;

const int split = dhsa_gx;
const int b = dhsa_gy / n_kv;
const int hk = dhsa_gy % n_kv;
const int col0 = dhsa_lane * EPL;

float q[REPS][EPL];
DHSA_UNROLL
for (int r = 0; r < REPS; ++r) {
  const dhsa_long off =
      b * queries_strides[0] + (dhsa_long)(hk * REPS + r) * queries_strides[1] + col0;
  dhsa_load_row<EPL>(q[r], queries + off);
  DHSA_UNROLL
  for (int e = 0; e < EPL; ++e) {
    q[r][e] *= c_in;
  }
}

// The key slots: the causal (and windowed) key range, or the plan's valid slots.
int key_lo = 0;
int n_slots;
dhsa_long idx_base = 0;
if (ALL_KEYS) {
  key_lo = window > 0 ? dhsa_imax(q_pos - window + 1, 0) : 0;
  n_slots = dhsa_imax(dhsa_min(n_k, q_pos + 1) - key_lo, 0);
} else {
  idx_base = (dhsa_long)b * n_blocks * n_slots_max;
  n_slots = kv_count[b * n_blocks];
}
const int s_end = dhsa_min((split + 1) * per_split, n_slots);
#ifdef DHSA_QUANTIZED_KV
// A lane's values of a row are in one group: one scale and one bias each for K and V.
const dhsa_long k_base = b * keys_strides[0] + (dhsa_long)hk * keys_strides[1];
const dhsa_long v_base = b * values_strides[0] + (dhsa_long)hk * values_strides[1];
const dhsa_long ks_base =
    b * key_scales_strides[0] + (dhsa_long)hk * key_scales_strides[1] + col0 / GROUP;
const dhsa_long kb_base =
    b * key_biases_strides[0] + (dhsa_long)hk * key_biases_strides[1] + col0 / GROUP;
const dhsa_long vs_base =
    b * value_scales_strides[0] + (dhsa_long)hk * value_scales_strides[1] + col0 / GROUP;
const dhsa_long vb_base =
    b * value_biases_strides[0] + (dhsa_long)hk * value_biases_strides[1] + col0 / GROUP;
const dhsa_long ks_row = key_scales_strides[2], kb_row = key_biases_strides[2];
const dhsa_long vs_row = value_scales_strides[2], vb_row = value_biases_strides[2];
#else
const dhsa_long k_base = b * keys_strides[0] + (dhsa_long)hk * keys_strides[1] + col0;
const dhsa_long v_base = b * values_strides[0] + (dhsa_long)hk * values_strides[1] + col0;
#endif
const dhsa_long k_row = keys_strides[2];
const dhsa_long v_row = values_strides[2];

float m_run[REPS];
float l_run[REPS];
float o[REPS][EPL];
DHSA_UNROLL
for (int r = 0; r < REPS; ++r) {
  m_run[r] = -DHSA_INF;
  l_run[r] = 0.0f;
  DHSA_UNROLL
  for (int e = 0; e < EPL; ++e) {
    o[r][e] = 0.0f;
  }
}

for (int j0 = split * per_split + dhsa_warp * KB; j0 < s_end; j0 += NW * KB) {
  int kp[KB];
  bool ok[KB];
  float kr[KB][EPL];
  float vr[KB][EPL];
  DHSA_UNROLL
  for (int u = 0; u < KB; ++u) {
    const int j = j0 + u;
    kp[u] = j >= s_end ? -1 : ALL_KEYS ? key_lo + j : int(kv_index[idx_base + j]);
    ok[u] = kp[u] >= 0 && kp[u] < n_k && kp[u] <= q_pos && (window <= 0 || kp[u] > q_pos - window);
    if (ok[u]) {  // the same for the whole warp
#ifdef DHSA_QUANTIZED_KV
      const dhsa_long p = kp[u];
      dhsa_dequant<EPL, BITS>(kr[u], keys + k_base + p * k_row, col0,
                              dhsa_to_float<T>(key_scales[ks_base + p * ks_row]),
                              dhsa_to_float<T>(key_biases[kb_base + p * kb_row]));
      dhsa_dequant<EPL, BITS>(vr[u], values + v_base + p * v_row, col0,
                              dhsa_to_float<T>(value_scales[vs_base + p * vs_row]),
                              dhsa_to_float<T>(value_biases[vb_base + p * vb_row]));
#else
      dhsa_load_row<EPL>(kr[u], keys + k_base + kp[u] * k_row);
      dhsa_load_row<EPL>(vr[u], values + v_base + kp[u] * v_row);
#endif
    } else {
      DHSA_UNROLL
      for (int e = 0; e < EPL; ++e) {
        kr[u][e] = 0.0f;
        vr[u][e] = 0.0f;
      }
    }
  }
  DHSA_UNROLL
  for (int r = 0; r < REPS; ++r) {
    float s[KB];
    float s_max = -DHSA_INF;
    DHSA_UNROLL
    for (int u = 0; u < KB; ++u) {
      float x = 0.0f;
      DHSA_UNROLL
      for (int e = 0; e < EPL; ++e) {
        x += q[r][e] * kr[u][e];
      }
      x = dhsa_warp_sum(x);  // every lane gets the same sum
      x = cap > 0.0f ? c_out * dhsa_tanh_t<T>(x) : x;
      s[u] = ok[u] ? x : -DHSA_INF;
      s_max = dhsa_max(s_max, s[u]);
    }
    const float m_new = dhsa_max(m_run[r], s_max);
    if (m_new == -DHSA_INF) {
      continue;  // no visible key yet
    }
    const float alpha = dhsa_exp2(m_run[r] - m_new);
    float p_sum = 0.0f;
    DHSA_UNROLL
    for (int u = 0; u < KB; ++u) {
      s[u] = dhsa_exp2(s[u] - m_new);
      p_sum += s[u];
    }
    l_run[r] = l_run[r] * alpha + p_sum;
    m_run[r] = m_new;
    DHSA_UNROLL
    for (int e = 0; e < EPL; ++e) {
      float acc = o[r][e] * alpha;
      DHSA_UNROLL
      for (int u = 0; u < KB; ++u) {
        acc += s[u] * vr[u][e];
      }
      o[r][e] = acc;
    }
  }
}

// Join the warps: rescale each to the group's max, sum in turn through shared memory.
if (dhsa_lane == 0) {
  DHSA_UNROLL
  for (int r = 0; r < REPS; ++r) {
    wm_s[dhsa_warp * REPS + r] = m_run[r];
    wl_s[dhsa_warp * REPS + r] = l_run[r];
  }
}
DHSA_BARRIER();
float f[REPS];
DHSA_UNROLL
for (int r = 0; r < REPS; ++r) {
  float m_all = -DHSA_INF;
  for (int w = 0; w < NW; ++w) {
    m_all = dhsa_max(m_all, wm_s[w * REPS + r]);
  }
  float l_all = 0.0f;
  for (int w = 0; w < NW; ++w) {
    const float m_w = wm_s[w * REPS + r];
    l_all += m_w == -DHSA_INF ? 0.0f : wl_s[w * REPS + r] * dhsa_exp2(m_w - m_all);
  }
  f[r] = m_run[r] == -DHSA_INF ? 0.0f : dhsa_exp2(m_run[r] - m_all);
  if (dhsa_tid == 0) {
    tot_s[r] = m_all;
    tot_s[REPS + r] = l_all;
  }
}
for (int w = 0; w < NW; ++w) {
  if (dhsa_warp == w) {
    DHSA_UNROLL
    for (int r = 0; r < REPS; ++r) {
      DHSA_UNROLL
      for (int e = 0; e < EPL; ++e) {
        const float x = o[r][e] * f[r];
        o_s[r * D + col0 + e] = w == 0 ? x : o_s[r * D + col0 + e] + x;
      }
    }
  }
  DHSA_BARRIER();
}
const dhsa_long row0 = (dhsa_long)split * n_batch * n_heads + b * n_heads + hk * REPS;
for (int i = dhsa_tid; i < REPS * D; i += NT) {
  const int r = i / D, d = i % D;
  const float l_all = tot_s[REPS + r];
  part[(row0 + r) * D + d] = l_all > 0.0f ? o_s[i] / l_all : 0.0f;
  if (d == 0) {
    lse[row0 + r] = l_all > 0.0f ? (tot_s[r] + dhsa_log2(l_all)) * DHSA_LN2 : -DHSA_INF;
  }
}

if (FOLD) {
  // Publish this split, take a ticket; the group with the last one joins all splits.
  dhsa_fence_device();
  DHSA_BARRIER();
  if (dhsa_tid == 0) {
    last_s[0] = dhsa_take_ticket(tickets + dhsa_gy) == n_splits - 1;
  }
  DHSA_BARRIER();
  if (last_s[0]) {
    dhsa_fence_device();
    const dhsa_long rows = (dhsa_long)n_batch * n_heads;  // rows of one split
    const dhsa_long row_b = (dhsa_long)b * n_heads + hk * REPS;
    // The largest log-sum-exp of each head, over all splits.
    float mz[REPS];
    DHSA_UNROLL
    for (int r = 0; r < REPS; ++r) {
      mz[r] = -DHSA_INF;
      for (int z = dhsa_tid; z < n_splits; z += NT) {
        mz[r] = dhsa_max(mz[r], dhsa_load_l2(lse + z * rows + row_b + r));
      }
      DHSA_UNROLL
      for (int m = 16; m > 0; m >>= 1) {
        mz[r] = dhsa_max(mz[r], dhsa_shfl_xor(mz[r], m));
      }
      if (dhsa_lane == 0) {
        wm_s[dhsa_warp * REPS + r] = mz[r];
      }
    }
    DHSA_BARRIER();
    DHSA_UNROLL
    for (int r = 0; r < REPS; ++r) {
      mz[r] = -DHSA_INF;
      for (int w = 0; w < NW; ++w) {
        mz[r] = dhsa_max(mz[r], wm_s[w * REPS + r]);
      }
    }
    // Warp w sums splits w, w + NW, ...; a lane its EPL columns of each head.
    float den[REPS];
    DHSA_UNROLL
    for (int r = 0; r < REPS; ++r) {
      den[r] = 0.0f;
      DHSA_UNROLL
      for (int e = 0; e < EPL; ++e) {
        o[r][e] = 0.0f;
      }
    }
    // ZB splits' loads in flight before any is added (a split past the end weighs 0).
    for (int z0 = dhsa_warp; z0 < n_splits; z0 += ZB * NW) {
      float l[ZB][REPS];
      float x[ZB][REPS][EPL];
      DHSA_UNROLL
      for (int u = 0; u < ZB; ++u) {
        const int z = z0 + u * NW;
        DHSA_UNROLL
        for (int r = 0; r < REPS; ++r) {
          if (z < n_splits) {
            l[u][r] = dhsa_load_l2(lse + z * rows + row_b + r);
            dhsa_load_row_l2<EPL>(x[u][r], part + (z * rows + row_b + r) * D + col0);
          } else {
            l[u][r] = -DHSA_INF;
            DHSA_UNROLL
            for (int e = 0; e < EPL; ++e) {
              x[u][r][e] = 0.0f;
            }
          }
        }
      }
      DHSA_UNROLL
      for (int u = 0; u < ZB; ++u) {
        DHSA_UNROLL
        for (int r = 0; r < REPS; ++r) {
          const float w = l[u][r] > -DHSA_INF ? dhsa_exp2((l[u][r] - mz[r]) * DHSA_LOG2E) : 0.0f;
          den[r] += w;
          DHSA_UNROLL
          for (int e = 0; e < EPL; ++e) {
            o[r][e] += w * x[u][r][e];
          }
        }
      }
    }
    if (dhsa_lane == 0) {
      DHSA_UNROLL
      for (int r = 0; r < REPS; ++r) {
        wl_s[dhsa_warp * REPS + r] = den[r];
      }
    }
    for (int w = 0; w < NW; ++w) {
      if (dhsa_warp == w) {
        DHSA_UNROLL
        for (int r = 0; r < REPS; ++r) {
          DHSA_UNROLL
          for (int e = 0; e < EPL; ++e) {
            o_s[r * D + col0 + e] = w == 0 ? o[r][e] : o_s[r * D + col0 + e] + o[r][e];
          }
        }
      }
      DHSA_BARRIER();
    }
    for (int i = dhsa_tid; i < REPS * D; i += NT) {
      const int r = i / D;
      float d_all = 0.0f;
      for (int w = 0; w < NW; ++w) {
        d_all += wl_s[w * REPS + r];
      }
      out[row_b * D + i] = dhsa_from_float<T>(d_all > 0.0f ? o_s[i] / d_all : 0.0f);
    }
    if (dhsa_tid == 0) {
      dhsa_reset_ticket(tickets + dhsa_gy);  // every ticket is taken: ready for the next launch
    }
  }
}
