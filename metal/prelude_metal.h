// dhsa prelude, Metal side: passed in `header=` to mx.fast.metal_kernel, ahead of common.h.
// Same vocabulary as prelude_cuda.h (see there for the list). Here the matrix unit is one
// simdgroup 8 x 8 x 8 multiply in fp32 (metal::simdgroup_matrix<float, 8, 8>); fragments
// are loaded element by element, converting T to float, as MLX's steel kernels do.
// Lane l holds elements (fm, fn) and (fm, fn + 1) of every 8 x 8 matrix, with
// fm = (l / 4 & 4) + (l / 2 % 4) and fn = (l / 4 & 2) * 2 + (l % 2) * 2.

#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
#include <metal_stdlib>

#define DHSA_DEVICE device
#define DHSA_SMEM threadgroup
#define DHSA_THREAD thread
#define DHSA_SHARED(type, name, count) threadgroup type name[count]
#define DHSA_SHARED_SIZED(type, name, count) threadgroup type name[count]
#define DHSA_INLINE inline __attribute__((always_inline))
#define DHSA_UNROLL _Pragma("clang loop unroll(full)")
#define DHSA_BARRIER() metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup)
#define DHSA_WARP_SYNC() metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup)
#define DHSA_INF INFINITY

#define DHSA_MMA_M 8
#define DHSA_MMA_N 8
#define DHSA_MMA_K 8
#define DHSA_ACC_N 2
#define DHSA_ACC_ROWS 1

typedef long dhsa_long;

