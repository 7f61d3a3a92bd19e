// The emulated CUDA runtime: runs a kernel's grid on the CPU.
//
// - A launch hands its blocks out to a small pool of OS threads (the caller
//   included); each OS thread runs one block at a time, so `__shared__`
//   (a `static thread_local` in cuda_emu.h) is per block, as on a GPU.
// - The CUDA threads of a block are fibers on that OS thread: each has its own
//   stack, and a barrier switches to the next fiber (round robin), so a block
//   of 256 threads costs two context switches per thread per barrier and no
//   OS scheduling at all. Context switches are a few instructions of assembly
//   on x86-64 (ucontext elsewhere).
// - `__syncthreads` waits for every thread of the block that has not exited
//   (what current GPUs do); warp barriers and shuffles wait for the live
//   threads of the warp. A round in which no thread can move is a deadlock:
//   the launch fails with an error instead of hanging.
// - A kernel's first launch always runs on fibers and records whether any
//   thread used a barrier or a shuffle. Kernels that did not (the elementwise
//   ones) run later launches as plain calls, thread after thread, on one
//   stack: no context switches at all. Should such a kernel reach a barrier
//   after all, the launch stops with an error (never a wrong result).
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "cuda_emu.h"

#if !defined(__x86_64__) || defined(CWP_EMU_UCONTEXT)
#define CWP_USE_UCONTEXT 1
#include <ucontext.h>
#endif

__thread uint3 cwp_emu_threadIdx __attribute__((tls_model("initial-exec")));
__thread uint3 cwp_emu_blockIdx __attribute__((tls_model("initial-exec")));
__thread dim3 cwp_emu_blockDim __attribute__((tls_model("initial-exec")));
__thread dim3 cwp_emu_gridDim __attribute__((tls_model("initial-exec")));

// Error codes returned by cwp_emu_launch (mirrored in src/backend/gpu/emu.rs).
enum {
  EMU_OK = 0,
  EMU_BAD_BLOCK = 1,     // block dimensions zero or over 1024 threads
  EMU_BAD_GRID = 2,      // grid dimensions zero or over the CUDA limits
  EMU_DEADLOCK = 3,      // threads of a block wait on barriers that cannot complete
  EMU_NO_MEMORY = 4,     // fiber stacks could not be mapped
  EMU_BAD_SHARED = 5,    // dynamic shared memory over the 227 KiB a block may have
  EMU_LATE_BARRIER = 6,  // a kernel run without fibers reached a barrier (see below)
};

namespace {

typedef void (*Body)(void**);

constexpr int kMaxThreads = 1024;
constexpr size_t kStack = 128 * 1024;  // per fiber; kernels use a few KiB
constexpr size_t kPage = 4096;

#ifndef CWP_USE_UCONTEXT
extern "C" void cwp_emu_switch(void** save_sp, void* load_sp);
extern "C" void cwp_emu_fiber_entry();
asm(R"(
    .text
    .p2align 4
    .globl cwp_emu_switch
    .hidden cwp_emu_switch
    .type cwp_emu_switch,@function
cwp_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cwp_emu_switch, .-cwp_emu_switch

    .p2align 4
    .globl cwp_emu_fiber_entry
    .hidden cwp_emu_fiber_entry
    .type cwp_emu_fiber_entry,@function
cwp_emu_fiber_entry:
    movq %r12, %rdi
    andq $-16, %rsp
    callq *%r13
    ud2
    .size cwp_emu_fiber_entry, .-cwp_emu_fiber_entry
)");
#endif

enum FiberState { READY = 0, DONE = 1 };

// One cp.async: `bytes` to `dst`, the first `src_bytes` of them from `src`,
// the rest zeros; `group` is the commit group it belongs to.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes, group;
};

void perform(const AsyncCopy& c) {
  std::memcpy(c.dst, c.src, (size_t)c.src_bytes);
  std::memset((char*)c.dst + c.src_bytes, 0, (size_t)(c.bytes - c.src_bytes));
}

struct Fiber {
  void* sp;  // saved stack pointer while switched out (x86-64 path)
  int state;
  uint3 tid;
};

