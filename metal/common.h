// dhsa common helpers, shared by both backends: passed in `header=` after the backend's
// prelude (prelude_metal.h or prelude_cuda.h), whose vocabulary it uses.

#define DHSA_LOG2E 1.4426950408889634f
#define DHSA_LN2 0.6931471805599453f

DHSA_INLINE int dhsa_min(int a, int b) { return a < b ? a : b; }
DHSA_INLINE int dhsa_imax(int a, int b) { return a > b ? a : b; }

// Sum of v over the threadgroup; every thread calls it and gets the sum.
// red: NW ints of shared memory (NW = warps in the group).
DHSA_INLINE int dhsa_block_sum(int v, DHSA_SMEM int* red, int nw, int warp, int lane) {
  DHSA_UNROLL
  for (int m = 16; m > 0; m >>= 1) {
    v += dhsa_shfl_xor_i(v, m);
  }
  DHSA_BARRIER();  // red may still be read by an earlier call
  if (lane == 0) {
    red[warp] = v;
  }
  DHSA_BARRIER();
  int s = 0;
  for (int w = 0; w < nw; ++w) {
    s += red[w];
  }
  return s;
}

// Exclusive prefix sum of v over the threadgroup in thread order; total gets the sum.
DHSA_INLINE int dhsa_block_scan(int v, DHSA_SMEM int* red, int nw, int warp, int lane,
                                DHSA_THREAD int& total) {
  int x = v;
  DHSA_UNROLL
  for (int o = 1; o < 32; o <<= 1) {
    const int y = dhsa_shfl_up_i(x, o);
    x += lane >= o ? y : 0;
  }
  DHSA_BARRIER();
  if (lane == 31) {
    red[warp] = x;
  }
  DHSA_BARRIER();
  int before = 0;
  total = 0;
  for (int w = 0; w < nw; ++w) {
    const int t = red[w];
    before += w < warp ? t : 0;
    total += t;
  }
  return before + x - v;
}

// ---- quantized keys and values (mlx-lm's QuantizedKVCache, mx.quantize's layout) ------------
// A row of D values is D * BITS / 32 uint32 words, value i at bits [BITS (i % (32 / BITS)),
// + BITS) of word i / (32 / BITS); group g = i / GROUP_SIZE has one scale and one bias (the
// model's dtype): x_i = scale_g q_i + bias_g, here in fp32.

// N values of a row from value `first` (a multiple of N, all in one group) into floats.
template <int N, int BITS, typename P>
DHSA_INLINE void dhsa_dequant(DHSA_THREAD float* dst, P words, int first, float scale,
                              float bias) {
  constexpr int PER = 32 / BITS;  // values per word
  constexpr unsigned MASK = (1u << BITS) - 1u;
  if (N >= PER) {  // whole words
    DHSA_UNROLL
    for (int w = 0; w < N / PER; ++w) {
      const unsigned x = words[first / PER + w];
      DHSA_UNROLL
      for (int i = 0; i < PER; ++i) {
        dst[w * PER + i] = scale * float((x >> (BITS * i)) & MASK) + bias;
      }
    }
  } else {  // part of one word
    const unsigned x = unsigned(words[first / PER]) >> (BITS * (first % PER));
    DHSA_UNROLL
    for (int i = 0; i < N; ++i) {
      dst[i] = scale * float((x >> (BITS * i)) & MASK) + bias;
    }
  }
}

// The unit of a quantized K/V tile load: 16 bytes of packed words, the 128 / BITS values of a
// row from a multiple of 128 / BITS (never crossing a group: GROUP is a multiple of 32), with
// their group's scale and bias. dhsa_qload issues its loads (no use of them), dhsa_qstore
// dequantizes it into shared memory: a thread loads all its units of a tile, then stores
// them, so their global round trips overlap.
template <typename T>
struct dhsa_qunit {
  dhsa_words4 w;
  T scale;
  T bias;
};

// Where the rows of quantized keys (or values) are: row p's words at words + p w_st, its
// scales and biases at scales + p s_st, biases + p b_st.
template <typename W, typename S>
struct dhsa_qrows {
  W words;
  S scales;
  S biases;
  dhsa_long w_st, s_st, b_st;
};

// The unit of row p from value `col`; zeros when !valid (nothing read).
template <int BITS, int GROUP, typename T, typename W, typename S>
DHSA_INLINE void dhsa_qload(DHSA_THREAD dhsa_qunit<T>& u, DHSA_THREAD const dhsa_qrows<W, S>& x,
                            int p, int col, bool valid) {
  if (valid) {
    u.w = dhsa_load_words4(x.words + p * x.w_st + col / (32 / BITS));
    u.scale = x.scales[p * x.s_st + col / GROUP];
    u.bias = x.biases[p * x.b_st + col / GROUP];
  } else {
    DHSA_UNROLL
    for (int i = 0; i < 4; ++i) {
      u.w.x[i] = 0u;
    }
    u.scale = T(0.0f);
    u.bias = T(0.0f);
  }
}

// A unit's 128 / BITS values, scale * q + bias in fp32 stored as T from dst (shared memory,
// 16-byte aligned): the quantized twin of dhsa_cp16, in 16-byte stores (dhsa_st16).
template <int BITS, typename T>
DHSA_INLINE void dhsa_qstore(DHSA_SMEM T* dst, DHSA_THREAD const dhsa_qunit<T>& u) {
  constexpr int N = int(16 / sizeof(T));  // values per store
  const float scale = dhsa_to_float<T>(u.scale);
  const float bias = dhsa_to_float<T>(u.bias);
  DHSA_UNROLL
  for (int c = 0; c < 128 / BITS; c += N) {
    float x[N];
    dhsa_dequant<N, BITS>(x, u.w.x, c, scale, bias);
    dhsa_st16<T>(dst + c, x);
  }
}
