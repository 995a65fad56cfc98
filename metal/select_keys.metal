// dhsa_select_keys: kernel body for mx.fast.metal_kernel / mx.fast.cuda_kernel (signature
// generated; ids_<backend>.h prepended; prelude_<backend>.h + common.h as header).
// The second half of a DHSA plan (after block_scores.metal): selection.select for one query
// block per group, without sorting.
// inputs : scores [B, NB, N] float32 (N = n_closed + n_open chunks, the open ones last)
//          starts, lengths [B, cap] int32 (closed chunks in slots [0, n_closed))
//          iparams int32: kernels.sources.SelectParams (iparams[SK_<FIELD>]): L, q_offset,
//                  block_size, window (0 = none), sink, local, K (budget), n_closed,
//                  open_start, S, cap, n_open, open_piece (0: one open chunk
//                  [open_start, S); else open slot p is [open_start + p * open_piece,
//                  + open_piece) cut at S)
// outputs: indices [B, NB, K] int32: the block's keys, ascending, padding 0
//          n_valid [B, NB] int32
// template: MAX_IV (key intervals one block can hold: sinks + taken chunks + local),
//          NT (threads per group: a multiple of 32, at most 1024)
// launch : grid (NT, NB, B), threadgroup (NT, 1, 1) (block_scores' layout, so that the fused
//          plan kernel runs this as its last part); thread t owns the chunk range
//          [t * per, (t + 1) * per).
// math   : block b (queries q0..q1) keeps sinks [lo, sink_end), local [local_start, q1] and,
//          in the free middle, the best chunks until `room` keys: a chunk takes its keys
//          from its first free one. The cut score is found by radix selection on the
//          order-preserving bits of the scores, histograms weighted by each chunk's free
//          keys (4 passes of 8 bits): chunks above it are taken whole, chunks at it (ties,
//          in key order) share what is left. Selected ranges become at most MAX_IV
//          intervals (dispatch checks the bound), expanded with one binary search per slot.
constexpr int NW = NT / 32;
DHSA_SHARED_ATOMIC(hist, 256);
DHSA_SHARED(int, red_s, NW);
DHSA_SHARED(int, pick_s, 2);
DHSA_SHARED(int, iv_start, MAX_IV);
DHSA_SHARED(int, iv_off, MAX_IV);

const int n_q = iparams[SK_N_Q];
const int q_offset = iparams[SK_Q_OFFSET];
const int block_size = iparams[SK_BLOCK_SIZE];
const int window = iparams[SK_WINDOW];
const int sink = iparams[SK_SINK];
const int local = iparams[SK_LOCAL];
const int budget = iparams[SK_BUDGET];
const int n_closed = iparams[SK_N_CLOSED];
const int open_start = iparams[SK_OPEN_START];
const int n_k = iparams[SK_N_K];
const int cap = iparams[SK_CAP];
const int n_open = iparams[SK_N_OPEN];
const int open_piece = iparams[SK_OPEN_PIECE];
const int n_blocks = (n_q + block_size - 1) / block_size;
const int n_chunks = n_closed + n_open;
const int blk = dhsa_gy;
const int b = dhsa_gz;
const dhsa_long score_row = ((dhsa_long)b * n_blocks + blk) * n_chunks;

const int q0 = q_offset + blk * block_size;
const int q1 = dhsa_min(q0 + block_size, q_offset + n_q) - 1;
const int lo = window > 0 ? dhsa_imax(q0 - window + 1, 0) : 0;
const int sink_end = dhsa_imax(lo, dhsa_min(sink, q1 + 1));
const int local_start = dhsa_imax(dhsa_imax(q0 - local, lo), sink_end);
const int n_sink = sink_end - lo;
const int n_local = q1 + 1 - local_start;
const int room = budget - n_sink - n_local;
const int per = (n_chunks + NT - 1) / NT;
const int c_lo = dhsa_tid * per;
const int c_hi = dhsa_min(c_lo + per, n_chunks);

// Chunk c: first free key `s` and free keys `a` (inside [sink_end, local_start)).
#define DHSA_CHUNK(c, s, a)                                                  \
  {                                                                          \
    const bool closed_ = (c) < n_closed;                                     \
    const int op_ = open_start + ((c) - n_closed) * open_piece;              \
    const int st_ = closed_ ? starts[b * cap + (c)] : op_;                   \
    const int n_ = closed_       ? lengths[b * cap + (c)]                    \
                   : open_piece ? dhsa_min(n_k - op_, open_piece)            \
                                : n_k - open_start;                          \
    s = dhsa_imax(st_, sink_end);                                            \
    a = dhsa_imax(dhsa_min(st_ + n_, local_start) - s, 0);                   \
  }

int mine = 0;
for (int c = c_lo; c < c_hi; ++c) {
  int s, a;
  DHSA_CHUNK(c, s, a);
  mine += a;
}
const bool take_all = dhsa_block_sum(mine, red_s, NW, dhsa_warp, dhsa_lane) <= room;

