// The scheduler of the CUDA emulation (see cuda_emulation.h): one block at a time,
// its threads as ucontext fibers on the calling OS thread, and the small part of the
// CUDA runtime API that csrc/cuda calls.
//
// Fibers, not OS threads: one block's threads never run at the same time, so atomics are
// atomic, __shared__ can be a static, and every run of a test takes the same steps (a
// failure replays). The switch is a few instructions (x86-64; ucontext elsewhere, whose
// swapcontext makes a system call per switch).
//
// A thread runs until it reaches a barrier or a warp intrinsic (or returns); then the
// next runnable thread in the schedule's order runs. A warp op completes when every
// lane of its mask has arrived at the same op with the same mask; a barrier opens when
// every thread of the block waits at it. When nothing can run and the block has not
// finished, that is a deadlock on a GPU too: the error names who waits for whom.
#include "cuda/emulation/cuda_emulation.h"

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace simcore {
namespace emu {
namespace {

// ASan must be told of every stack switch: start_switch before, with the bounds of the
// stack switched to, finish_switch after, which hands back the bounds of the stack left.
// The way back to the caller needs the caller's bounds too: with none, ASan took the
// calling stack to be empty and aborted at the next exception thrown there. Nothing
// without ASan.
#if defined(__SANITIZE_ADDRESS__)
void asan_start_switch(void** fake_stack_save, const void* bottom, size_t size) {
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
}
void asan_finish_switch(void* fake_stack, const void** old_bottom, size_t* old_size) {
  __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_size);
}
// The frames of fibers abandoned by a failed block leave their redzones poisoned.
void asan_unpoison(void* p, size_t n) { ASAN_UNPOISON_MEMORY_REGION(p, n); }
// Fills [p, end) with `byte` where ASan lets a program write (not its redzones).
void fill_addressable(char* p, char* end, int byte) {
  while (p < end) {
    char* bad = static_cast<char*>(__asan_region_is_poisoned(p, static_cast<size_t>(end - p)));
    if (bad == nullptr) bad = end;
    std::memset(p, byte, static_cast<size_t>(bad - p));
    p = bad;
    while (p < end && __asan_address_is_poisoned(p)) ++p;
  }
}
#else
void asan_start_switch(void**, const void*, size_t) {}
void asan_finish_switch(void*, const void**, size_t*) {}
void asan_unpoison(void*, size_t) {}
void fill_addressable(char* p, char* end, int byte) { std::memset(p, byte, static_cast<size_t>(end - p)); }
#endif

}  // namespace
}  // namespace emu
}  // namespace simcore

// The kernels' __shared__ variables, between these two symbols of shared_memory.ld.
extern "C" char simcore_emu_shared_begin[];
extern "C" char simcore_emu_shared_end[];

