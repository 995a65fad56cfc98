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
