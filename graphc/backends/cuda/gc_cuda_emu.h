// graphc's CUDA emulator: just enough of CUDA's device environment for the host
// C++ compiler to build the *unchanged* generated kernels (passed with -include).
//
// Blocks run one after another.  Inside a block, a kernel that never calls
// __syncthreads runs its threads as plain calls; one that does runs each thread
// as a fiber on its own stack (a small assembly context switch on x86-64,
// ucontext elsewhere), and __syncthreads switches back to the
// scheduler, which resumes every thread up to the next barrier before any passes
// it.  __shared__ variables are function-level statics: one copy, used by one
// block at a time, exactly the visibility CUDA gives them.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x, y, z;
};
typedef dim3 uint3;

// float4 (the wide GEMM tile's vector loads and stores; 16-byte aligned as in CUDA)
#define __align__(n) __attribute__((aligned(n)))
struct __align__(16) float4 {
  float x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
namespace gc_emu { static int misaligned = 0; }
// float4 accesses through a misaligned address fault on a GPU; an x86 CPU would not
// notice, so these check and make the launch fail (returns -3, see gc_emu_launch)
static inline float4 GC_LD4(const float* p) {
  if ((uintptr_t)p & 15) { gc_emu::misaligned = 1; return float4{0, 0, 0, 0}; }
  float4 v; std::memcpy(&v, p, 16); return v;
}
static inline void GC_ST4(float* p, float4 v) {
  if ((uintptr_t)p & 15) { gc_emu::misaligned = 1; return; }
  std::memcpy(p, &v, 16);
}
#define GC_LD4 GC_LD4

static dim3 threadIdx, blockIdx, blockDim, gridDim;

static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
// __expf / __logf: glibc already declares them (same meaning, full precision here).

// One OS thread runs every CUDA thread, so atomics are plain read-modify-writes.
template <typename T> static inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }

namespace gc_emu {

typedef void (*thread_fn)(void** args);

static const size_t STACK = 256 * 1024;
// Fiber stacks: malloc'd, never cleared, so only the pages a thread touches become
// resident (a vector would zero all 64 MiB for a 256-thread block).
static char* stacks = nullptr;
static size_t stacks_threads = 0;
static int current = -1;
static int barrier_hits = 0;
static thread_fn cur_fn;
static void** cur_args;

#if defined(__x86_64__)
// A minimal context switch (callee-saved registers, MXCSR and the x87 control
// word on the stack; the stack pointer in *from): no signal-mask system call,
// unlike swapcontext, so a barrier costs a few nanoseconds.
extern "C" void gc_emu_switch(void** from, void* to);
asm(R"(
.text
.p2align 4
.hidden gc_emu_switch
gc_emu_switch:
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
)");

struct Fiber {
  void* sp;
  bool done;
};
static void* scheduler_sp;
static std::vector<Fiber> fibers;

static void fiber_entry() {
  cur_fn(cur_args);
  fibers[current].done = true;
  gc_emu_switch(&fibers[current].sp, scheduler_sp);   // never resumed
  std::abort();
}

static void start_fiber(unsigned t) {
  char* top = stacks + (t + 1) * STACK;
  uintptr_t a = (uintptr_t)top & ~(uintptr_t)15;
  void** sp = (void**)a;
  *--sp = nullptr;                       // fiber_entry's (unused) return address
  *--sp = (void*)&fiber_entry;           // where the first switch "returns" to
  for (int r = 0; r < 6; ++r) *--sp = nullptr;   // rbp rbx r12 r13 r14 r15
  --sp;
  ((unsigned*)sp)[0] = 0x1F80;           // default MXCSR
  ((unsigned short*)sp)[2] = 0x037F;     // default x87 control word
  fibers[t].sp = sp;
  fibers[t].done = false;
}
static inline void resume(unsigned t) { gc_emu_switch(&scheduler_sp, fibers[t].sp); }
static inline void yield_to_scheduler() { gc_emu_switch(&fibers[current].sp, scheduler_sp); }
#else
struct Fiber {
  ucontext_t ctx;
  bool done;
};
static ucontext_t scheduler;
static std::vector<Fiber> fibers;

static void trampoline() {
  cur_fn(cur_args);
  fibers[current].done = true;   // returning resumes uc_link (the scheduler)
}
static void start_fiber(unsigned t) {
  Fiber& f = fibers[t];
  f.done = false;
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stacks + t * STACK;
  f.ctx.uc_stack.ss_size = STACK;
  f.ctx.uc_link = &scheduler;
  makecontext(&f.ctx, trampoline, 0);
}
static inline void resume(unsigned t) { swapcontext(&scheduler, &fibers[t].ctx); }
static inline void yield_to_scheduler() { swapcontext(&fibers[current].ctx, &scheduler); }
#endif

static inline void set_thread(unsigned t) {
  threadIdx.x = t % blockDim.x;
  threadIdx.y = (t / blockDim.x) % blockDim.y;
  threadIdx.z = t / (blockDim.x * blockDim.y);
}

// Returns 0, or -1 if the threads of a block disagreed about barriers.
static int run_block_fibers(unsigned nthreads) {
  if (fibers.size() < nthreads) fibers.resize(nthreads);
  if (stacks_threads < nthreads) {
    std::free(stacks);
    stacks = (char*)std::malloc(nthreads * STACK);
    if (!stacks) return -2;
    stacks_threads = nthreads;
  }
  for (unsigned t = 0; t < nthreads; ++t) start_fiber(t);
  unsigned alive = nthreads;
  while (alive) {
    barrier_hits = 0;
    unsigned finished = 0;
    for (unsigned t = 0; t < nthreads; ++t) {
      if (fibers[t].done) continue;
      current = (int)t;
      set_thread(t);
      resume(t);
      if (fibers[t].done) ++finished;
    }
    alive -= finished;
    // some threads waited at a barrier that others finished without: CUDA's undefined case
    if (barrier_hits && finished) { current = -1; return -1; }
  }
  current = -1;
  return 0;
}

}  // namespace gc_emu

static inline void __syncthreads() {
  if (gc_emu::current < 0) return;   // a kernel run without fibers has no barriers
  ++gc_emu::barrier_hits;
  gc_emu::yield_to_scheduler();
}

// Launch `fn` (a stub unpacking `args`, the cuLaunchKernel-style parameter array)
// on a grid.  Returns 0 on success, -1 if a block's threads disagreed about barriers,
// -2 without memory for thread stacks, -3 on a misaligned float4 access.
static int gc_emu_launch(gc_emu::thread_fn fn, const unsigned* grid, const unsigned* block,
                         void** args, int uses_sync) {
  gridDim = dim3{grid[0], grid[1], grid[2]};
  blockDim = dim3{block[0], block[1], block[2]};
  unsigned nthreads = block[0] * block[1] * block[2];
  gc_emu::cur_fn = fn;
  gc_emu::cur_args = args;
  gc_emu::misaligned = 0;
  for (unsigned bz = 0; bz < grid[2]; ++bz)
    for (unsigned by = 0; by < grid[1]; ++by)
      for (unsigned bx = 0; bx < grid[0]; ++bx) {
        blockIdx = dim3{bx, by, bz};
        if (uses_sync) {
          int rc = gc_emu::run_block_fibers(nthreads);
          if (rc != 0) return rc;
        } else {
          for (unsigned t = 0; t < nthreads; ++t) {
            gc_emu::set_thread(t);
            fn(args);
          }
        }
        if (gc_emu::misaligned) return -3;   // a misaligned float4 access (GC_LD4/GC_ST4)
      }
  return 0;
}