DHSA_INLINE float dhsa_exp2(float x) { return metal::precise::exp2(x); }
DHSA_INLINE float dhsa_log2(float x) { return metal::precise::log2(x); }
DHSA_INLINE float dhsa_tanh(float x) { return metal::precise::tanh(x); }
template <typename T>
DHSA_INLINE float dhsa_tanh_t(float x) { return metal::precise::tanh(x); }
DHSA_INLINE float dhsa_rsqrt(float x) { return metal::precise::rsqrt(x); }
DHSA_INLINE float dhsa_max(float a, float b) { return metal::max(a, b); }
DHSA_INLINE float dhsa_shfl_xor(float v, int m) { return metal::simd_shuffle_xor(v, ushort(m)); }
DHSA_INLINE bool dhsa_warp_all(bool p) { return metal::simd_all(p); }
DHSA_INLINE int dhsa_shfl_up_i(int v, int d) { return metal::simd_shuffle_up(v, ushort(d)); }
DHSA_INLINE int dhsa_shfl_down_i(int v, int d) { return metal::simd_shuffle_down(v, ushort(d)); }
DHSA_INLINE int dhsa_shfl_xor_i(int v, int m) { return metal::simd_shuffle_xor(v, ushort(m)); }
DHSA_INLINE uint dhsa_order_key(float x) {
  const uint u = as_type<uint>(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define DHSA_SHARED_ATOMIC(name, count) threadgroup metal::atomic_int name[count]
DHSA_INLINE void dhsa_atomic_add(threadgroup metal::atomic_int* p, int v) {
  metal::atomic_fetch_add_explicit(p, v, metal::memory_order_relaxed);
}
DHSA_INLINE void dhsa_atomic_store(threadgroup metal::atomic_int* p, int v) {
  metal::atomic_store_explicit(p, v, metal::memory_order_relaxed);
}
DHSA_INLINE int dhsa_atomic_load(threadgroup metal::atomic_int* p) {
  return metal::atomic_load_explicit(p, metal::memory_order_relaxed);
}

// The lanes holding one accumulator row differ in lane bits 0 and 3.
DHSA_INLINE float dhsa_row_max(float v) {
  v = metal::max(v, dhsa_shfl_xor(v, 1));
  return metal::max(v, dhsa_shfl_xor(v, 8));
}
DHSA_INLINE float dhsa_row_sum(float v) {
  v += dhsa_shfl_xor(v, 1);
  return v + dhsa_shfl_xor(v, 8);
}
DHSA_INLINE float dhsa_warp_sum(float v) { return metal::simd_sum(v); }

template <typename T>
DHSA_INLINE float dhsa_to_float(T x) { return static_cast<float>(x); }
template <typename T>
DHSA_INLINE T dhsa_from_float(float x) { return static_cast<T>(x); }

// N elements at src (device memory) into floats.
template <int N, typename P>
DHSA_INLINE void dhsa_load_row(thread float* dst, P src) {
  DHSA_UNROLL
  for (int i = 0; i < N; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

// Floats other groups of the launch wrote (device memory is coherent at device scope once
// fenced; see dhsa_fence_device).
template <typename P>
DHSA_INLINE float dhsa_load_l2(P p) { return *p; }
template <int N, typename P>
DHSA_INLINE void dhsa_load_row_l2(thread float* dst, P src) {
  DHSA_UNROLL
  for (int i = 0; i < N; ++i) {
    dst[i] = src[i];
  }
}
// Last-group-done across threadgroups (MSL 3.2 fences). The kernels only take this path with
// FOLD, which kernels.py enables on CUDA alone: it has not run on a Mac.
DHSA_INLINE void dhsa_fence_device() {
  metal::atomic_thread_fence(metal::mem_flags::mem_device, metal::memory_order_seq_cst,
                             metal::thread_scope_device);
}
DHSA_INLINE int dhsa_take_ticket(const device int* p) {
  return metal::atomic_fetch_add_explicit(
      (device metal::atomic_int*)(p), 1, metal::memory_order_relaxed);
}
DHSA_INLINE void dhsa_reset_ticket(const device int* p) {
  metal::atomic_store_explicit((device metal::atomic_int*)(p), 0, metal::memory_order_relaxed);
}

// 4 uint32 words at p (device memory) into registers: 16 bytes, 4 independent loads.
struct dhsa_words4 { uint x[4]; };
template <typename P>
DHSA_INLINE dhsa_words4 dhsa_load_words4(P p) {
  dhsa_words4 w;
  DHSA_UNROLL
  for (int i = 0; i < 4; ++i) {
    w.x[i] = p[i];
  }
  return w;
}

// Synchronous here: dhsa_cp_commit / dhsa_cp_wait have nothing to wait for.
template <typename T, typename P>
DHSA_INLINE void dhsa_cp16(threadgroup T* dst, P src, bool valid) {
  DHSA_UNROLL
  for (int i = 0; i < int(16 / sizeof(T)); ++i) {
    dst[i] = valid ? src[i] : T(0);
  }
}
// 16 bytes of T into shared memory from floats (dhsa_qstore's store).
template <typename T>
DHSA_INLINE void dhsa_st16(threadgroup T* dst, thread const float* src) {
  DHSA_UNROLL
  for (int i = 0; i < int(16 / sizeof(T)); ++i) {
    dst[i] = static_cast<T>(src[i]);
  }
}
DHSA_INLINE void dhsa_cp_commit() {}
template <int N>
DHSA_INLINE void dhsa_cp_wait() {}

// ---- matrix unit: simdgroup 8 x 8 x 8 -------------------------------------------------
template <typename T>
struct dhsa_afrag { float x[2]; };
template <typename T>
struct dhsa_bfrag { float x[2]; };
struct dhsa_acc { float x[2]; };

DHSA_INLINE int dhsa_frag_m(int lane) { return ((lane >> 2) & 4) + ((lane >> 1) & 3); }
DHSA_INLINE int dhsa_frag_n(int lane) { return ((lane >> 2) & 2) * 2 + (lane & 1) * 2; }
DHSA_INLINE int dhsa_acc_row(int lane, int i) { return dhsa_frag_m(lane); }
DHSA_INLINE int dhsa_acc_col(int lane, int i) { return dhsa_frag_n(lane) + i; }
DHSA_INLINE int dhsa_acc_rslot(int i) { return 0; }

template <typename T, typename P>
DHSA_INLINE void dhsa_load_a(thread dhsa_afrag<T>& a, P p, int ld, int lane) {
  const int m = dhsa_frag_m(lane), k = dhsa_frag_n(lane);
  a.x[0] = static_cast<float>(p[m * ld + k]);
  a.x[1] = static_cast<float>(p[m * ld + k + 1]);
}

// B(k, n) = p[k * ld + n]
template <typename T, typename P>
DHSA_INLINE void dhsa_load_b(thread dhsa_bfrag<T>& b, P p, int ld, int lane) {
  const int k = dhsa_frag_m(lane), n = dhsa_frag_n(lane);
  b.x[0] = static_cast<float>(p[k * ld + n]);
  b.x[1] = static_cast<float>(p[k * ld + n + 1]);
}

// B(k, n) = p[n * ld + k]
template <typename T, typename P>
DHSA_INLINE void dhsa_load_bt(thread dhsa_bfrag<T>& b, P p, int ld, int lane) {
  const int k = dhsa_frag_m(lane), n = dhsa_frag_n(lane);
  b.x[0] = static_cast<float>(p[n * ld + k]);
  b.x[1] = static_cast<float>(p[(n + 1) * ld + k]);
}

template <typename T>
DHSA_INLINE void dhsa_mma(thread dhsa_acc& d, thread const dhsa_afrag<T>& a,
                          thread const dhsa_bfrag<T>& b) {
  metal::simdgroup_matrix<float, 8, 8> am, bm, cm;
  am.thread_elements()[0] = a.x[0];
  am.thread_elements()[1] = a.x[1];
  bm.thread_elements()[0] = b.x[0];
  bm.thread_elements()[1] = b.x[1];
  cm.thread_elements()[0] = d.x[0];
  cm.thread_elements()[1] = d.x[1];
  metal::simdgroup_multiply_accumulate(cm, am, bm, cm);
  d.x[0] = cm.thread_elements()[0];
  d.x[1] = cm.thread_elements()[1];
}

// s[0]: accumulators of one 8-wide strip (DHSA_MMA_K / DHSA_MMA_N = 1); same layout as A.
template <typename T>
DHSA_INLINE void dhsa_p_to_a(thread dhsa_afrag<T>& a, thread const dhsa_acc* s) {
  a.x[0] = s[0].x[0];
  a.x[1] = s[0].x[1];
}
