// dhsa prelude, CUDA side: passed in `header=` to mx.fast.cuda_kernel, ahead of common.h.
// It gives the kernel bodies in this folder one vocabulary on both backends:
//   qualifiers   DHSA_DEVICE (global-memory pointer), DHSA_SMEM (shared-memory pointer),
//                DHSA_THREAD (reference to a local),
//                DHSA_SHARED(type, name, count) (a shared array), DHSA_SHARED_SIZED (one
//                sized at launch on CUDA), DHSA_INLINE, DHSA_UNROLL
//   sync         DHSA_BARRIER() (whole group), DHSA_WARP_SYNC()
//   math         dhsa_exp2, dhsa_log2, dhsa_tanh, dhsa_tanh_t<T>, dhsa_rsqrt, dhsa_max,
//                dhsa_row_max/sum, dhsa_warp_sum, dhsa_warp_all, dhsa_order_key (float ->
//                uint32 in the same order)
//   integers     dhsa_shfl_up_i, dhsa_shfl_down_i, dhsa_shfl_xor_i (warp shuffles of int);
//                DHSA_SHARED_ATOMIC(name, count) (shared int array with atomic adds),
//                dhsa_atomic_add, dhsa_atomic_store, dhsa_atomic_load
//   data         dhsa_load_row<N> (N elements of a global row -> floats, vector loads on
//                CUDA), dhsa_words4 / dhsa_load_words4 (4 uint32 words of global memory
//                into registers, one 16-byte load on CUDA), dhsa_cp16 (16 bytes global ->
//                shared, zero-filled when invalid; async on CUDA), dhsa_st16 (16 bytes of
//                T from floats into shared), dhsa_cp_commit, dhsa_cp_wait<N> (all but the
//                N newest groups landed),
//                dhsa_load_l2, dhsa_load_row_l2<N> (floats written by other groups of the launch)
//   groups       dhsa_fence_device, dhsa_take_ticket, dhsa_reset_ticket (last-group-done)
//   matrix unit  one warp computes D(M x N, fp32) += A(M x K) B(K x N): dhsa_afrag<T>,
//                dhsa_bfrag<T>, dhsa_acc, dhsa_load_a (A row-major), dhsa_load_b (B row-major,
//                shared memory), dhsa_load_bt (B given as its N x K row-major transpose),
//                dhsa_mma, dhsa_p_to_a (accumulators of one
//                K-wide column strip -> A fragment), dhsa_acc_row/col/rslot (which element
//                of the tile a lane holds).
// Here the unit is mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate); for fp32 inputs the
// same fragment layout is multiplied exactly in fp32 through warp shuffles.
// The header is global (the body sits in namespace mlx::core::cu): every name has a dhsa prefix.

#define DHSA_DEVICE
#define DHSA_SMEM
#define DHSA_THREAD
#define DHSA_SHARED(type, name, count) __shared__ type name[count]
// A shared array sized at launch (mx.fast.cuda_kernel's shared_memory), which may pass the
// 48 KB static limit; `count` is what the launch must give (Metal declares it statically).
#define DHSA_SHARED_SIZED(type, name, count) extern __shared__ type name[]
#define DHSA_INLINE __device__ __forceinline__
#define DHSA_UNROLL _Pragma("unroll")
#define DHSA_BARRIER() __syncthreads()
#define DHSA_WARP_SYNC() __syncwarp()
#define DHSA_INF __int_as_float(0x7f800000)

#define DHSA_MMA_M 16
#define DHSA_MMA_N 8
#define DHSA_MMA_K 16
#define DHSA_ACC_N 4     // accumulator elements per lane
#define DHSA_ACC_ROWS 2  // distinct tile rows per lane

typedef long long dhsa_long;

