// The SIMT emulator's scheduler, device memory and kernel registry
// (declarations and the per-thread API in simt.h).
#include "simt.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <mutex>
#include <random>
#include <string>

namespace simt {

Launch g;

namespace {

// FERROTUNE_SIMT_SCHEDULE: the order fibers are resumed in. "forward" (the
// default: thread 0 first), "reverse", "random" (reshuffled every round),
// "greedy" (always the first runnable thread, so the first warp runs as far
// ahead of the others as the barriers allow) or "greedy-last" (the same from
// the last thread: the last warp runs ahead). Correct kernels give
// bit-identical results under every schedule.
enum class Schedule { Forward, Reverse, Random, Greedy, GreedyLast };

bool parse_schedule(const std::string& v, Schedule* out) {
    if (v == "forward") *out = Schedule::Forward;
    else if (v == "reverse") *out = Schedule::Reverse;
    else if (v == "random") *out = Schedule::Random;
    else if (v == "greedy") *out = Schedule::Greedy;
    else if (v == "greedy-last") *out = Schedule::GreedyLast;
    else return false;
    return true;
}

Schedule& current_schedule() {
    static Schedule s = [] {
        Schedule r = Schedule::Forward;
        const char* e = getenv("FERROTUNE_SIMT_SCHEDULE");
        if (e && !parse_schedule(e, &r)) fprintf(stderr, "FERROTUNE_SIMT_SCHEDULE=%s unknown; using forward\n", e);
        return r;
    }();
    return s;
}

Schedule schedule() { return current_schedule(); }

const char* label(const Dim3& d, char* buf, size_t n) {
    snprintf(buf, n, "(%u,%u,%u)", d.x, d.y, d.z);
    return buf;
}

}  // namespace

// FERROTUNE_SIMT_COPIES: "lazy" (default: a cp.async lands at the issuing
// thread's wait, so reading the tile early sees the 0xFF poison) or "eager"
// (lands at once, so a missing barrier before a tile is overwritten shows).
bool lazy_copies() {
    static const bool lazy = [] {
        const char* e = getenv("FERROTUNE_SIMT_COPIES");
        return !(e && std::string(e) == "eager");
    }();
    return lazy;
}

[[noreturn]] void fail(const char* what) {
    char b[64], t[64];
    if (g.cur)
        fprintf(stderr, "SIMT emulator: %s\n  in kernel %s, block %s, thread %s\n", what, g.kernel,
                label(g.bidx, b, sizeof b), label(g.cur->tid, t, sizeof t));
    else
        fprintf(stderr, "SIMT emulator: %s\n", what);
    fflush(stderr);
    abort();
}

// ---- fibers -------------------------------------------------------------------

namespace {

constexpr size_t kStackBytes = 256 * 1024;

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack
// pointer in *save, loads `load` and restores the registers saved there.
// (System V: rbx, rbp, r12-r15 are callee-saved; the rest the compiler spills
// around the call. Kernels do not change the FP control state.)
extern "C" void simt_switch(void** save, void* load);
asm(R"(
    .text
    .globl simt_switch
    .hidden simt_switch
    .type simt_switch, @function
simt_switch:
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
    .size simt_switch, .-simt_switch
)");

// A stack whose first switch "returns" into entry() with the ABI's alignment.
void context_init(Context& c, unsigned char* stack, size_t bytes, void (*entry)()) {
    void** sp = (void**)(((uintptr_t)(stack + bytes)) & ~(uintptr_t)15);
    *--sp = nullptr;          // entry's return address slot (never returns)
    *--sp = (void*)entry;     // popped by simt_switch's ret
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    c.sp = sp;
}
inline void context_switch(Context& from, Context& to) { simt_switch(&from.sp, to.sp); }
#else
void context_init(Context& c, unsigned char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

void yield_to_scheduler() { context_switch(g.cur->ctx, g.scheduler); }

void wait_until_changed(const unsigned long* gen_ptr, unsigned long gen, const char* what) {
    Fiber* f = g.cur;
    f->wait_ptr = gen_ptr;
    f->wait_gen = gen;
    f->waiting_on = what;
    while (*gen_ptr == gen) yield_to_scheduler();
    f->wait_ptr = nullptr;
    f->waiting_on = nullptr;
}

void release_block_barrier_if_complete() {
    if (g.bar_count > 0 && g.bar_count >= g.nthreads - g.exited) {
        g.bar_count = 0;
        g.bar_gen++;
    }
}

// Every fiber runs this forever: the kernel body for one thread of one
// block, then back to the scheduler, which resumes it for the next block.
void fiber_main() {
    for (;;) {
        Fiber* f = g.cur;
        (*g.body)();
        if (!f->pending.empty()) fail("the thread exited with cp.async copies it never waited for");
        f->done = true;
        g.exited++;
        // Exited threads count as arrived at __syncthreads (PTX ISA, `exit`: a
        // barrier held up only by exited threads is released).
        release_block_barrier_if_complete();
        context_switch(f->ctx, g.scheduler);
    }
}

// The fibers, created on first use and kept (stack included) for later launches.
std::vector<Fiber*> g_pool;

Fiber* fiber(size_t i) {
    while (g_pool.size() <= i) {
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) fail("cannot map a fiber stack");
        mprotect(p, page, PROT_NONE);  // an overflowing kernel faults instead of corrupting a neighbour
        auto* f = new Fiber();
        f->stack = (unsigned char*)p + page;
        context_init(f->ctx, f->stack, kStackBytes, fiber_main);
        g_pool.push_back(f);
    }
    return g_pool[i];
}

[[noreturn]] void report_deadlock() {
    char b[64];
    fprintf(stderr, "SIMT emulator: deadlock in kernel %s, block %s: a barrier or warp collective that not every "
            "thread reaches\n", g.kernel, label(g.bidx, b, sizeof b));
    std::map<std::string, std::vector<int>> by_state;
    for (Fiber* f : g.fibers) by_state[f->done ? "exited" : f->waiting_on ? f->waiting_on : "running"].push_back(f->lin);
    for (auto& [state, ids] : by_state) {
        fprintf(stderr, "  %zu thread(s) %s:", ids.size(), state.c_str());
        for (size_t i = 0; i < ids.size() && i < 16; ++i) fprintf(stderr, " %d", ids[i]);
        fprintf(stderr, ids.size() > 16 ? " ...\n" : "\n");
    }
    g.cur = nullptr;
    fail("deadlock");
}

void run_block() {
    const int n = g.nthreads;
    for (int t = 0; t < n; ++t) {
        Fiber& f = *g.fibers[t];
        f.lin = t;
        f.tid = Dim3{t % g.block.x, (t / g.block.x) % g.block.y, t / (g.block.x * g.block.y)};
        f.done = false;
        f.wait_ptr = nullptr;
        f.waiting_on = nullptr;
        f.pending.clear();
    }
    g.exited = 0;
    g.bar_gen = 0;
    g.bar_count = 0;
    std::fill(g.wbar_count.begin(), g.wbar_count.end(), 0);

    static std::mt19937 rng(12345);
    std::vector<int> order(n);
    const bool backwards = schedule() == Schedule::Reverse || schedule() == Schedule::GreedyLast;
    for (int t = 0; t < n; ++t) order[t] = backwards ? n - 1 - t : t;
    const bool greedy = schedule() == Schedule::Greedy || schedule() == Schedule::GreedyLast;
    for (;;) {
        if (schedule() == Schedule::Random) std::shuffle(order.begin(), order.end(), rng);
        bool progress = false, all_done = true;
        for (int t : order) {
            Fiber& f = *g.fibers[t];
            if (f.done) continue;
            all_done = false;
            if (f.wait_ptr && *f.wait_ptr == f.wait_gen) continue;
            g.cur = &f;
            context_switch(g.scheduler, f.ctx);
            g.cur = nullptr;
            progress = true;
            if (greedy) break;
        }
        if (all_done) return;
        if (!progress) report_deadlock();
    }
}

}  // namespace

void syncthreads() {
    const unsigned long gen = g.bar_gen;
    g.bar_count++;
    if (g.bar_count >= g.nthreads - g.exited) {
        g.bar_count = 0;
        g.bar_gen++;
    } else {
        wait_until_changed(&g.bar_gen, gen, "__syncthreads");
    }
}

// Every lane of the warp must arrive: a lane that exited leaves the others
// waiting, which is reported as a deadlock (undefined behaviour on a GPU).
void warp_barrier(const char* what) {
    const int w = warp_id();
    const int lanes = std::min(32, g.nthreads - w * 32);
    const unsigned long gen = g.wbar_gen[w];
    if (++g.wbar_count[w] == lanes) {
        g.wbar_count[w] = 0;
        g.wbar_gen[w]++;
    } else {
        wait_until_changed(&g.wbar_gen[w], gen, what);
    }
}

static void check_shared(const unsigned char* p, size_t bytes, const char* what) {
    if (p < g.smem || p + bytes > g.smem + g.smem_bytes) {
        char msg[160];
        snprintf(msg, sizeof msg, "%s: shared address outside the %zu bytes of dynamic shared memory (offset %td)", what,
                 g.smem_bytes, p - g.smem);
        fail(msg);
    }
}

void cp_async_16(unsigned char* dst, const void* src, bool valid) {
    if ((uintptr_t)dst & 15) fail("cp.async: shared destination not 16-byte aligned");
    check_shared(dst, 16, "cp.async");
    if (valid) {
        if ((uintptr_t)src & 15) fail("cp.async: global source not 16-byte aligned");
        if (!in_device_memory(src, 16)) fail("cp.async: global source outside every device allocation");
    }
    PendingCopy c{dst, (const unsigned char*)src, valid};
    if (lazy_copies()) {
        g.cur->pending.push_back(c);
    } else if (valid) {
        std::memcpy(dst, src, 16);
    } else {
        std::memset(dst, 0, 16);
    }
}

void cp_async_wait_all() {
    for (auto& c : g.cur->pending) {
        if (c.valid)
            std::memcpy(c.dst, c.src, 16);
        else
            std::memset(c.dst, 0, 16);
    }
    g.cur->pending.clear();
}

void launch(const char* kernel, Dim3 grid, Dim3 block, size_t smem_bytes, const std::function<void()>& body) {
    static std::mutex one_at_a_time;  // the shared state above is per process
    std::lock_guard<std::mutex> lock(one_at_a_time);
    g.kernel = kernel;
    g.grid = grid;
    g.block = block;
    g.nthreads = (int)(block.x * block.y * block.z);
    const int warps = (g.nthreads + 31) / 32;
    g.fibers.resize(g.nthreads);
    for (int t = 0; t < g.nthreads; ++t) g.fibers[t] = fiber(t);
    g.body = &body;
    g.wbar_gen.assign(warps, 0);
    g.wbar_count.assign(warps, 0);
    g.slot.assign((size_t)warps * 32 * 4, 0);
    g.shuffle_slot.assign((size_t)warps * 2 * 32, 0);
    g.slot_ptr.assign((size_t)warps * 32, nullptr);
    std::vector<unsigned char> smem(smem_bytes + 16);
    g.smem = smem.data() + ((16 - ((uintptr_t)smem.data() & 15)) & 15);
    g.smem_bytes = smem_bytes;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                g.bidx = Dim3{x, y, z};
                std::memset(g.smem, 0xff, smem_bytes);  // poison: NaN in f32 and bf16
                run_block();
            }
    g.fibers.clear();
    g.body = nullptr;
    g.kernel = "";
}