struct Worker {
  // fiber stacks: one mapping, `nstacks` stacks with a guard page below each
  char* stacks = nullptr;
  int nstacks = 0;
  Fiber fibers[kMaxThreads];
#ifdef CWP_USE_UCONTEXT
  ucontext_t uc[kMaxThreads];
  ucontext_t sched_uc;
#endif
  void* sched_sp = nullptr;
  int n = 0, live = 0, cur = 0;
  bool progress = false;
  // block barrier
  int bar_arrived = 0;
  unsigned bar_gen = 0;
  // warp barriers
  int warp_arrived[kMaxThreads / 32];
  unsigned warp_gen[kMaxThreads / 32];
  int warp_live[kMaxThreads / 32];
  unsigned long long slot[kMaxThreads];
  // warp-collective operands (mma, ldmatrix): each lane's pointer to its own
  // operands, published before a warp barrier; null once the thread exited
  const void* wptr[kMaxThreads] = {};
  // cp.async: each thread's copies not yet performed, and its committed groups
  std::vector<AsyncCopy> pending[kMaxThreads];
  int committed[kMaxThreads] = {};
  std::vector<char> dyn;
  Body body = nullptr;
  void** args = nullptr;
  bool direct = false;        // running threads as plain calls (no fibers)
  bool synced = false;        // a barrier or shuffle was used in this launch

  ~Worker() {
    if (stacks) munmap(stacks, (size_t)nstacks * (kStack + kPage));
  }

  bool ensure_stacks(int need) {
    if (nstacks >= need) return true;
    int want = 32;
    while (want < need) want *= 2;
    if (stacks) munmap(stacks, (size_t)nstacks * (kStack + kPage));
    stacks = nullptr;
    nstacks = 0;
    size_t bytes = (size_t)want * (kStack + kPage);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    stacks = (char*)p;
    nstacks = want;
    for (int i = 0; i < want; i++) mprotect(stacks + (size_t)i * (kStack + kPage), kPage, PROT_NONE);
    return true;
  }
  char* stack_base(int i) { return stacks + (size_t)i * (kStack + kPage) + kPage; }
};

thread_local std::unique_ptr<Worker> tls_worker_owner;
__thread Worker* tls_worker __attribute__((tls_model("initial-exec"))) = nullptr;

Worker* worker() {
  if (!tls_worker) {
    tls_worker_owner.reset(new Worker());
    tls_worker = tls_worker_owner.get();
  }
  return tls_worker;
}

// ---- context switching -------------------------------------------------------

void fiber_main(void* arg);

#ifdef CWP_USE_UCONTEXT
__thread Worker* tls_entry_worker;
void uc_entry() { fiber_main(tls_entry_worker); }
#endif

void init_fiber(Worker* W, int i) {
#ifdef CWP_USE_UCONTEXT
  ucontext_t* uc = &W->uc[i];
  getcontext(uc);
  uc->uc_stack.ss_sp = W->stack_base(i);
  uc->uc_stack.ss_size = kStack;
  uc->uc_link = nullptr;
  makecontext(uc, uc_entry, 0);
#else
  // Stack tops are staggered by a few cache lines so that the fibers' hot
  // frames do not all map to the same cache sets.
  const size_t color = (size_t)(i % 61) * 64;
  uintptr_t* sp = (uintptr_t*)(((uintptr_t)(W->stack_base(i) + kStack - color)) & ~(uintptr_t)15);
  *--sp = (uintptr_t)&cwp_emu_fiber_entry;   // return address of the first switch
  *--sp = 0;                                 // rbp
  *--sp = 0;                                 // rbx
  *--sp = (uintptr_t)W;                      // r12: argument
  *--sp = (uintptr_t)&fiber_main;            // r13: function
  *--sp = 0;                                 // r14
  *--sp = 0;                                 // r15
  W->fibers[i].sp = sp;
#endif
}

// From the scheduler into fiber i.
inline void enter_fiber(Worker* W, int i) {
#ifdef CWP_USE_UCONTEXT
  tls_entry_worker = W;
  swapcontext(&W->sched_uc, &W->uc[i]);
#else
  cwp_emu_switch(&W->sched_sp, W->fibers[i].sp);
#endif
}