DHSA_INLINE float dhsa_exp2(float x) { return exp2f(x); }
DHSA_INLINE float dhsa_log2(float x) { return log2f(x); }
DHSA_INLINE float dhsa_tanh(float x) { return tanhf(x); }
// tanh for logits of T inputs: MUFU tanh.approx (rel. error < 2^-10) for bf16, whose own
// rounding of the logits is coarser; the accurate tanhf otherwise.
template <typename T>
DHSA_INLINE float dhsa_tanh_t(float x) { return tanhf(x); }
template <>
DHSA_INLINE float dhsa_tanh_t<__nv_bfloat16>(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
DHSA_INLINE float dhsa_rsqrt(float x) { return rsqrtf(x); }
DHSA_INLINE float dhsa_max(float a, float b) { return fmaxf(a, b); }
DHSA_INLINE float dhsa_shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
DHSA_INLINE bool dhsa_warp_all(bool p) { return __all_sync(0xffffffffu, p); }
DHSA_INLINE int dhsa_shfl_up_i(int v, int d) { return __shfl_up_sync(0xffffffffu, v, d); }
DHSA_INLINE int dhsa_shfl_down_i(int v, int d) { return __shfl_down_sync(0xffffffffu, v, d); }
DHSA_INLINE int dhsa_shfl_xor_i(int v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
// Larger float, larger key (for radix selection); -0.0 sorts just below +0.0.
DHSA_INLINE unsigned dhsa_order_key(float x) {
  const unsigned u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define DHSA_SHARED_ATOMIC(name, count) __shared__ int name[count]
DHSA_INLINE void dhsa_atomic_add(int* p, int v) { atomicAdd(p, v); }
DHSA_INLINE void dhsa_atomic_store(int* p, int v) { *p = v; }
DHSA_INLINE int dhsa_atomic_load(int* p) { return *reinterpret_cast<volatile int*>(p); }

// The lanes holding one accumulator row are the 4 lanes of a quad.
DHSA_INLINE float dhsa_row_max(float v) {
  v = fmaxf(v, dhsa_shfl_xor(v, 1));
  return fmaxf(v, dhsa_shfl_xor(v, 2));
}
DHSA_INLINE float dhsa_row_sum(float v) {
  v += dhsa_shfl_xor(v, 1);
  return v + dhsa_shfl_xor(v, 2);
}
DHSA_INLINE float dhsa_warp_sum(float v) {
  DHSA_UNROLL
  for (int m = 16; m > 0; m >>= 1) {
    v += dhsa_shfl_xor(v, m);
  }
  return v;
}

template <typename T>
DHSA_INLINE float dhsa_to_float(T x) { return static_cast<float>(x); }
template <typename T>
DHSA_INLINE T dhsa_from_float(float x) { return static_cast<T>(x); }

// N elements of T at src (global memory, aligned to 16 bytes or to the whole N * sizeof(T)
// when that is 4 or 8) into floats, in as few vector loads as the size allows.
template <int N, typename T>
DHSA_INLINE void dhsa_load_row(float* dst, const T* src) {
  constexpr int BYTES = N * int(sizeof(T));
  alignas(16) T tmp[N];
  if constexpr (BYTES % 16 == 0) {
    DHSA_UNROLL
    for (int i = 0; i < BYTES / 16; ++i) {
      reinterpret_cast<uint4*>(tmp)[i] = reinterpret_cast<const uint4*>(src)[i];
    }
  } else if constexpr (BYTES == 8) {
    *reinterpret_cast<uint2*>(tmp) = *reinterpret_cast<const uint2*>(src);
  } else if constexpr (BYTES == 4) {
    *reinterpret_cast<unsigned*>(tmp) = *reinterpret_cast<const unsigned*>(src);
  } else {
    DHSA_UNROLL
    for (int i = 0; i < N; ++i) {
      tmp[i] = src[i];
    }
  }
  DHSA_UNROLL
  for (int i = 0; i < N; ++i) {
    dst[i] = dhsa_to_float<T>(tmp[i]);
  }
}

// Loads that skip L1 (data other groups wrote during this launch), N floats with vector
// loads when N % 4 == 0.
DHSA_INLINE float dhsa_load_l2(const float* p) { return __ldcg(p); }
template <int N>
DHSA_INLINE void dhsa_load_row_l2(float* dst, const float* src) {
  if constexpr (N % 4 == 0) {
    DHSA_UNROLL
    for (int i = 0; i < N / 4; ++i) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(src) + i);
      dst[4 * i] = v.x;
      dst[4 * i + 1] = v.y;
      dst[4 * i + 2] = v.z;
      dst[4 * i + 3] = v.w;
    }
  } else {
    DHSA_UNROLL
    for (int i = 0; i < N; ++i) {
      dst[i] = __ldcg(src + i);
    }
  }
}
// Groups of one launch meeting in global memory: a device-wide fence and a ticket counter
// (returns the count before this group's increment) in a zeroed input of the launch.
DHSA_INLINE void dhsa_fence_device() { __threadfence(); }
DHSA_INLINE int dhsa_take_ticket(const int* p) { return atomicAdd(const_cast<int*>(p), 1); }
// Back to zero, by the group that took the last ticket: the counter serves the next launch.
DHSA_INLINE void dhsa_reset_ticket(const int* p) { atomicExch(const_cast<int*>(p), 0); }

DHSA_INLINE unsigned dhsa_smem_addr(const void* p) {
  unsigned addr;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }\n" : "=r"(addr) : "l"(p));
  return addr;
}
// 4 uint32 words at p (global memory, 16-byte aligned) into registers: one 16-byte load.
struct dhsa_words4 { unsigned x[4]; };
DHSA_INLINE dhsa_words4 dhsa_load_words4(const uint32_t* p) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  return {{v.x, v.y, v.z, v.w}};
}
template <typename T>
DHSA_INLINE void dhsa_cp16(T* dst, const T* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dhsa_smem_addr(dst)),
               "l"(src), "r"(valid ? 16 : 0));
}
// 16 bytes of T into shared memory from floats, one vector store (dhsa_qstore's).
template <typename T>
DHSA_INLINE void dhsa_st16(T* dst, const float* src) {
  constexpr int N = int(16 / sizeof(T));
  alignas(16) T tmp[N];
  DHSA_UNROLL
  for (int i = 0; i < N; ++i) {
    tmp[i] = dhsa_from_float<T>(src[i]);
  }
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(tmp);
}
DHSA_INLINE void dhsa_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
DHSA_INLINE void dhsa_cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// ---- matrix unit: m16n8k16 ------------------------------------------------------------
// Lane l = 4 g + t holds A(g, 2t..2t+1), A(g+8, ..), A(g, 2t+8..), A(g+8, 2t+8..);
// B(2t..2t+1, g), B(2t+8..2t+9, g); C(g, 2t..2t+1), C(g+8, 2t..2t+1).
template <typename T>
struct dhsa_afrag { unsigned x[4]; };
template <>
struct dhsa_afrag<float> { float x[8]; };
template <typename T>
struct dhsa_bfrag { unsigned x[2]; };
template <>
struct dhsa_bfrag<float> { float x[4]; };
struct dhsa_acc { float x[4]; };

