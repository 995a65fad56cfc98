// An executable stand-in for the Metal built-ins that MLX's generated kernel source and
// metal/prelude_metal.h use, so that the source MLX would compile for a kernel runs on the
// host CPU (tests/metal_emulator drives it). What it models, because Metal bugs hide there:
// - threadgroups of N threads as cooperative fibers on one OS thread, groups one
//   after another; `threadgroup` variables are one block of memory per group, poisoned
//   (0xFF bytes: NaN floats, -1 ints) before each group, at most 32 KB;
// - threadgroup_barrier: every live thread of the group must arrive (an exited thread, or
//   threads stuck at different barriers, is an error);
// - 32-lane simd-groups: shuffles, reductions, simd_all and simdgroup_barrier run when every
//   lane of the simd-group that can still run has reached one; lanes elsewhere are inactive
//   for it (Metal's divergence), and reading an inactive lane is an error;
// - simdgroup_matrix<float, 8, 8>: lane l holds elements (fm, fn), (fm, fn + 1) with MLX's
//   layout (mlx/backend/metal/kernels/steel/gemm/mma.h, BaseMMAFrag::get_coord); multiply-
//   accumulate needs all 32 lanes; simdgroup_load/store with Metal's transpose flag;
// - device buffers as bounds-checked views (emu::dptr): a read or write outside the buffer
//   MLX would bind stops the launch with the offset and the buffer's size;
// - half and bfloat as 16-bit storage with round-to-nearest-even conversions.
// Nothing here is used on a GPU.
#pragma once

#if !(defined(__x86_64__) && defined(__ELF__)) || defined(EMU_UCONTEXT)
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 600  // macOS declares the ucontext calls only with it
#endif
#include <ucontext.h>
#endif

// C headers only: they parse in a fraction of the time of <cmath> / <vector>, and every
// kernel instantiation is a translation unit of its own.
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef INFINITY
#define INFINITY __builtin_huge_valf()
#endif

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

