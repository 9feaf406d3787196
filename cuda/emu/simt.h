// SIMT emulator: runs the unmodified kernels of cuda/ on the host, so that
// the CUDA backend can be checked on machines without a GPU (README.md here).
//
// Every CUDA thread of a block is a fiber; blocks run one after another, each
// block's fibers are scheduled round-robin on the calling OS thread. Barriers
// (__syncthreads, __syncwarp) and warp collectives (shuffles, and mma /
// ldmatrix in flash_common_emu.h) suspend a fiber until every thread of its
// block / warp has arrived, so warp-synchronous code runs with real lock-step
// semantics. A collective that some thread of the warp never reaches, or a
// barrier that can never complete, stops the process with a "deadlock" report.
//
// This header is included (before the kernel source) by every generated
// translation unit; the state lives in simt.cpp.
#pragma once

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_bf16.h"

// ---- CUDA keywords -----------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Blocks run one at a time and launches are serialised, so a function-local
// static is exactly one block's shared variable.
#define __shared__ static

struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

namespace simt {

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// A deferred 16-byte cp.async copy (performed at the issuing thread's wait).
struct PendingCopy {
    unsigned char* dst;
    const unsigned char* src;
    bool valid;
};

// A suspended execution context: on x86-64 just the saved stack pointer
// (simt.cpp switches with a few instructions); elsewhere a ucontext.
struct Context {
    void* sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t uc;
#endif
};

// One CUDA thread. Fibers (and their stacks) are reused by every block and
// launch: a fiber runs the kernel body, parks, and runs it again when resumed.
struct Fiber {
    Context ctx;
    unsigned char* stack = nullptr;
    Dim3 tid;
    int lin = 0;  // linear thread index in the block
    bool done = false;
    const unsigned long* wait_ptr = nullptr;  // suspended until *wait_ptr != wait_gen
    unsigned long wait_gen = 0;
    const char* waiting_on = nullptr;  // for deadlock reports
    std::vector<PendingCopy> pending;
};

// The running launch. Only one exists at a time (simt::launch is serialised).
struct Launch {
    const char* kernel = "";
    Dim3 grid, block, bidx;
    int nthreads = 0;
    int exited = 0;
    Fiber* cur = nullptr;
    std::vector<Fiber*> fibers;  // the block's threads
    Context scheduler;
    const std::function<void()>* body = nullptr;
    unsigned char* smem = nullptr;  // dynamic shared memory of the running block
    size_t smem_bytes = 0;
    unsigned long bar_gen = 0;
    int bar_count = 0;
    std::vector<unsigned long> wbar_gen;
    std::vector<int> wbar_count;
    std::vector<uint64_t> slot;  // [warp][lane][4] exchange words (mma)
    std::vector<uint64_t> shuffle_slot;  // [warp][generation parity][lane]
    std::vector<const unsigned char*> slot_ptr;  // [warp][lane]
};
extern Launch g;

[[noreturn]] void fail(const char* what);
void syncthreads();
void warp_barrier(const char* what);

// ---- device memory (what cuMemAlloc returns) --------------------------------
// Each allocation is host memory filled with 0xFF bytes (NaN as f32 and bf16:
// a read of memory nothing wrote is loud) and placed so that its end touches
// an inaccessible page: an access past the end, or before the start, stops
// the process with a report naming the kernel, block and thread.
void* device_alloc(size_t bytes);
// False when p is not a live allocation; else `bytes` is what it held.
bool device_free(void* p, size_t* bytes);
// Whether [p, p + bytes) lies inside one live device allocation.
bool in_device_memory(const void* p, size_t bytes);
// Reports SIGSEGV/SIGBUS with the running kernel and the buffer overrun.
void install_fault_reporter();

inline int lane_id() { return g.cur->lin & 31; }
inline int warp_id() { return g.cur->lin >> 5; }
inline uint64_t* warp_slots() { return &g.slot[(size_t)warp_id() * 32 * 4]; }

// A shuffle: every lane publishes `v`, then reads lane src(lane)'s value.
// One barrier suffices: the slots alternate with the barrier generation, and
// a lane can only reuse a slot set after passing the next barrier, which every
// lane reaches only once it has read this one.
template <class T, class Src> inline T shuffle(unsigned mask, T v, Src src, const char* what) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move 4- or 8-byte values");
    if (mask != 0xffffffffu) fail("shuffle with a partial mask (the emulator supports full-warp shuffles only)");
    const int w = warp_id(), l = lane_id();
    uint64_t* s = &g.shuffle_slot[((size_t)w * 2 + (g.wbar_gen[w] & 1)) * 32];
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    s[l] = bits;
    warp_barrier(what);
    const int from = src(l);
    T r = v;
    if (from >= 0 && from < 32) std::memcpy(&r, &s[from], sizeof(T));
    return r;
}

// A global -> shared 16-byte asynchronous copy; `valid` false zero-fills.
void cp_async_16(unsigned char* dst, const void* src, bool valid);
void cp_async_wait_all();

// Runs `body` as a kernel: every block in order, every thread a fiber.
void launch(const char* kernel, Dim3 grid, Dim3 block, size_t smem_bytes, const std::function<void()>& body);

// ---- kernel registry (filled by the generated translation units) ------------
using Invoker = void (*)(void* fn, void** params);
// `param_bytes`: the size of each parameter, compared with the PTX entry's.
void register_kernel(const char* name, void* fn, Invoker invoke, std::vector<int> param_bytes);
// The registered kernel `name`, or false.
bool find_kernel(const char* name, void** fn, Invoker* invoke, std::vector<int>* param_bytes);

// Calls f with its arguments read from a cuLaunchKernel parameter array
// (params[i] points at argument i; a device pointer is its address value).
template <class... A, size_t... I> inline void call_with(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}
template <class... A> inline void invoke(void* fn, void** p) {
    call_with(reinterpret_cast<void (*)(A...)>(fn), p, std::index_sequence_for<A...>{});
}
template <class... A> inline void add_kernel(const char* name, void (*f)(A...)) {
    register_kernel(name, reinterpret_cast<void*>(f), &invoke<A...>, {(int)sizeof(A)...});
}

}  // namespace simt

// ---- built-in variables and intrinsics -----------------------------------------
#define threadIdx (simt::g.cur->tid)
#define blockIdx (simt::g.bidx)
#define blockDim (simt::g.block)
#define gridDim (simt::g.grid)
#define __syncthreads() simt::syncthreads()
#define __syncwarp(...) simt::warp_barrier("__syncwarp")
#define __trap() simt::fail("__trap() (a checked launch precondition failed)")

template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int m) {
    return simt::shuffle(mask, v, [m](int l) { return l ^ m; }, "__shfl_xor_sync");
}
// Lanes past the end keep their own value, as on the GPU.
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned d) {
    return simt::shuffle(mask, v, [d](int l) { return l + (int)d < 32 ? l + (int)d : l; }, "__shfl_down_sync");
}
template <class T> inline T __ldg(const T* p) { return *p; }
// CUDA's integer/float min and max (usual arithmetic conversions for mixed types).
template <class A, class B> inline typename std::common_type<A, B>::type min(A a, B b) {
    return b < a ? b : a;
}
template <class A, class B> inline typename std::common_type<A, B>::type max(A a, B b) {
    return a < b ? b : a;
}

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
// Built with -ffp-contract=off: each is one correctly rounded f32 operation.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