// ---- registry -------------------------------------------------------------------

namespace {
struct Entry {
    void* fn;
    Invoker invoke;
    std::vector<int> param_bytes;
};
std::map<std::string, Entry>& registry() {
    static std::map<std::string, Entry> r;
    return r;
}
}  // namespace

void register_kernel(const char* name, void* fn, Invoker invoke, std::vector<int> param_bytes) {
    registry()[name] = Entry{fn, invoke, std::move(param_bytes)};
}

bool find_kernel(const char* name, void** fn, Invoker* invoke, std::vector<int>* param_bytes) {
    auto it = registry().find(name);
    if (it == registry().end()) return false;
    *fn = it->second.fn;
    *invoke = it->second.invoke;
    *param_bytes = it->second.param_bytes;
    return true;
}

// ---- device memory ----------------------------------------------------------------

namespace {

struct Mapping {
    unsigned char* base;  // the whole mapping, guard pages included
    size_t mapped;
    size_t bytes;  // what was asked for
};

std::mutex g_mem_mutex;
std::map<uintptr_t, Mapping> g_live;  // keyed by the allocation's start

size_t page_size() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

}  // namespace

void* device_alloc(size_t bytes) {
    // 256-byte aligned like cuMemAlloc; the end of the rounded size touches
    // the trailing guard page, and a guard page precedes the first byte.
    const size_t rounded = std::max<size_t>(256, (bytes + 255) / 256 * 256);
    const size_t page = page_size();
    const size_t body = (rounded + page - 1) / page * page;
    const size_t mapped = body + 2 * page;
    auto* base = (unsigned char*)mmap(nullptr, mapped, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == (unsigned char*)MAP_FAILED) return nullptr;
    if (mprotect(base + page, body, PROT_READ | PROT_WRITE) != 0) {
        munmap(base, mapped);
        return nullptr;
    }
    unsigned char* p = base + page + body - rounded;
    std::memset(p, 0xff, rounded);
    std::lock_guard<std::mutex> lock(g_mem_mutex);
    g_live[(uintptr_t)p] = Mapping{base, mapped, bytes};
    return p;
}