// From the running fiber back to the scheduler.
inline void leave_fiber(Worker* W) {
#ifdef CWP_USE_UCONTEXT
  swapcontext(&W->uc[W->cur], &W->sched_uc);
#else
  cwp_emu_switch(&W->fibers[W->cur].sp, W->sched_sp);
#endif
}

void release_barriers_after_exit(Worker* W, int warp) {
  if (W->bar_arrived > 0 && W->bar_arrived >= W->live) {
    W->bar_arrived = 0;
    W->bar_gen++;
  }
  if (W->warp_arrived[warp] > 0 && W->warp_arrived[warp] >= W->warp_live[warp]) {
    W->warp_arrived[warp] = 0;
    W->warp_gen[warp]++;
  }
}

// Performs thread i's outstanding copies (a thread that exits has them land).
void flush_copies(Worker* W, int i) {
  for (const AsyncCopy& c : W->pending[i]) perform(c);
  W->pending[i].clear();
  W->committed[i] = 0;
}

void fiber_main(void* arg) {
  Worker* W = (Worker*)arg;
  W->body(W->args);
  int i = W->cur;
  flush_copies(W, i);
  W->wptr[i] = nullptr;
  W->fibers[i].state = DONE;
  W->live--;
  W->warp_live[i / 32]--;
  W->progress = true;
  release_barriers_after_exit(W, i / 32);
  leave_fiber(W);
  __builtin_trap();  // never resumed
}

struct LateBarrier {};

void warp_barrier(Worker* W) {
  if (W->direct) throw LateBarrier{};
  W->synced = true;
  int w = W->cur / 32;
  unsigned g = W->warp_gen[w];
  W->progress = true;
  if (++W->warp_arrived[w] >= W->warp_live[w]) {
    W->warp_arrived[w] = 0;
    W->warp_gen[w]++;
    return;
  }
  while (W->warp_gen[w] == g) leave_fiber(W);
}

// Runs one block as plain calls, thread after thread (barrier-free kernels).
int run_block_direct(Worker* W, int nthreads, const unsigned* block) {
  W->direct = true;
  try {
    for (int i = 0; i < nthreads; i++) {
      W->cur = i;
      cwp_emu_threadIdx.x = i % block[0];
      cwp_emu_threadIdx.y = (i / block[0]) % block[1];
      cwp_emu_threadIdx.z = i / (block[0] * block[1]);
      W->body(W->args);
      flush_copies(W, i);
    }
  } catch (const LateBarrier&) {
    W->direct = false;
    return EMU_LATE_BARRIER;
  }
  W->direct = false;
  return EMU_OK;
}

// Runs one block to completion on fibers; returns an EMU_* code.
int run_block(Worker* W, int nthreads, const unsigned* block) {
  W->n = nthreads;
  W->live = nthreads;
  W->bar_arrived = 0;
  for (int w = 0; w < (nthreads + 31) / 32; w++) {
    W->warp_arrived[w] = 0;
    W->warp_live[w] = (w + 1) * 32 <= nthreads ? 32 : nthreads - w * 32;
  }
  for (int i = 0; i < nthreads; i++) {
    Fiber& f = W->fibers[i];
    f.state = READY;
    f.tid.x = i % block[0];
    f.tid.y = (i / block[0]) % block[1];
    f.tid.z = i / (block[0] * block[1]);
    W->wptr[i] = nullptr;
    W->pending[i].clear();
    W->committed[i] = 0;
    init_fiber(W, i);
  }
  while (W->live > 0) {
    W->progress = false;
    for (int i = 0; i < nthreads; i++) {
      if (W->fibers[i].state == DONE) continue;
      W->cur = i;
      cwp_emu_threadIdx = W->fibers[i].tid;
      enter_fiber(W, i);
    }
    if (!W->progress && W->live > 0) return EMU_DEADLOCK;
  }
  return EMU_OK;
}

struct Job {
  Body body;
  void** args;
  unsigned grid[3];
  unsigned block[3];
  unsigned smem;
  long total;
  bool direct;                      // run threads as plain calls
  std::atomic<long> next{0};
  std::atomic<int> error{EMU_OK};
  std::atomic<bool> synced{false};  // some thread used a barrier or shuffle
};

