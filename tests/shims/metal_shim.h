// A small stand-in for the Metal standard library, so that host clang++ can type-check the
// Metal sources MLX generates (`clang++ -fsyntax-only -include metal_shim.h`). It declares
// only what MLX's generated signatures and metal/prelude_metal.h use; a name missing here
// (a typo on the Metal side, say) fails the check. Semantics are not modelled.
#pragma once

// No system headers: the check runs for an aarch64 target (for _Float16) without its libc.
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
#define INFINITY __builtin_huge_valf()

#define device
#define constant
#define threadgroup
#define thread
#define kernel

typedef unsigned int uint;
typedef unsigned short ushort;
typedef _Float16 half;
typedef half float16_t;
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  bfloat(float) {}
  operator float() const { return 0.0f; }
};
typedef bfloat bfloat16_t;

template <typename T, int N>
struct vec;
template <typename T>
struct vec<T, 2> {
  T x, y;
  T& operator[](int i) { return i ? y : x; }
};
template <typename T>
struct vec<T, 3> {
  T x, y, z;
};
template <typename T>
struct vec<T, 4> {
  T x, y, z, w;
};
typedef vec<float, 2> float2;
typedef vec<float, 4> float4;
typedef vec<uint, 3> uint3;
typedef vec<short, 2> short2;

template <typename To, typename From>
To as_type(From);

namespace metal {
using ::float2;
using ::float4;
using ::uint3;
template <typename T, int N>
using vec = ::vec<T, N>;

enum class mem_flags { mem_none, mem_device, mem_threadgroup };
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);

float simd_shuffle_xor(float, ushort);
int simd_shuffle_xor(int, ushort);
int simd_shuffle_up(int, ushort);
int simd_shuffle_down(int, ushort);
float simd_sum(float);
bool simd_all(bool);
float max(float, float);
float min(float, float);
float exp2(float);
float log2(float);
float tanh(float);
float rsqrt(float);
enum memory_order { memory_order_relaxed, memory_order_seq_cst };
enum thread_scope { thread_scope_threadgroup, thread_scope_device };
void atomic_thread_fence(mem_flags, memory_order, thread_scope);
struct atomic_int {
  int value;
};
int atomic_fetch_add_explicit(threadgroup atomic_int*, int, memory_order);
void atomic_store_explicit(threadgroup atomic_int*, int, memory_order);
int atomic_load_explicit(threadgroup atomic_int*, memory_order);
namespace precise {
float exp2(float);
float log2(float);
float tanh(float);
float rsqrt(float);
}  // namespace precise

template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  vec<T, 2>& thread_elements();
};
template <typename T, int M, int N, int K>
void simdgroup_multiply_accumulate(simdgroup_matrix<T, N, M>& d,
                                   const simdgroup_matrix<T, K, M>& a,
                                   const simdgroup_matrix<T, N, K>& b,
                                   const simdgroup_matrix<T, N, M>& c);
}  // namespace metal