namespace emu {

[[noreturn]] inline void fail(const char* fmt, ...);

// ---- 16-bit floats ---------------------------------------------------------------------
inline uint32_t f2u(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = f2u(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t mag = x & 0x7fffffffu;
  if (mag >= 0x7f800000u) {  // inf or nan
    return uint16_t(sign | 0x7c00u | (mag > 0x7f800000u ? 0x200u | ((mag >> 13) & 0x3ffu) : 0));
  }
  if (mag >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    return uint16_t(sign | 0x7c00u);
  }
  if (mag < 0x38800000u) {  // subnormal half (or zero): round |f| / 2^-24 to an integer
    const float a = u2f(mag) * 16777216.0f;  // exact: a power of two
    return uint16_t(sign | uint32_t(nearbyintf(a)));
  }
  const uint32_t lsb = (mag >> 13) & 1u;
  mag += 0xfffu + lsb;  // round to nearest even on the 13 dropped bits
  return uint16_t(sign | ((mag - 0x38000000u) >> 13));
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = float(m) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  if (e == 31) {
    return u2f(sign | 0x7f800000u | (m << 13));
  }
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}
inline uint16_t float_to_bfloat_bits(float f) {
  const uint32_t x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    return uint16_t((x >> 16) | 0x40u);  // quiet nan
  }
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Arithmetic promotes to float (the kernels convert to float before computing).
struct half_t {
  uint16_t bits;
  half_t() = default;
  template <typename U, typename = decltype(float(U()))>
  half_t(U v) : bits(float_to_half_bits(float(v))) {}
  operator float() const { return half_bits_to_float(bits); }
};
struct bfloat_t {
  uint16_t bits;
  bfloat_t() = default;
  template <typename U, typename = decltype(float(U()))>
  bfloat_t(U v) : bits(float_to_bfloat_bits(float(v))) {}
  operator float() const { return u2f(uint32_t(bits) << 16); }
};

// ---- bounds-checked device memory ------------------------------------------------------
// A pointer into one buffer: arithmetic is free (as C pointers), every access is checked.
template <typename T>
struct dptr {
  T* p = nullptr;
  const char* lo = nullptr;  // the buffer, in bytes
  const char* hi = nullptr;
  const char* name = "?";

  dptr() = default;
  dptr(T* p_, const char* lo_, const char* hi_, const char* name_)
      : p(p_), lo(lo_), hi(hi_), name(name_) {}
  template <typename U>  // T* from U*: adding const
  dptr(const dptr<U>& o) : p(o.p), lo(o.lo), hi(o.hi), name(o.name) {}
  T* check(long i) const {
    const char* a = reinterpret_cast<const char*>(p + i);
    if (a < lo || a + sizeof(T) > hi) {
      fail("out-of-bounds access to device buffer '%s': byte offset %ld, element size %d, "
           "buffer %ld bytes", name, long(a - lo), int(sizeof(T)), long(hi - lo));
    }
    return p + i;
  }
  T& operator[](long i) const { return *check(i); }
  T& operator*() const { return *check(0); }
  T* operator->() const { return check(0); }
  dptr operator+(long i) const { return dptr(p + i, lo, hi, name); }
  dptr operator-(long i) const { return dptr(p - i, lo, hi, name); }
  long operator-(const dptr& o) const { return long(p - o.p); }
  dptr& operator+=(long i) { p += i; return *this; }
  dptr& operator-=(long i) { p -= i; return *this; }
  dptr& operator++() { ++p; return *this; }
  dptr operator++(int) { dptr t = *this; ++p; return t; }
  bool operator==(const dptr& o) const { return p == o.p; }
  bool operator!=(const dptr& o) const { return p != o.p; }
  bool operator<(const dptr& o) const { return p < o.p; }
};
template <typename T>
dptr<T> operator+(long i, const dptr<T>& d) { return d + i; }

// `(device V*)(p)` in the kernel text: the same bytes viewed as V.
template <typename V, typename U>
dptr<V> dptr_cast(const dptr<U>& o) {
  return dptr<V>(reinterpret_cast<V*>(const_cast<char*>(reinterpret_cast<const char*>(o.p))),
                 o.lo, o.hi, o.name);
}

// ---- vectors --------------------------------------------------------------------------
template <typename T, int N>
struct vec;
template <typename T>
struct vec<T, 2> {
  T x, y;
  vec() = default;
  vec(T a, T b) : x(a), y(b) {}
  explicit vec(T a) : x(a), y(a) {}
  T& operator[](int i) { return i ? y : x; }
  const T& operator[](int i) const { return i ? y : x; }
};
template <typename T>
struct vec<T, 3> {
  T x, y, z;
  vec() = default;
  vec(T a, T b, T c) : x(a), y(b), z(c) {}
  explicit vec(T a) : x(a), y(a), z(a) {}
  T& operator[](int i) { return i == 0 ? x : i == 1 ? y : z; }
};
template <typename T>
struct alignas(sizeof(T) * 4) vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  explicit vec(T a) : x(a), y(a), z(a), w(a) {}
  T& operator[](int i) { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
};


// ---- fiber contexts ---------------------------------------------------------------------
// x86-64 (ELF): a switch that saves the callee-saved registers and the FP control words, no
// system call (ucontext's swapcontext makes two: a launch switches millions of times).
// Elsewhere: ucontext.
#if defined(__x86_64__) && defined(__ELF__) && !defined(EMU_UCONTEXT)
extern "C" void emu_ctx_switch(void** save_sp, void* next_sp);
asm(R"(
.text
.p2align 4
.hidden emu_ctx_switch
.globl emu_ctx_switch
.type emu_ctx_switch,@function
emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_ctx_switch, .-emu_ctx_switch
)");
struct Context {
  void* sp = nullptr;
};
inline void ctx_switch(Context& from, Context& to) { emu_ctx_switch(&from.sp, to.sp); }
// A context that starts entry() on [stack, stack + size) at its first switch.
inline void ctx_make(Context& c, char* stack, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  uint64_t* slot = reinterpret_cast<uint64_t*>(top - 16);  // entry sees rsp = 8 mod 16
  slot[0] = reinterpret_cast<uint64_t>(entry);
  slot[1] = 0;
  uint64_t* sp = slot - 7;  // r15 r14 r13 r12 rbx rbp, below them the control words
  for (int i = 1; i < 7; ++i) {
    sp[i] = 0;
  }
  const uint32_t mxcsr = 0x1f80, fpucw = 0x037f;
  sp[0] = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void ctx_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void ctx_make(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// ---- the launch: fibers, groups, simd-groups -------------------------------------------
enum State { RUNNABLE, AT_BARRIER, AT_SIMD, DONE };
enum SimdOp {
  OP_NONE, OP_SHUFFLE, OP_SHUFFLE_XOR, OP_SHUFFLE_UP, OP_SHUFFLE_DOWN, OP_BROADCAST,
  OP_SUM, OP_MAX, OP_MIN, OP_ALL, OP_ANY, OP_BARRIER, OP_MMA, OP_PREFIX_EX, OP_PREFIX_IN
};

struct Thread {
  Context ctx;
  State state = DONE;
  // Metal's thread attributes
  vec<uint, 3> thread_position_in_grid, thread_position_in_threadgroup,
      threadgroup_position_in_grid, threads_per_threadgroup, threadgroups_per_grid,
      threads_per_grid, grid_size, grid_origin, dispatch_threads_per_threadgroup;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup,
      simdgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width,
      quadgroup_index_in_threadgroup, thread_index_in_quadgroup, quadgroups_per_threadgroup,
      dispatch_simdgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup;
  // simd collective in progress
  int op = OP_NONE;
  int is_int = 0;
  double in[6];
  long arg = 0;
  double out[2];
  int barrier_site = 0;
};

struct Launch {
  Thread threads[1024];  // of the current group
  int n = 0;                    // threads in the current group
  int cur = -1;                 // running fiber, -1: scheduler
  Context sched;
  char error[1024] = {0};
  bool failed = false;
  // threadgroup memory
  alignas(64) char arena[64 * 1024];
  size_t arena_used = 0;
  const void* var_tag[256];
  size_t var_off[256];
  int n_vars = 0;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};

inline Launch* L = nullptr;

inline Thread& self() { return L->threads[L->cur]; }

// Back to the scheduler until it resumes this fiber.
inline void yield_to_scheduler() {
  ctx_switch(self().ctx, L->sched);
}

inline void set_error_v(const char* fmt, va_list ap) {
  if (L->failed) {
    return;
  }
  int k = 0;
  if (L->cur >= 0) {
    const Thread& t = self();
    k = snprintf(L->error, sizeof(L->error), "group (%u, %u, %u) thread %u: ",
                      t.threadgroup_position_in_grid.x, t.threadgroup_position_in_grid.y,
                      t.threadgroup_position_in_grid.z, t.thread_index_in_threadgroup);
  }
  vsnprintf(L->error + k, sizeof(L->error) - k, fmt, ap);
  L->failed = true;
}
inline void set_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  set_error_v(fmt, ap);
  va_end(ap);
}

// Stops the launch (from a kernel thread): the fiber is never resumed.
[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  set_error_v(fmt, ap);
  va_end(ap);
  if (L->cur >= 0) {
    self().state = DONE;
    ctx_switch(self().ctx, L->sched);
  }
  abort();  // not reached
}

// One `threadgroup` variable of this group: the first thread to declare it allocates it.
inline void* tg_var(const void* tag, size_t size, size_t align) {
  for (int i = 0; i < L->n_vars; ++i) {
    if (L->var_tag[i] == tag) {
      return L->arena + L->var_off[i];
    }
  }
  size_t off = (L->arena_used + align - 1) / align * align;
  if (off + size > 32768) {
    fail("threadgroup memory of %zu bytes exceeds Metal's 32768", off + size);
  }
  if (L->n_vars == 256) {
    fail("more than 256 threadgroup variables");
  }
  L->var_tag[L->n_vars] = tag;
  L->var_off[L->n_vars++] = off;
  L->arena_used = off + size;
  return L->arena + off;
}

inline void barrier(int site) {
  Thread& t = self();
  t.state = AT_BARRIER;
  t.barrier_site = site;
  yield_to_scheduler();
}

// A simd collective: deposit this lane's input, wait until the simd-group has run it.
inline void simd_collective(int op, const double* in, int n_in, long arg, int is_int) {
  Thread& t = self();
  t.op = op;
  t.arg = arg;
  t.is_int = is_int;
  for (int i = 0; i < n_in; ++i) {
    t.in[i] = in[i];
  }
  t.state = AT_SIMD;
  yield_to_scheduler();
}



// Runs one simd collective for the lanes of simd-group [first, first + width) waiting at
// `op` (the lanes not waiting at it are inactive for it). False: an error was set.
inline bool run_collective(int first, int width, int op) {
  Thread* lane[32];
  bool active[32];
  int n_active = 0;
  for (int l = 0; l < 32; ++l) {
    lane[l] = l < width ? &L->threads[first + l] : nullptr;
    active[l] = l < width && lane[l]->state == AT_SIMD && lane[l]->op == op;
    n_active += active[l];
  }
  const int sg = first / 32;
  auto take = [&](int l, int src, double& out) {
    if (src < 0 || src >= 32 || !active[src]) {
      set_error("group (%u, %u, %u) simdgroup %d: lane %d reads lane %d, which is %s",
                lane[l]->threadgroup_position_in_grid.x, lane[l]->threadgroup_position_in_grid.y,
                lane[l]->threadgroup_position_in_grid.z, sg, l, src,
                src < 0 || src >= 32 ? "not a lane" : "inactive (diverged or exited)");
      return false;
    }
    out = lane[src]->in[0];
    return true;
  };
  double red = 0.0;
  bool red_is_int = false;
  if (op == OP_SUM || op == OP_MAX || op == OP_MIN || op == OP_ALL || op == OP_ANY) {
    bool first_lane = true;
    float fr = 0.0f;
    for (int l = 0; l < 32; ++l) {
      if (!active[l]) {
        continue;
      }
      const double x = lane[l]->in[0];
      red_is_int = lane[l]->is_int;
      if (first_lane) {
        red = x;
        fr = float(x);
        first_lane = false;
      } else if (op == OP_SUM) {
        red += x;
        fr += float(x);  // float sums accumulate in float
      } else if (op == OP_MAX) {
        red = x > red ? x : red;
      } else if (op == OP_MIN) {
        red = x < red ? x : red;
      } else if (op == OP_ALL) {
        red = (red != 0.0 && x != 0.0) ? 1.0 : 0.0;
      } else {
        red = (red != 0.0 || x != 0.0) ? 1.0 : 0.0;
      }
    }
    if (op == OP_SUM && !red_is_int) {
      red = fr;
    }
  }
  if (op == OP_MMA) {
    if (n_active != 32) {
      set_error("simdgroup_multiply_accumulate with %d active lanes (needs all 32) in "
                "simdgroup %d", n_active, sg);
      return false;
    }
    float a[8][8], b[8][8], c[8][8];
    for (int l = 0; l < 32; ++l) {
      const int r = ((l >> 2) & 4) + ((l >> 1) & 3), col = ((l >> 2) & 2) * 2 + (l & 1) * 2;
      for (int i = 0; i < 2; ++i) {
        a[r][col + i] = float(lane[l]->in[i]);
        b[r][col + i] = float(lane[l]->in[2 + i]);
        c[r][col + i] = float(lane[l]->in[4 + i]);
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int r = ((l >> 2) & 4) + ((l >> 1) & 3), col = ((l >> 2) & 2) * 2 + (l & 1) * 2;
      for (int i = 0; i < 2; ++i) {
        float d = c[r][col + i];
        for (int k = 0; k < 8; ++k) {
          d += a[r][k] * b[k][col + i];
        }
        lane[l]->out[i] = d;
      }
    }
  }
  double prefix = 0.0;
  float fprefix = 0.0f;
  for (int l = 0; l < 32; ++l) {
    if (!active[l]) {
      continue;
    }
    Thread& t = *lane[l];
    const long arg = t.arg;
    switch (op) {
      case OP_SHUFFLE:
      case OP_BROADCAST:
        if (!take(l, int(arg), t.out[0])) return false;
        break;
      case OP_SHUFFLE_XOR:
        if (!take(l, l ^ int(arg), t.out[0])) return false;
        break;
      case OP_SHUFFLE_UP:  // the lower `arg` lanes keep their value
        if (l - arg < 0) t.out[0] = t.in[0];
        else if (!take(l, l - int(arg), t.out[0])) return false;
        break;
      case OP_SHUFFLE_DOWN:  // the upper `arg` lanes keep their value
        if (l + arg >= 32) t.out[0] = t.in[0];
        else if (!take(l, l + int(arg), t.out[0])) return false;
        break;
      case OP_SUM: case OP_MAX: case OP_MIN: case OP_ALL: case OP_ANY:
        t.out[0] = red;
        break;
      case OP_PREFIX_EX:
      case OP_PREFIX_IN:
        if (op == OP_PREFIX_IN) { prefix += t.in[0]; fprefix += float(t.in[0]); }
        t.out[0] = t.is_int ? prefix : double(fprefix);
        if (op == OP_PREFIX_EX) { prefix += t.in[0]; fprefix += float(t.in[0]); }
        break;
      default:
        break;
    }
  }
  for (int l = 0; l < 32; ++l) {
    if (active[l]) {
      lane[l]->state = RUNNABLE;
      lane[l]->op = OP_NONE;
    }
  }
  return true;
}

inline void fiber_main() {
  L->body(L->body_arg);
  self().state = DONE;
  ctx_switch(self().ctx, L->sched);  // never resumed
  abort();
}

constexpr size_t kStack = 256 * 1024;

// Runs the threads of the current group to completion. False: an error was set.
inline bool run_group() {
  const int n = L->n;
  for (;;) {
    for (int i = 0; i < n; ++i) {
      if (L->threads[i].state == RUNNABLE) {
        L->cur = i;
        ctx_switch(L->sched, L->threads[i].ctx);
        L->cur = -1;
        if (L->failed) {
          return false;
        }
      }
    }
    bool progressed = false;
    for (int first = 0; first < n; first += 32) {
      const int width = n - first < 32 ? n - first : 32;
      int op = OP_NONE;
      for (int l = 0; l < width && op == OP_NONE; ++l) {
        const Thread& t = L->threads[first + l];
        op = t.state == AT_SIMD ? t.op : OP_NONE;
      }
      if (op != OP_NONE) {
        if (!run_collective(first, width, op)) {
          return false;
        }
        progressed = true;
      }
    }
    if (progressed) {
      continue;
    }
    int waiting = 0, done = 0, site = -1;
    for (int i = 0; i < n; ++i) {
      const Thread& t = L->threads[i];
      if (t.state == DONE) {
        ++done;
      } else if (t.state == AT_BARRIER) {
        if (waiting++ == 0) {
          site = t.barrier_site;
        } else if (t.barrier_site != site) {
          set_error("group (%u, %u, %u): threads wait at different threadgroup_barriers "
                    "(lines %d and %d)", t.threadgroup_position_in_grid.x,
                    t.threadgroup_position_in_grid.y, t.threadgroup_position_in_grid.z, site,
                    t.barrier_site);
          return false;
        }
      }
    }
    if (waiting == 0) {
      return true;
    }
    if (done > 0) {
      const Thread& t = L->threads[0];
      set_error("group (%u, %u, %u): %d threads wait at a threadgroup_barrier (line %d) that "
                "%d exited threads never reach", t.threadgroup_position_in_grid.x,
                t.threadgroup_position_in_grid.y, t.threadgroup_position_in_grid.z, waiting,
                site, done);
      return false;
    }
    for (int i = 0; i < n; ++i) {
      L->threads[i].state = RUNNABLE;
    }
  }
}

// One dispatchThreads(grid, threadgroup) as MLX's CustomKernel issues it: group dims
// min(threadgroup, grid) per axis, edge groups cut to the grid.
inline int run_launch(const int* grid, const int* tgs, void (*body)(void*), void* arg,
                      char* err, int errlen) {
  Launch* launch = new Launch();
  L = launch;
  launch->body = body;
  launch->body_arg = arg;
  int t[3], ng[3];
  for (int a = 0; a < 3; ++a) {
    t[a] = tgs[a] < grid[a] ? tgs[a] : grid[a];
    if (t[a] < 1) t[a] = 1;
    ng[a] = (grid[a] + t[a] - 1) / t[a];
  }
  int rc = 0;
  const int nt = t[0] * t[1] * t[2];
  if (nt > 1024) {
    set_error("threadgroup of %d threads exceeds Metal's 1024", nt);
    rc = 1;
  }
  if (rc == 0 && (grid[0] <= 0 || grid[1] <= 0 || grid[2] <= 0)) {
    rc = 0;  // nothing to run
    ng[0] = 0;
  }
  char* stacks = rc == 0 ? static_cast<char*>(malloc(size_t(nt) * kStack)) : nullptr;
  for (int gz = 0; gz < ng[2] && rc == 0; ++gz) {
    for (int gy = 0; gy < ng[1] && rc == 0; ++gy) {
      for (int gx = 0; gx < ng[0] && rc == 0; ++gx) {
        const int g[3] = {gx, gy, gz};
        int a[3];
        for (int k = 0; k < 3; ++k) {
          a[k] = grid[k] - g[k] * t[k] < t[k] ? grid[k] - g[k] * t[k] : t[k];
        }
        const int n = a[0] * a[1] * a[2];
        launch->n = n;
        memset(launch->arena, 0xff, sizeof(launch->arena));
        launch->n_vars = 0;
        launch->arena_used = 0;
        for (int i = 0; i < n; ++i) {
          Thread& th = launch->threads[i];
          const uint x = uint(i % a[0]), y = uint(i / a[0] % a[1]), z = uint(i / (a[0] * a[1]));
          th.thread_position_in_threadgroup = {x, y, z};
          th.threadgroup_position_in_grid = {uint(gx), uint(gy), uint(gz)};
          th.thread_position_in_grid = {uint(gx * t[0]) + x, uint(gy * t[1]) + y,
                                        uint(gz * t[2]) + z};
          th.threads_per_threadgroup = {uint(a[0]), uint(a[1]), uint(a[2])};
          th.dispatch_threads_per_threadgroup = {uint(t[0]), uint(t[1]), uint(t[2])};
          th.threadgroups_per_grid = {uint(ng[0]), uint(ng[1]), uint(ng[2])};
          th.threads_per_grid = {uint(grid[0]), uint(grid[1]), uint(grid[2])};
          th.grid_size = th.threads_per_grid;
          th.grid_origin = {0, 0, 0};
          th.thread_index_in_threadgroup = uint(i);
          th.thread_index_in_simdgroup = uint(i % 32);
          th.simdgroup_index_in_threadgroup = uint(i / 32);
          th.simdgroups_per_threadgroup = uint((n + 31) / 32);
          th.dispatch_simdgroups_per_threadgroup = uint((nt + 31) / 32);
          th.threads_per_simdgroup = 32;
          th.thread_execution_width = 32;
          th.quadgroup_index_in_threadgroup = uint(i / 4);
          th.thread_index_in_quadgroup = uint(i % 4);
          th.quadgroups_per_threadgroup = uint((n + 3) / 4);
          th.dispatch_quadgroups_per_threadgroup = uint((nt + 3) / 4);
          th.op = OP_NONE;
          ctx_make(th.ctx, stacks + size_t(i) * kStack, kStack, fiber_main);
          th.state = RUNNABLE;
        }
        if (!run_group()) {
          rc = 1;
        }
      }
    }
  }
  if (rc) {
    snprintf(err, errlen, "%s", launch->error);
  }
  free(stacks);
  L = nullptr;
  delete launch;
  return rc;
}
}  // namespace emu

// ---- Metal names ------------------------------------------------------------------------
typedef emu::half_t half;
typedef half float16_t;
typedef emu::bfloat_t bfloat;
typedef bfloat bfloat16_t;

template <typename T, int N>
using vec = emu::vec<T, N>;
typedef vec<float, 2> float2;
typedef vec<float, 3> float3;
typedef vec<float, 4> float4;
typedef vec<half, 2> half2;
typedef vec<half, 4> half4;
typedef vec<int, 2> int2;
typedef vec<int, 3> int3;
typedef vec<int, 4> int4;
typedef vec<uint, 2> uint2;
typedef vec<uint, 3> uint3;
typedef vec<uint, 4> uint4;
typedef vec<short, 2> short2;
typedef vec<unsigned long, 2> ulong2;

template <typename To, typename From>
inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  To y;
  memcpy(&y, &x, sizeof(To));
  return y;
}

namespace metal {
using ::float2;
using ::float4;
using ::uint3;
template <typename T, int N>
using vec = ::vec<T, N>;

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

#define threadgroup_barrier(flags) emu_threadgroup_barrier(flags, __LINE__)
inline void emu_threadgroup_barrier(mem_flags, int line) { emu::barrier(line); }
inline void simdgroup_barrier(mem_flags) {
  emu::simd_collective(emu::OP_BARRIER, nullptr, 0, 0, 0);
}

template <typename T>
inline T emu_simd(int op, T v, long arg) {
  const double in = double(v);
  const int is_int = T(0.5) == T(0);
  emu::simd_collective(op, &in, 1, arg, is_int);
  return T(emu::self().out[0]);
}
template <typename T>
inline T simd_shuffle(T v, ushort lane) { return emu_simd(emu::OP_SHUFFLE, v, lane); }
template <typename T>
inline T simd_broadcast(T v, ushort lane) { return emu_simd(emu::OP_BROADCAST, v, lane); }
template <typename T>
inline T simd_shuffle_xor(T v, ushort mask) { return emu_simd(emu::OP_SHUFFLE_XOR, v, mask); }
template <typename T>
inline T simd_shuffle_up(T v, ushort d) { return emu_simd(emu::OP_SHUFFLE_UP, v, d); }
template <typename T>
inline T simd_shuffle_down(T v, ushort d) { return emu_simd(emu::OP_SHUFFLE_DOWN, v, d); }
template <typename T>
inline T simd_sum(T v) { return emu_simd(emu::OP_SUM, v, 0); }
template <typename T>
inline T simd_max(T v) { return emu_simd(emu::OP_MAX, v, 0); }
template <typename T>
inline T simd_min(T v) { return emu_simd(emu::OP_MIN, v, 0); }
template <typename T>
inline T simd_prefix_exclusive_sum(T v) { return emu_simd(emu::OP_PREFIX_EX, v, 0); }
template <typename T>
inline T simd_prefix_inclusive_sum(T v) { return emu_simd(emu::OP_PREFIX_IN, v, 0); }
inline bool simd_all(bool p) { return emu_simd<int>(emu::OP_ALL, p, 0) != 0; }
inline bool simd_any(bool p) { return emu_simd<int>(emu::OP_ANY, p, 0) != 0; }

inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline float exp2(float x) { return exp2f(x); }
inline float exp(float x) { return expf(x); }
inline float log2(float x) { return log2f(x); }
inline float log(float x) { return logf(x); }
inline float tanh(float x) { return tanhf(x); }
inline float sqrt(float x) { return sqrtf(x); }
inline float rsqrt(float x) { return 1.0f / sqrtf(x); }
inline float abs(float x) { return fabsf(x); }
inline float fma(float a, float b, float c) { return fmaf(a, b, c); }
namespace precise {
inline float exp2(float x) { return exp2f(x); }
inline float exp(float x) { return expf(x); }
inline float log2(float x) { return log2f(x); }
inline float tanh(float x) { return tanhf(x); }
inline float sqrt(float x) { return sqrtf(x); }
inline float rsqrt(float x) { return 1.0f / sqrtf(x); }
}  // namespace precise
namespace fast = precise;

// Atomics: fibers run one at a time, so plain memory operations are atomic.
enum memory_order { memory_order_relaxed, memory_order_seq_cst };
enum thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup,
                    thread_scope_device };
inline void atomic_thread_fence(mem_flags, memory_order, thread_scope = thread_scope_device) {}
template <typename T>
struct atomic {
  T value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;

template <typename T>
inline T atomic_fetch_add_explicit(atomic<T>* p, T v, memory_order) {
  const T old = p->value;
  p->value = old + v;
  return old;
}
template <typename T>
inline T atomic_fetch_add_explicit(emu::dptr<atomic<T>> p, T v, memory_order) {
  return atomic_fetch_add_explicit(&*p, v, memory_order_relaxed);
}
template <typename T>
inline void atomic_store_explicit(atomic<T>* p, T v, memory_order) { p->value = v; }
template <typename T>
inline void atomic_store_explicit(emu::dptr<atomic<T>> p, T v, memory_order) { (*p).value = v; }
template <typename T>
inline T atomic_load_explicit(atomic<T>* p, memory_order) { return p->value; }
template <typename T>
inline T atomic_load_explicit(emu::dptr<atomic<T>> p, memory_order) { return (*p).value; }

// ---- simdgroup_matrix -------------------------------------------------------------------
// Lane l holds row fm, columns fn and fn + 1 (MLX steel's BaseMMAFrag::get_coord).
inline int emu_frag_row(int l) { return ((l >> 2) & 4) + ((l >> 1) & 3); }
inline int emu_frag_col(int l) { return ((l >> 2) & 2) * 2 + (l & 1) * 2; }

template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "only 8 x 8 simdgroup matrices are modelled");
  vec<T, 2> e;
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T v) {  // Metal: v on the diagonal
    const int l = int(emu::self().thread_index_in_simdgroup);
    const int r = emu_frag_row(l), c = emu_frag_col(l);
    e.x = r == c ? v : T(0);
    e.y = r == c + 1 ? v : T(0);
  }
  vec<T, 2>& thread_elements() { return e; }
  const vec<T, 2>& thread_elements() const { return e; }
};