DHSA_INLINE int dhsa_acc_row(int lane, int i) { return (lane >> 2) + ((i >> 1) << 3); }
DHSA_INLINE int dhsa_acc_col(int lane, int i) { return ((lane & 3) << 1) + (i & 1); }
DHSA_INLINE int dhsa_acc_rslot(int i) { return i >> 1; }

template <typename T>
DHSA_INLINE unsigned dhsa_ld32(const T* p) { return *reinterpret_cast<const unsigned*>(p); }

template <typename T>
DHSA_INLINE void dhsa_load_a(dhsa_afrag<T>& a, const T* p, int ld, int lane) {
  const int r = lane >> 2, c = (lane & 3) << 1;
  a.x[0] = dhsa_ld32(p + r * ld + c);
  a.x[1] = dhsa_ld32(p + (r + 8) * ld + c);
  a.x[2] = dhsa_ld32(p + r * ld + c + 8);
  a.x[3] = dhsa_ld32(p + (r + 8) * ld + c + 8);
}
DHSA_INLINE void dhsa_load_a(dhsa_afrag<float>& a, const float* p, int ld, int lane) {
  const int r = lane >> 2, c = (lane & 3) << 1;
  a.x[0] = p[r * ld + c];
  a.x[1] = p[r * ld + c + 1];
  a.x[2] = p[(r + 8) * ld + c];
  a.x[3] = p[(r + 8) * ld + c + 1];
  a.x[4] = p[r * ld + c + 8];
  a.x[5] = p[r * ld + c + 9];
  a.x[6] = p[(r + 8) * ld + c + 8];
  a.x[7] = p[(r + 8) * ld + c + 9];
}