bool device_free(void* p, size_t* bytes) {
    Mapping m;
    {
        std::lock_guard<std::mutex> lock(g_mem_mutex);
        auto it = g_live.find((uintptr_t)p);
        if (it == g_live.end()) return false;
        m = it->second;
        g_live.erase(it);
    }
    munmap(m.base, m.mapped);
    *bytes = m.bytes;
    return true;
}

bool in_device_memory(const void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(g_mem_mutex);
    auto it = g_live.upper_bound((uintptr_t)p);
    if (it == g_live.begin()) return false;
    --it;
    const uintptr_t lo = it->first, hi = lo + (it->second.bytes + 255) / 256 * 256;
    return (uintptr_t)p >= lo && (uintptr_t)p + bytes <= hi;
}

namespace {

void on_fault(int sig, siginfo_t* info, void*) {
    const uintptr_t a = (uintptr_t)info->si_addr;
    char buf[512];
    int n = snprintf(buf, sizeof buf, "SIMT emulator: %s at address %#lx", sig == SIGBUS ? "SIGBUS" : "SIGSEGV",
                     (unsigned long)a);
    // No locking here: the fault may have happened while the mutex was held.
    for (auto& [lo, m] : g_live) {
        const uintptr_t end = lo + (m.bytes + 255) / 256 * 256;
        if (a >= end && a < end + page_size())
            n += snprintf(buf + n, sizeof buf - n, ", %lu bytes past the end of a %zu-byte device buffer",
                          (unsigned long)(a - lo - m.bytes), m.bytes);
        else if (a < lo && a + page_size() >= lo)
            n += snprintf(buf + n, sizeof buf - n, ", %lu bytes before the start of a %zu-byte device buffer",
                          (unsigned long)(lo - a), m.bytes);
    }
    if (g.cur)
        n += snprintf(buf + n, sizeof buf - n, "\n  in kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", g.kernel,
                      g.bidx.x, g.bidx.y, g.bidx.z, g.cur->tid.x, g.cur->tid.y, g.cur->tid.z);
    snprintf(buf + n, sizeof buf - n, "\n");
    if (write(2, buf, strlen(buf)) < 0) {
    }
    signal(sig, SIG_DFL);  // re-raised on return: the process stops here
}

}  // namespace

void install_fault_reporter() {
    static bool done = false;
    if (done) return;
    done = true;
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
}

}  // namespace simt

// For tests: switch the schedule between launches (same names as
// FERROTUNE_SIMT_SCHEDULE). Returns 0, or -1 for an unknown name.
extern "C" int ferrotune_simt_set_schedule(const char* name) {
    simt::Schedule s;
    if (!name || !simt::parse_schedule(name, &s)) return -1;
    simt::current_schedule() = s;
    return 0;
}