// Radix selection of the cut key `thr`; `need` keys remain for the chunks at it.
unsigned thr = 0u;
int need = room;
if (!take_all) {
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = dhsa_tid; i < 256; i += NT) {
      dhsa_atomic_store(&hist[i], 0);
    }
    DHSA_BARRIER();
    for (int c = c_lo; c < c_hi; ++c) {
      int s, a;
      DHSA_CHUNK(c, s, a);
      const unsigned key = dhsa_order_key(scores[score_row + c]);
      if (a > 0 && (shift == 24 || (key >> (shift + 8)) == thr)) {
        dhsa_atomic_add(&hist[(key >> shift) & 255u], a);
      }
    }
    DHSA_BARRIER();
    if (dhsa_warp == 0) {
      // The highest digit whose keys, with all higher ones, cover `need`.
      int h[8];
      int t = 0;
      DHSA_UNROLL
      for (int j = 0; j < 8; ++j) {
        h[j] = dhsa_atomic_load(&hist[dhsa_lane * 8 + j]);
        t += h[j];
      }
      int x = t;  // suffix sum over lanes
      DHSA_UNROLL
      for (int o = 1; o < 32; o <<= 1) {
        const int y = dhsa_shfl_down_i(x, o);
        x += dhsa_lane + o < 32 ? y : 0;
      }
      int above = x - t;
      int found = -1, found_above = 0;
      DHSA_UNROLL
      for (int j = 7; j >= 0; --j) {
        if (found < 0 && above + h[j] >= need) {
          found = dhsa_lane * 8 + j;
          found_above = above;
        }
        above += h[j];
      }
      int best = found;
      DHSA_UNROLL
      for (int m = 16; m > 0; m >>= 1) {
        best = dhsa_imax(best, dhsa_shfl_xor_i(best, m));
      }
      if (found >= 0 && found == best) {
        pick_s[0] = found;
        pick_s[1] = found_above;
      }
    }
    DHSA_BARRIER();
    thr = (thr << 8) | unsigned(pick_s[0]);
    need -= pick_s[1];
  }
}

// Keys taken from chunk c (s, a from DHSA_CHUNK): `tie` counts the free keys of tied chunks
// before c, in key order.
#define DHSA_TAKE(c, s, a, t, tie)                                           \
  {                                                                          \
    DHSA_CHUNK(c, s, a);                                                     \
    t = 0;                                                                   \
    if (a > 0) {                                                             \
      const unsigned key_ = dhsa_order_key(scores[score_row + (c)]);         \
      if (take_all || key_ > thr) {                                          \
        t = a;                                                               \
      } else if (key_ == thr) {                                              \
        t = dhsa_min(dhsa_imax(need - tie, 0), a);                           \
        tie += a;                                                            \
      }                                                                      \
    }                                                                        \
  }

int my_tie = 0;
for (int c = c_lo; c < c_hi && !take_all; ++c) {
  int s, a;
  DHSA_CHUNK(c, s, a);
  my_tie += (a > 0 && dhsa_order_key(scores[score_row + c]) == thr) ? a : 0;
}
int total;
const int tie_before = dhsa_block_scan(my_tie, red_s, NW, dhsa_warp, dhsa_lane, total);
int my_n = 0, my_keys = 0;
int tie = tie_before;
for (int c = c_lo; c < c_hi; ++c) {
  int s, a, t;
  DHSA_TAKE(c, s, a, t, tie);
  my_n += t > 0 ? 1 : 0;
  my_keys += t;
}
int n_taken, taken_keys;
const int iv_before = dhsa_block_scan(my_n, red_s, NW, dhsa_warp, dhsa_lane, n_taken);
const int off_before = dhsa_block_scan(my_keys, red_s, NW, dhsa_warp, dhsa_lane, taken_keys);

// Intervals in key order: sinks, taken chunk parts, local window.
int iv = 1 + iv_before;
int off = n_sink + off_before;
tie = tie_before;
for (int c = c_lo; c < c_hi; ++c) {
  int s, a, t;
  DHSA_TAKE(c, s, a, t, tie);
  if (t > 0) {
    if (iv < MAX_IV - 1) {
      iv_start[iv] = s;
      iv_off[iv] = off;
    }
    iv += 1;
    off += t;
  }
}
#undef DHSA_TAKE
#undef DHSA_CHUNK
const int n_iv = dhsa_min(n_taken, MAX_IV - 2) + 2;
if (dhsa_tid == 0) {
  iv_start[0] = lo;
  iv_off[0] = 0;
  iv_start[n_iv - 1] = local_start;
  iv_off[n_iv - 1] = n_sink + taken_keys;
}
DHSA_BARRIER();

const int count = n_sink + taken_keys + n_local;
const dhsa_long out_row = ((dhsa_long)b * n_blocks + blk) * budget;
for (int j = dhsa_tid; j < budget; j += NT) {
  int key = 0;
  if (j < count) {
    int i_lo = 0, i_hi = n_iv - 1;  // the last interval starting at or before slot j
    while (i_lo < i_hi) {
      const int mid = (i_lo + i_hi + 1) >> 1;
      if (iv_off[mid] <= j) {
        i_lo = mid;
      } else {
        i_hi = mid - 1;
      }
    }
    key = iv_start[i_lo] + j - iv_off[i_lo];
  }
  indices[out_row + j] = key;
}
if (dhsa_tid == 0) {
  n_valid[(dhsa_long)b * n_blocks + blk] = count;
}