// B(k, n) = p[k * ld + n], p in shared memory, rows 16-byte aligned: ldmatrix.trans.
template <typename T>
DHSA_INLINE void dhsa_load_b(dhsa_bfrag<T>& b, const T* p, int ld, int lane) {
  const T* row = p + (lane & 15) * ld;
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(b.x[0]), "=r"(b.x[1])
               : "r"(dhsa_smem_addr(row)));
}
DHSA_INLINE void dhsa_load_b(dhsa_bfrag<float>& b, const float* p, int ld, int lane) {
  const int n = lane >> 2, k = (lane & 3) << 1;
  b.x[0] = p[k * ld + n];
  b.x[1] = p[(k + 1) * ld + n];
  b.x[2] = p[(k + 8) * ld + n];
  b.x[3] = p[(k + 9) * ld + n];
}

// B(k, n) = p[n * ld + k]
template <typename T>
DHSA_INLINE void dhsa_load_bt(dhsa_bfrag<T>& b, const T* p, int ld, int lane) {
  const int n = lane >> 2, k = (lane & 3) << 1;
  b.x[0] = dhsa_ld32(p + n * ld + k);
  b.x[1] = dhsa_ld32(p + n * ld + k + 8);
}
DHSA_INLINE void dhsa_load_bt(dhsa_bfrag<float>& b, const float* p, int ld, int lane) {
  const int n = lane >> 2, k = (lane & 3) << 1;
  b.x[0] = p[n * ld + k];
  b.x[1] = p[n * ld + k + 1];
  b.x[2] = p[n * ld + k + 8];
  b.x[3] = p[n * ld + k + 9];
}

DHSA_INLINE void dhsa_mma(dhsa_acc& d, const dhsa_afrag<__nv_bfloat16>& a,
                          const dhsa_bfrag<__nv_bfloat16>& b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d.x[0]), "+f"(d.x[1]), "+f"(d.x[2]), "+f"(d.x[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
}
DHSA_INLINE void dhsa_mma(dhsa_acc& d, const dhsa_afrag<__half>& a, const dhsa_bfrag<__half>& b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d.x[0]), "+f"(d.x[1]), "+f"(d.x[2]), "+f"(d.x[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
}
// fp32: the same product, exact, with operands fetched from the lanes that hold them.
DHSA_INLINE void dhsa_mma(dhsa_acc& d, const dhsa_afrag<float>& a, const dhsa_bfrag<float>& b) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  DHSA_UNROLL
  for (int k = 0; k < 16; ++k) {
    const int src = (k & 7) >> 1, e = k & 1, h = k >> 3;
    const float a_lo = __shfl_sync(0xffffffffu, a.x[h * 4 + e], g * 4 + src);
    const float a_hi = __shfl_sync(0xffffffffu, a.x[h * 4 + 2 + e], g * 4 + src);
    const float b0 = __shfl_sync(0xffffffffu, b.x[h * 2 + e], (2 * t) * 4 + src);
    const float b1 = __shfl_sync(0xffffffffu, b.x[h * 2 + e], (2 * t + 1) * 4 + src);
    d.x[0] = fmaf(a_lo, b0, d.x[0]);
    d.x[1] = fmaf(a_lo, b1, d.x[1]);
    d.x[2] = fmaf(a_hi, b0, d.x[2]);
    d.x[3] = fmaf(a_hi, b1, d.x[3]);
  }
}

template <typename T>
DHSA_INLINE unsigned dhsa_pack2(float lo, float hi);
template <>
DHSA_INLINE unsigned dhsa_pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
template <>
DHSA_INLINE unsigned dhsa_pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

// s[0], s[1]: accumulators of columns 0-7 and 8-15 of a 16-wide strip (DHSA_MMA_K / DHSA_MMA_N = 2).
template <typename T>
DHSA_INLINE void dhsa_p_to_a(dhsa_afrag<T>& a, const dhsa_acc* s) {
  a.x[0] = dhsa_pack2<T>(s[0].x[0], s[0].x[1]);
  a.x[1] = dhsa_pack2<T>(s[0].x[2], s[0].x[3]);
  a.x[2] = dhsa_pack2<T>(s[1].x[0], s[1].x[1]);
  a.x[3] = dhsa_pack2<T>(s[1].x[2], s[1].x[3]);
}
DHSA_INLINE void dhsa_p_to_a(dhsa_afrag<float>& a, const dhsa_acc* s) {
  DHSA_UNROLL
  for (int i = 0; i < 4; ++i) {
    a.x[i] = s[0].x[i];
    a.x[4 + i] = s[1].x[i];
  }
}