void run_blocks(Job* job) {
  Worker* W = worker();
  int nthreads = (int)(job->block[0] * job->block[1] * job->block[2]);
  if (!W->ensure_stacks(nthreads)) {
    job->error.store(EMU_NO_MEMORY);
    return;
  }
  W->body = job->body;
  W->args = job->args;
  if (W->dyn.size() < job->smem) W->dyn.resize(job->smem);
  cwp_emu_blockDim = dim3{job->block[0], job->block[1], job->block[2]};
  cwp_emu_gridDim = dim3{job->grid[0], job->grid[1], job->grid[2]};
  for (;;) {
    if (job->error.load(std::memory_order_relaxed) != EMU_OK) return;
    long b = job->next.fetch_add(1);
    if (b >= job->total) return;
    cwp_emu_blockIdx.x = (unsigned)(b % job->grid[0]);
    cwp_emu_blockIdx.y = (unsigned)((b / job->grid[0]) % job->grid[1]);
    cwp_emu_blockIdx.z = (unsigned)(b / ((long)job->grid[0] * job->grid[1]));
    W->synced = false;
    int rc = job->direct ? run_block_direct(W, nthreads, job->block) : run_block(W, nthreads, job->block);
    if (W->synced) job->synced.store(true, std::memory_order_relaxed);
    if (rc != EMU_OK) {
      job->error.store(rc);
      return;
    }
  }
}

// A pool of helper OS threads; the launching thread works too. Launches from
// several host threads at once do not queue: whoever finds the pool busy runs
// its blocks alone.
struct Pool {
  std::mutex m;
  std::condition_variable cv, done_cv;
  std::mutex launch_mutex;
  Job* job = nullptr;
  unsigned long epoch = 0;
  int busy = 0;
  int helpers = 0;

  explicit Pool(int n) : helpers(n) {
    for (int i = 0; i < n; i++) std::thread([this] { loop(); }).detach();
  }
  void loop() {
    unsigned long seen = 0;
    for (;;) {
      Job* j;
      {
        std::unique_lock<std::mutex> lk(m);
        cv.wait(lk, [&] { return epoch != seen; });
        seen = epoch;
        j = job;
      }
      run_blocks(j);
      {
        std::lock_guard<std::mutex> lk(m);
        if (--busy == 0) done_cv.notify_all();
      }
    }
  }
  void run(Job* j) {
    {
      std::lock_guard<std::mutex> lk(m);
      job = j;
      busy = helpers;
      epoch++;
    }
    cv.notify_all();
    run_blocks(j);
    std::unique_lock<std::mutex> lk(m);
    done_cv.wait(lk, [&] { return busy == 0; });
  }
};

Pool* pool() {
  // Leaked on purpose: helper threads outlive static destructors at exit.
  static Pool* p = [] {
    int n = (int)std::thread::hardware_concurrency();
    if (const char* s = getenv("CWP_EMU_THREADS")) n = atoi(s);
    if (n < 1) n = 1;
    return new Pool(n - 1);
  }();
  return p;
}

// Per kernel body: 0 = not launched yet, 1 = needs fibers, 2 = barrier-free.
std::mutex modes_mutex;
std::unordered_map<Body, int>* modes = new std::unordered_map<Body, int>();

}  // namespace

extern "C" void cwp_emu_syncthreads() {
  Worker* W = tls_worker;
  if (W->direct) throw LateBarrier{};
  W->synced = true;
  unsigned g = W->bar_gen;
  W->progress = true;
  if (++W->bar_arrived >= W->live) {
    W->bar_arrived = 0;
    W->bar_gen++;
    return;
  }
  while (W->bar_gen == g) leave_fiber(W);
}

extern "C" void cwp_emu_syncwarp() { warp_barrier(tls_worker); }

extern "C" unsigned long long cwp_emu_shfl(unsigned long long v, int arg, int mode, int width) {
  Worker* W = tls_worker;
  int i = W->cur;
  int lane = i % 32;
  int base = i - lane;
  if (width <= 0 || width > 32) width = 32;
  int seg = lane & ~(width - 1);
  W->slot[i] = v;
  warp_barrier(W);
  int src = lane;
  switch (mode) {
    case CWP_SHFL_IDX:
      src = seg + (arg & (width - 1));
      break;
    case CWP_SHFL_DOWN:
      src = lane + arg < seg + width ? lane + arg : lane;
      break;
    case CWP_SHFL_UP:
      src = lane - arg >= seg ? lane - arg : lane;
      break;
    case CWP_SHFL_XOR:
      src = lane ^ arg;
      if (src < seg || src >= seg + width) src = lane;
      break;
  }
  unsigned long long r = base + src < W->n ? W->slot[base + src] : v;
  warp_barrier(W);
  return r;
}