template <typename T>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d,
                                          const simdgroup_matrix<T, 8, 8>& a,
                                          const simdgroup_matrix<T, 8, 8>& b,
                                          const simdgroup_matrix<T, 8, 8>& c) {
  const double in[6] = {double(a.e.x), double(a.e.y), double(b.e.x),
                        double(b.e.y), double(c.e.x), double(c.e.y)};
  emu::simd_collective(emu::OP_MMA, in, 6, 0, 0);
  d.e.x = T(emu::self().out[0]);
  d.e.y = T(emu::self().out[1]);
}
template <typename T>
inline void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                               const simdgroup_matrix<T, 8, 8>& b) {
  simdgroup_multiply_accumulate(d, a, b, simdgroup_matrix<T, 8, 8>(T(0)));
}

}  // namespace metal

namespace metal {
using ::ulong2;
// Element (r, c) of the matrix is src[r * elements_per_row + c] (transposed: [c * epr + r]),
// counted from `origin` (x: column, y: row).
template <typename T, typename P>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& m, P src, unsigned long epr = 8,
                           ulong2 origin = ulong2{0, 0}, bool transpose = false) {
  const int l = int(emu::self().thread_index_in_simdgroup);
  for (int i = 0; i < 2; ++i) {
    const long r = emu_frag_row(l) + long(origin.y), c = emu_frag_col(l) + i + long(origin.x);
    m.e[i] = T(src[transpose ? c * long(epr) + r : r * long(epr) + c]);
  }
}
template <typename T, typename P>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& m, P dst, unsigned long epr = 8,
                            ulong2 origin = ulong2{0, 0}, bool transpose = false) {
  const int l = int(emu::self().thread_index_in_simdgroup);
  for (int i = 0; i < 2; ++i) {
    const long r = emu_frag_row(l) + long(origin.y), c = emu_frag_col(l) + i + long(origin.x);
    dst[transpose ? c * long(epr) + r : r * long(epr) + c] = m.e[i];
  }
}
}  // namespace metal

// `threadgroup TYPE NAME[DIMS]` in the kernel text becomes this (tests/metal_emulator): one
// array per group, shared by its threads.
#define EMU_TG_DECL(type, name, dims)                                                     \
  typedef type emu_t_##name dims;                                                         \
  static const char emu_tag_##name = 0;                                                   \
  emu_t_##name& name = *reinterpret_cast<emu_t_##name*>(                                  \
      emu::tg_var(&emu_tag_##name, sizeof(emu_t_##name), alignof(emu_t_##name)))

// Address-space qualifiers left after that rewrite mean nothing on the host.
#define device
#define constant
#define threadgroup
#define thread
#define kernel