namespace simcore {
namespace emu {
namespace {

// Static shared memory as each block finds it: 0xff bytes (NaN as a float, -1 as an int),
// so a kernel that reads shared memory its block has not written gets a wrong answer,
// never the previous block's value (which is often the right one).
void poison_shared_memory() { fill_addressable(simcore_emu_shared_begin, simcore_emu_shared_end, 0xff); }

#if defined(__x86_64__)
// A suspended fiber: its stack pointer, below the callee-saved registers and the return address.
struct Context {
  void* sp = nullptr;
};
extern "C" void simcore_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .type simcore_emu_switch, @function
simcore_emu_switch:
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
  .size simcore_emu_switch, .-simcore_emu_switch
)");
void switch_context(Context* from, Context* to) { simcore_emu_switch(&from->sp, to->sp); }
// A fiber that starts in fn on [stack, stack + bytes): six zero registers, then fn as the
// return address, placed so that fn starts with the stack aligned as after a call.
void make_context(Context* c, char* stack, size_t bytes, void (*fn)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<void**>(top - 16);
  slot[1] = nullptr;  // fn's own return address: it never returns
  slot[0] = reinterpret_cast<void*>(fn);
  void** sp = slot - 6;
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  c->sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
void switch_context(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
void make_context(Context* c, char* stack, size_t bytes, void (*fn)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = bytes;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, fn, 0);
}
#endif

constexpr size_t kStackBytes = size_t{256} << 10;  // per thread; kernels keep small frames
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxDynamicSmem = 48 << 10;

enum class State { Ready, AtBarrier, AtWarpOp, Done };

struct Thread {
  Context ctx;
  State state = State::Ready;
  int op = 0;          // BarrierOp or WarpOp being waited at
  int predicate = 0;   // barrier
  unsigned mask = 0;   // warp op
  uint64_t bits = 0, result = 0;
  int arg = 0, width = 32;
  void* fake_stack = nullptr;  // ASan's stack for its locals while it is switched out
};

const char* barrier_name(int op) {
  static const char* names[] = {"__syncthreads", "__syncthreads_or", "__syncthreads_count"};
  return names[op];
}
const char* warp_name(int op) {
  static const char* names[] = {"__shfl_xor_sync", "__shfl_down_sync", "__ballot_sync", "__syncwarp"};
  return names[op];
}

std::string dim_string(unsigned x, unsigned y, unsigned z) {
  return "(" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
}

// The op a warp's waiting lanes are at: lanes arrive one by one, the op completes at the last.
struct WarpRendezvous {
  unsigned arrived = 0;  // lanes waiting
  int op = 0;
  unsigned mask = 0;
};

struct Block;
Block* g_block = nullptr;  // the block being run (launches are serialised)

struct Block {
  const char* kernel;
  unsigned n = 0;  // threads
  std::vector<Thread> threads;
  std::vector<WarpRendezvous> warps;
  const std::function<void()>* body = nullptr;
  Context main_ctx;
  unsigned current = 0, done = 0;
  std::string error;
  char* stacks = nullptr;
  size_t stack_bytes = 0;
  const void* main_stack_bottom = nullptr;  // the calling thread's stack, for ASan
  size_t main_stack_size = 0;

  Thread& self() { return threads[current]; }

  std::string where(unsigned t) const {
    const unsigned bx = blockDim.x, by = blockDim.y;
    return std::string("CUDA emulation: kernel ") + kernel + ", block " +
           dim_string(blockIdx.x, blockIdx.y, blockIdx.z) + ", thread " +
           dim_string(t % bx, t / bx % by, t / (bx * by)) + ": ";
  }

  // Ends the current thread's run with an error; the launch throws it.
  [[noreturn]] void fail(const std::string& what) {
    if (error.empty()) error = where(current) + what;
    self().state = State::Done;
    ++done;
    switch_to_main();
    __builtin_unreachable();
  }

  void set_thread_index(unsigned t) {
    threadIdx = uint3{t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
  }

  void switch_to_main() {
    Thread& me = self();
    asan_start_switch(me.state == State::Done ? nullptr : &me.fake_stack, main_stack_bottom, main_stack_size);
    switch_context(&me.ctx, &main_ctx);
    asan_finish_switch(me.fake_stack, &main_stack_bottom, &main_stack_size);
  }

  void run_thread(unsigned t) {
    current = t;
    set_thread_index(t);
    void* main_fake_stack = nullptr;
    asan_start_switch(&main_fake_stack, stacks + t * kStackBytes, kStackBytes);
    switch_context(&main_ctx, &threads[t].ctx);
    asan_finish_switch(main_fake_stack, nullptr, nullptr);
  }

  static void entry() {
    Block* b = g_block;
    asan_finish_switch(nullptr, &b->main_stack_bottom, &b->main_stack_size);
    try {
      (*b->body)();
    } catch (const std::exception& e) {
      if (b->error.empty()) b->error = b->where(b->current) + e.what();
    }
    b->self().state = State::Done;
    ++b->done;
    b->switch_to_main();
  }

  void ensure_stacks() {
    const size_t need = size_t{n} * kStackBytes;
    if (need <= stack_bytes) return;
    if (stacks) munmap(stacks, stack_bytes);
    void* p = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("CUDA emulation: cannot map the fiber stacks");
    stacks = static_cast<char*>(p);
    stack_bytes = need;
  }

  void start_threads() {
    ensure_stacks();
    threads.assign(n, Thread{});
    warps.assign((n + 31) / 32, WarpRendezvous{});
    done = 0;
    for (unsigned t = 0; t < n; ++t)
      make_context(&threads[t].ctx, stacks + t * kStackBytes, kStackBytes, &Block::entry);
  }

  void run(const std::vector<unsigned>& order);
  void open_barrier_or_fail();
  void complete_warp_op_if_ready(unsigned warp);
};

Schedule g_schedule = Schedule::Forward;
uint64_t g_seed = 0;
std::mt19937_64 g_rng;
std::mutex g_launch_mutex;
Block g_state;

// The order of one round: a permutation of the block's threads.
void round_order(unsigned n, std::vector<unsigned>* order) {
  order->resize(n);
  std::iota(order->begin(), order->end(), 0u);
  if (g_schedule == Schedule::Reverse) std::reverse(order->begin(), order->end());
  if (g_schedule == Schedule::Random) std::shuffle(order->begin(), order->end(), g_rng);
}

// Rounds until every thread has returned: each round runs every runnable thread
// until it waits or returns; a round in which nothing ran opens the barrier (or fails).
void Block::run(const std::vector<unsigned>& first_order) {
  std::vector<unsigned> order = first_order;
  while (done < n && error.empty()) {
    bool ran = false;
    for (unsigned t : order) {
      if (threads[t].state != State::Ready) continue;
      run_thread(t);
      ran = true;
      if (!error.empty()) return;
    }
    if (!ran && done < n) open_barrier_or_fail();
    round_order(n, &order);
  }
}

std::string state_of(const Thread& t) {
  switch (t.state) {
    case State::Done: return "has returned";
    case State::AtBarrier: return std::string("waits at ") + barrier_name(t.op);
    case State::AtWarpOp: return std::string("waits at ") + warp_name(t.op);
    default: return "is runnable";
  }
}

// Nothing can run: every live thread waits. Either all of them wait at one barrier
// (it opens) or this block would hang or diverge on a GPU.
void Block::open_barrier_or_fail() {
  for (unsigned t = 0; t < n; ++t) {
    if (threads[t].state != State::AtWarpOp) continue;
    const unsigned base = t & ~31u;
    for (unsigned l = 0; l < 32; ++l) {
      const unsigned u = base + l;
      if ((threads[t].mask >> l & 1u) && u < n && threads[u].state != State::AtWarpOp) {
        current = t;
        error = where(t) + warp_name(threads[t].op) + " waits for lane " + std::to_string(l) + ", which " +
                state_of(threads[u]) + " (deadlock: the lanes of a warp op's mask must all call it)";
        return;
      }
    }
  }
  int any = 0, count = 0;
  unsigned first = n;
  for (unsigned t = 0; t < n; ++t) {
    const Thread& th = threads[t];
    if (th.state == State::Done) {
      current = t;
      error = where(t) + "returned while other threads of its block wait at a barrier (" +
              std::to_string(n - done) + " of " + std::to_string(n) + " threads reached it: divergent __syncthreads)";
      return;
    }
    if (first == n) first = t;
    if (th.op != threads[first].op) {
      error = where(t) + "waits at " + barrier_name(th.op) + " while thread " + std::to_string(first) +
              " (linear) waits at " + barrier_name(threads[first].op);
      return;
    }
    any |= th.predicate != 0;
    count += th.predicate != 0;
  }
  const int result = threads[first].op == kSyncThreadsCount ? count : any;
  for (Thread& th : threads) {
    th.state = State::Ready;
    th.result = static_cast<uint64_t>(result);
  }
}

uint64_t warp_result(const Block& b, unsigned base, unsigned lane) {
  const Thread& th = b.threads[base + lane];
  const unsigned width = static_cast<unsigned>(th.width);
  switch (th.op) {
    case kShflXor: {
      const unsigned src = ((lane ^ static_cast<unsigned>(th.arg)) & (width - 1)) | (lane & ~(width - 1));
      return b.threads[base + src].bits;
    }
    case kShflDown: {
      const unsigned src = lane + static_cast<unsigned>(th.arg);
      return (src & ~(width - 1)) == (lane & ~(width - 1)) ? b.threads[base + src].bits : th.bits;
    }
    case kBallot: {
      uint64_t ballot = 0;
      for (unsigned l = 0; l < 32; ++l)
        if ((th.mask >> l & 1u) && b.threads[base + l].bits) ballot |= uint64_t{1} << l;
      return ballot;
    }
    default: return 0;
  }
}

// When every lane of the mask waits at the same op, computes each lane's result and
// makes the lanes runnable.
void Block::complete_warp_op_if_ready(unsigned warp) {
  const unsigned base = warp * 32;
  const Thread& me = self();
  WarpRendezvous& w = warps[warp];
  if (++w.arrived < static_cast<unsigned>(__builtin_popcount(me.mask))) return;
  w.arrived = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (me.mask >> l & 1u) threads[base + l].result = warp_result(*this, base, l);
  for (unsigned l = 0; l < 32; ++l)
    if (me.mask >> l & 1u) threads[base + l].state = State::Ready;
}

std::string hex(unsigned m) {
  char s[16];
  std::snprintf(s, sizeof s, "0x%08x", m);
  return s;
}

// Mask, width and source lanes of a warp op, against the lanes that exist and wait.
void check_warp_op(Block& b, WarpOp op, unsigned mask, int arg, int width) {
  const unsigned t = b.current, base = t & ~31u, lane = t & 31u;
  if (!(mask >> lane & 1u)) b.fail(std::string(warp_name(op)) + " with mask " + hex(mask) + " omits the calling lane");
  if (width <= 0 || width > 32 || (width & (width - 1)))
    b.fail(std::string(warp_name(op)) + " width " + std::to_string(width) + " is not a power of two up to 32");
  const unsigned lanes = b.n - base;  // lanes the warp has: all 32 but in a partial last warp
  if (lanes < 32 && (mask >> lanes) != 0)
    b.fail(std::string(warp_name(op)) + " mask " + hex(mask) + " names lanes from " + std::to_string(lanes) +
           " up, which the block does not have");
  WarpRendezvous& w = b.warps[t / 32];
  if (w.arrived == 0) {
    w.op = op;
    w.mask = mask;
  } else if (w.op != op || w.mask != mask) {  // name one lane that waits at the other op
    unsigned l = 0;
    while (l < 32 && !(base + l < b.n && b.threads[base + l].state == State::AtWarpOp)) ++l;
    b.fail(std::string(warp_name(op)) + " with mask " + hex(mask) + " meets lane " + std::to_string(l) + " at " +
           warp_name(w.op) + " with mask " + hex(w.mask));
  }
  if (op == kShflXor || op == kShflDown) {
    const unsigned seg = lane & ~static_cast<unsigned>(width - 1);
    const unsigned src = op == kShflXor ? (((lane ^ static_cast<unsigned>(arg)) & (width - 1)) | seg)
                                        : lane + static_cast<unsigned>(arg);
    if ((src & ~static_cast<unsigned>(width - 1)) == seg && !(mask >> src & 1u))
      b.fail(std::string(warp_name(op)) + " reads lane " + std::to_string(src) + ", outside its mask " + hex(mask));
  }
}

std::string check_config(const char* kernel, dim3 g, dim3 b, size_t smem) {
  const std::string k = std::string("CUDA emulation: kernel ") + kernel + ": ";
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  if (threads == 0 || g.x == 0 || g.y == 0 || g.z == 0) return k + "an empty grid or block";
  if (b.x > 1024 || b.y > 1024 || b.z > 64 || threads > kMaxThreadsPerBlock)
    return k + "a block of " + dim_string(b.x, b.y, b.z) + " threads exceeds a GPU's limits (1024 threads; x, y " +
           "up to 1024, z up to 64)";
  if (g.x > 2147483647u || g.y > 65535 || g.z > 65535)
    return k + "grid " + dim_string(g.x, g.y, g.z) + " is out of range (x up to 2^31-1, y and z up to 65535)";
  if (smem > kMaxDynamicSmem)
    return k + std::to_string(smem) + " bytes of dynamic shared memory exceed the 48 KiB a launch gets by default";
  return "";
}

cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;

}  // namespace

void set_schedule(Schedule s, uint64_t seed) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_schedule = s;
  g_seed = seed;
  g_rng.seed(seed);
}

int barrier(BarrierOp op, int predicate) {
  Block& b = *g_block;
  Thread& th = b.self();
  th.state = State::AtBarrier;
  th.op = op;
  th.predicate = predicate;
  b.switch_to_main();
  return static_cast<int>(th.result);
}

uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t bits, int arg, int width) {
  Block& b = *g_block;
  check_warp_op(b, op, mask, arg, width);
  Thread& th = b.self();
  th.state = State::AtWarpOp;
  th.op = op;
  th.mask = mask;
  th.bits = bits;
  th.arg = arg;
  th.width = width;
  b.complete_warp_op_if_ready(b.current / 32);
  if (th.state != State::Ready) b.switch_to_main();
  return th.result;
}

void launch(const char* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& thread_body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const std::string bad = check_config(kernel, grid, block, smem);
  if (!bad.empty()) {
    g_last_error = cudaErrorInvalidConfiguration;
    g_last_message = bad;
    return;
  }
  Block& b = g_state;
  g_block = &b;
  b.kernel = kernel;
  b.n = block.x * block.y * block.z;
  b.body = &thread_body;
  b.error.clear();
  blockDim = block;
  gridDim = grid;
  g_rng.seed(g_seed);  // each launch replays the same schedule
  std::vector<unsigned> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        poison_shared_memory();
        b.start_threads();
        round_order(b.n, &order);
        b.run(order);
        if (!b.error.empty()) {
          asan_unpoison(b.stacks, size_t{b.n} * kStackBytes);  // the failed block's fibers never return
          throw std::runtime_error(b.error);
        }
      }
}

}  // namespace emu
}  // namespace simcore

// ------------------------------------------------ the CUDA runtime API csrc/cuda calls
cudaError_t cudaGetLastError() {
  const cudaError_t e = simcore::emu::g_last_error;
  simcore::emu::g_last_error = cudaSuccess;
  return e;
}
const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  if (e == cudaErrorInvalidConfiguration && !simcore::emu::g_last_message.empty())
    return simcore::emu::g_last_message.c_str();
  return "CUDA emulation: error";
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;  // the host, seen as device 0
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