// Warp-collective exchange: lane i publishes `mine`, and after the warp
// barrier `all[j]` is lane j's pointer (null for lanes that exited or lie
// past the block). The caller reads through them, then calls
// cwp_emu_syncwarp() so that no lane leaves (and reuses its operands) while
// others still read them.
extern "C" void cwp_emu_warp_gather(const void* mine, const void** all) {
  Worker* W = tls_worker;
  int i = W->cur;
  int base = i - i % 32;
  W->wptr[i] = mine;
  warp_barrier(W);
  for (int j = 0; j < 32; j++) all[j] = base + j < W->n ? W->wptr[base + j] : nullptr;
}

// cp.async: queued, performed when a wait_group says the group must be
// complete (or when the thread exits). A kernel that reads its shared
// memory before waiting thus sees the old contents, as a GPU may.
extern "C" void cwp_emu_cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  Worker* W = tls_worker;
  int i = W->cur;
  if (src_bytes < 0) src_bytes = 0;
  if (src_bytes > bytes) src_bytes = bytes;
  W->pending[i].push_back(AsyncCopy{dst, src, bytes, src_bytes, W->committed[i]});
}

extern "C" void cwp_emu_cp_async_commit() {
  Worker* W = tls_worker;
  W->committed[W->cur]++;
}

// Completes every committed group but the newest `n`.
extern "C" void cwp_emu_cp_async_wait(int n) {
  Worker* W = tls_worker;
  int i = W->cur;
  const int done_below = W->committed[i] - n;
  std::vector<AsyncCopy>& p = W->pending[i];
  size_t keep = 0;
  for (size_t j = 0; j < p.size(); j++) {
    if (p[j].group < done_below) {
      perform(p[j]);
    } else {
      p[keep++] = p[j];
    }
  }
  p.resize(keep);
}

extern "C" void* cwp_emu_dynamic_smem() { return tls_worker->dyn.data(); }

// Runs `body` (one CUDA thread of a kernel, see the generated trampolines) over
// the whole grid; returns 0 or an EMU_* error code. Synchronous.
extern "C" int cwp_emu_launch(Body body, void** args, const unsigned* grid, const unsigned* block,
                              unsigned smem) {
  long threads = (long)block[0] * block[1] * block[2];
  if (block[0] == 0 || block[1] == 0 || block[2] == 0 || threads > kMaxThreads ||
      block[2] > 64)
    return EMU_BAD_BLOCK;
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > 65535 || grid[2] > 65535)
    return EMU_BAD_GRID;
  if (smem > 227 * 1024) return EMU_BAD_SHARED;
  Job job;
  job.body = body;
  job.args = args;
  for (int d = 0; d < 3; d++) {
    job.grid[d] = grid[d];
    job.block[d] = block[d];
  }
  job.smem = smem;
  job.total = (long)grid[0] * grid[1] * grid[2];
  int mode;
  {
    std::lock_guard<std::mutex> lk(modes_mutex);
    mode = (*modes)[body];
  }
  job.direct = mode == 2 && getenv("CWP_EMU_ALWAYS_FIBERS") == nullptr;
  Pool* p = pool();
  std::unique_lock<std::mutex> lk(p->launch_mutex, std::try_to_lock);
  if (lk.owns_lock() && p->helpers > 0 && job.total > 1) {
    p->run(&job);
  } else {
    run_blocks(&job);
  }
  int rc = job.error.load();
  if (rc == EMU_OK && mode == 0) {
    std::lock_guard<std::mutex> lk(modes_mutex);
    (*modes)[body] = job.synced.load() ? 1 : 2;
  } else if (rc == EMU_LATE_BARRIER) {
    std::lock_guard<std::mutex> lk(modes_mutex);
    (*modes)[body] = 1;
  }
  return rc;
}
