// libcuda.so for the SIMT emulator: the part of the CUDA driver API that
// cudarc and ferrotune's CUDA backend call, over host memory, with kernels run
// by simt::launch from their host-compiled source (README.md here).
//
// Everything is synchronous: a stream is an ordered queue that is always
// drained, so events and stream waits are no-ops (event timestamps are taken
// at record time). What a real driver refuses, this one refuses too, with
// the same error codes: launches over the kernel's __launch_bounds__ (read
// from the loaded PTX, .maxntid), more than 48 KiB of dynamic shared memory
// without CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, zero or oversized
// grids and blocks, functions the module does not contain, and host kernels
// whose parameter list differs from the PTX entry's.
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "simt.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct FakeCtx* CUcontext;
typedef struct FakeStream* CUstream;
typedef struct FakeEvent* CUevent;
typedef struct FakeModule* CUmodule;
typedef struct FakeFunction* CUfunction;
typedef struct FakePool* CUmemoryPool;

enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
};

// The emulated device: an sm_90 part with a tenth of an H100's SMs (grid
// sizes computed from the SM count stay small), 64 GiB. For tests of the
// start-up checks, FERROTUNE_SIMT_DRIVER_VERSION (e.g. 11080) and
// FERROTUNE_SIMT_COMPUTE_CAPABILITY (e.g. 75) make it an older driver or GPU.
static const char* kName = "SIMT emulator (host CPU)";
static const size_t kTotalBytes = 64ull << 30;
static const int kOptinSharedBytes = 232448;

static int env_int(const char* name, int fallback) {
    const char* v = getenv(name);
    return v && *v ? atoi(v) : fallback;
}
static int driver_version() { return env_int("FERROTUNE_SIMT_DRIVER_VERSION", 12040); }
static int compute_capability() { return env_int("FERROTUNE_SIMT_COMPUTE_CAPABILITY", 90); }
// FERROTUNE_SIMT_DEVICE_COUNT (e.g. 2) shows that many GPUs, for the test of
// the note ferrotune prints when several are visible.
static int device_count() { return env_int("FERROTUNE_SIMT_DEVICE_COUNT", 1); }

struct FakeStream {};
struct FakeEvent {
    std::chrono::steady_clock::time_point at;
};
struct FakeCtx {};
struct FakePool {};

struct FakeFunction {
    std::string name;
    void* fn = nullptr;
    simt::Invoker invoke = nullptr;
    unsigned max_threads = 1024;  // .maxntid
    int max_dynamic_smem = 48 * 1024;
};

struct FakeModule {
    std::map<std::string, unsigned> max_threads;  // entries of the PTX
    std::map<std::string, std::vector<int>> param_bytes;
    std::map<std::string, FakeFunction*> functions;
};

namespace {

std::mutex g_mutex;  // the pool counters and handles below
FakeCtx g_ctx;
FakePool g_pool;
std::set<CUdeviceptr> g_pool_allocs;  // the cuMemAllocAsync'd buffers
size_t g_pool_used = 0, g_pool_used_high = 0, g_all_used = 0;

// The parameter sizes of a PTX entry: ".param .u64 name" -> 8, .u32/.f32 -> 4.
std::vector<int> parse_params(const std::string& sig) {
    std::vector<int> out;
    size_t p = 0;
    while ((p = sig.find(".param", p)) != std::string::npos) {
        p += 6;
        const size_t t = sig.find('.', p);
        if (t == std::string::npos) break;
        const std::string type = sig.substr(t + 1, 3);
        out.push_back(type[1] == '6' ? 8 : type[1] == '3' ? 4 : type[1] == '1' ? 2 : type[1] == '8' ? 1 : -1);
    }
    return out;
}

// Entries of a PTX module with their .maxntid (1024 when absent) and parameters.
bool parse_ptx(const char* ptx, FakeModule* m) {
    const std::string s(ptx);
    size_t p = 0;
    while ((p = s.find(".entry ", p)) != std::string::npos) {
        p += 7;
        const size_t open = s.find('(', p);
        const size_t close = s.find(')', open);
        const size_t body = s.find('{', close);
        if (open == std::string::npos || close == std::string::npos || body == std::string::npos) return false;
        std::string name = s.substr(p, open - p);
        while (!name.empty() && (name.back() == ' ' || name.back() == '\n')) name.pop_back();
        unsigned ntid = 1024;
        const size_t mx = s.find(".maxntid", close);
        if (mx != std::string::npos && mx < body) {
            unsigned x = 1, y = 1, z = 1;
            sscanf(s.c_str() + mx + 8, " %u, %u, %u", &x, &y, &z);
            ntid = x * y * z;
        }
        m->max_threads[name] = ntid;
        m->param_bytes[name] = parse_params(s.substr(open, close - open));
        p = body;
    }
    return !m->max_threads.empty();
}

CUresult alloc(CUdeviceptr* dptr, size_t bytes, bool pool) {
    if (!dptr) return CUDA_ERROR_INVALID_VALUE;
    void* p = simt::device_alloc(bytes);
    if (!p) return CUDA_ERROR_OUT_OF_MEMORY;
    *dptr = (CUdeviceptr)p;
    std::lock_guard<std::mutex> lock(g_mutex);
    g_all_used += bytes;
    if (pool) {
        g_pool_allocs.insert(*dptr);
        g_pool_used += bytes;
        g_pool_used_high = std::max(g_pool_used_high, g_pool_used);
    }
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr d) {
    size_t bytes = 0;
    if (!simt::device_free((void*)d, &bytes)) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(g_mutex);
    g_all_used -= bytes;
    if (g_pool_allocs.erase(d)) g_pool_used -= bytes;
    return CUDA_SUCCESS;
}

// What crosses between host and device, and how often the host waits for it
// (FERROTUNE_SIMT_COUNTERS=1 prints them at exit: how a test checks that a
// training step synchronises only to read what it logs).
std::atomic<unsigned long long> g_launches{0}, g_to_device{0}, g_to_host{0}, g_host_waits{0};

void print_counters() {
    fprintf(stderr, "SIMT emulator counters: launches %llu, host-to-device copies %llu, device-to-host copies %llu, "
            "host waits %llu\n", g_launches.load(), g_to_device.load(), g_to_host.load(), g_host_waits.load());
}

CUresult copy(void* dst, const void* src, size_t bytes) {
    if (bytes && (!dst || !src)) return CUDA_ERROR_INVALID_VALUE;
    std::memmove(dst, src, bytes);
    return CUDA_SUCCESS;
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) {
    simt::install_fault_reporter();
    static bool once = false;
    const char* c = getenv("FERROTUNE_SIMT_COUNTERS");
    if (!once && c && std::string(c) == "1") atexit(print_counters);
    once = true;
    return CUDA_SUCCESS;
}
CUresult cuDriverGetVersion(int* v) {
    *v = driver_version();
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetCount(int* n) {
    *n = device_count();
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    // Every ordinal is the same emulated device (one set of buffers).
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, (size_t)len, "%s", kName);
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = kTotalBytes;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 1: *v = 1024; break;                // MAX_THREADS_PER_BLOCK
        case 2: case 3: *v = 1024; break;        // MAX_BLOCK_DIM_X, Y
        case 4: *v = 64; break;                  // MAX_BLOCK_DIM_Z
        case 5: *v = 2147483647; break;          // MAX_GRID_DIM_X
        case 6: case 7: *v = 65535; break;       // MAX_GRID_DIM_Y, Z
        case 8: *v = 49152; break;               // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *v = 32; break;                 // WARP_SIZE
        case 16: *v = 16; break;                 // MULTIPROCESSOR_COUNT
        case 75: *v = compute_capability() / 10; break;  // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = compute_capability() % 10; break;  // COMPUTE_CAPABILITY_MINOR
        case 97: *v = kOptinSharedBytes; break;  // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 115: *v = 1; break;                 // MEMORY_POOLS_SUPPORTED
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
    *c = &g_ctx;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext) { return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = &g_ctx;
    return CUDA_SUCCESS;
}
CUresult cuCtxPushCurrent_v2(CUcontext) { return CUDA_SUCCESS; }
CUresult cuCtxPopCurrent_v2(CUcontext* c) {
    if (c) *c = &g_ctx;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() {
    g_host_waits++;
    return CUDA_SUCCESS;
}
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> lock(g_mutex);
    *total = kTotalBytes;
    *free_bytes = kTotalBytes - std::min(kTotalBytes, g_all_used);
    return CUDA_SUCCESS;
}

// ---- streams and events ----
CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = new FakeStream();
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned, int) { return cuStreamCreate(s, 0); }
CUresult cuStreamDestroy_v2(CUstream s) {
    delete s;
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(CUstream) {
    g_host_waits++;
    return CUDA_SUCCESS;
}
CUresult cuStreamQuery(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }
CUresult cuEventCreate(CUevent* e, unsigned) {
    *e = new FakeEvent();
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(CUevent e) {
    delete e;
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent e, CUstream) {
    e->at = std::chrono::steady_clock::now();
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(CUevent) {
    g_host_waits++;
    return CUDA_SUCCESS;
}
CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

// ---- memory ----
CUresult cuMemAlloc_v2(CUdeviceptr* d, size_t bytes) { return alloc(d, bytes, false); }
CUresult cuMemFree_v2(CUdeviceptr d) { return release(d); }
CUresult cuMemAllocAsync(CUdeviceptr* d, size_t bytes, CUstream) { return alloc(d, bytes, true); }
CUresult cuMemFreeAsync(CUdeviceptr d, CUstream) { return release(d); }
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
    g_to_device++;
    return copy((void*)d, h, n);
}
CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    g_to_host++;
    return copy(h, (const void*)d, n);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) { return copy((void*)d, (const void*)s, n); }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, CUstream) {
    g_to_device++;
    return copy((void*)d, h, n);
}
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, CUstream) {
    g_to_host++;
    return copy(h, (const void*)d, n);
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream) {
    return copy((void*)d, (const void*)s, n);
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    std::memset((void*)d, v, n);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream) { return cuMemsetD8_v2(d, v, n); }
CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned v, size_t n) {
    for (size_t i = 0; i < n; ++i) std::memcpy((unsigned char*)d + 4 * i, &v, 4);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, CUstream) { return cuMemsetD32_v2(d, v, n); }

// The default pool: used / high-water counters of the stream-ordered
// allocations (attributes 7 USED_MEM_CURRENT, 8 USED_MEM_HIGH; 5/6 the
// reserved ones read the same; 4 RELEASE_THRESHOLD is accepted).
CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* p, CUdevice) {
    *p = &g_pool;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetMemPool(CUmemoryPool* p, CUdevice d) { return cuDeviceGetDefaultMemPool(p, d); }
CUresult cuMemPoolGetAttribute(CUmemoryPool, int attr, void* value) {
    std::lock_guard<std::mutex> lock(g_mutex);
    unsigned long long v = 0;
    switch (attr) {
        case 5: case 7: v = g_pool_used; break;
        case 6: case 8: v = g_pool_used_high; break;
        case 4: v = ~0ull; break;
        default: return CUDA_ERROR_INVALID_VALUE;
    }
    std::memcpy(value, &v, 8);
    return CUDA_SUCCESS;
}
CUresult cuMemPoolSetAttribute(CUmemoryPool, int attr, void* value) {
    std::lock_guard<std::mutex> lock(g_mutex);
    unsigned long long v;
    std::memcpy(&v, value, 8);
    switch (attr) {
        case 4: return CUDA_SUCCESS;
        case 6: case 8:
            if (v != 0) return CUDA_ERROR_INVALID_VALUE;  // only a reset to 0 is allowed
            g_pool_used_high = g_pool_used;
            return CUDA_SUCCESS;
        default: return CUDA_ERROR_INVALID_VALUE;
    }
}
CUresult cuMemPoolTrimTo(CUmemoryPool, size_t) { return CUDA_SUCCESS; }

// ---- modules and launches ----
CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    auto* mod = new FakeModule();
    if (!image || !parse_ptx((const char*)image, mod)) {
        delete mod;
        return CUDA_ERROR_INVALID_IMAGE;
    }
    *m = mod;
    return CUDA_SUCCESS;
}
CUresult cuModuleLoadDataEx(CUmodule* m, const void* image, unsigned, void*, void**) {
    return cuModuleLoadData(m, image);
}
CUresult cuModuleUnload(CUmodule m) {
    for (auto& [_, f] : m->functions) delete f;
    delete m;
    return CUDA_SUCCESS;
}
CUresult cuModuleGetFunction(CUfunction* out, CUmodule m, const char* name) {
    auto it = m->max_threads.find(name);
    if (it == m->max_threads.end()) return CUDA_ERROR_NOT_FOUND;
    std::lock_guard<std::mutex> lock(g_mutex);
    auto& f = m->functions[name];
    if (!f) {
        auto* nf = new FakeFunction();
        nf->name = name;
        nf->max_threads = it->second;
        std::vector<int> host_params;
        if (!simt::find_kernel(name, &nf->fn, &nf->invoke, &host_params)) {
            fprintf(stderr, "SIMT emulator: kernel %s is in the PTX but was not compiled for the host\n", name);
            delete nf;
            return CUDA_ERROR_NOT_FOUND;
        }
        if (host_params != m->param_bytes[name]) {
            fprintf(stderr, "SIMT emulator: kernel %s: the host build's parameter sizes differ from the PTX entry's\n",
                    name);
            delete nf;
            return CUDA_ERROR_INVALID_IMAGE;
        }
        f = nf;
    }
    *out = f;
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction f, int attr, int value) {
    if (attr == 8) {  // MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > kOptinSharedBytes) return CUDA_ERROR_INVALID_VALUE;
        f->max_dynamic_smem = value;
    }
    return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, int attr, CUfunction f) {
    switch (attr) {
        case 0: *v = (int)f->max_threads; break;  // MAX_THREADS_PER_BLOCK
        case 8: *v = f->max_dynamic_smem; break;
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
CUresult cuFuncSetCacheConfig(CUfunction, int) { return CUDA_SUCCESS; }

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, CUstream, void** params, void** extra) {
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    if (extra) return CUDA_ERROR_INVALID_VALUE;  // only kernelParams is emulated
    if (gx == 0 || gy == 0 || gz == 0 || gx > 2147483647u || gy > 65535 || gz > 65535) return CUDA_ERROR_INVALID_VALUE;
    if (bx == 0 || by == 0 || bz == 0 || bx > 1024 || by > 1024 || bz > 64 || (unsigned long long)bx * by * bz > 1024)
        return CUDA_ERROR_INVALID_VALUE;
    if ((unsigned long long)bx * by * bz > f->max_threads) return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    if ((int)smem > f->max_dynamic_smem) return CUDA_ERROR_INVALID_VALUE;
    const FakeFunction* fn = f;
    g_launches++;
    simt::launch(fn->name.c_str(), simt::Dim3{gx, gy, gz}, simt::Dim3{bx, by, bz}, smem,
                 [fn, params] { fn->invoke(fn->fn, params); });
    return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult r, const char** s) {
    switch (r) {
        case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
        case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *s = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; break;
        default: *s = "CUDA_ERROR_UNKNOWN";
    }
    return CUDA_SUCCESS;
}
CUresult cuGetErrorString(CUresult r, const char** s) { return cuGetErrorName(r, s); }

// For tests: the counters so far, in the order FERROTUNE_SIMT_COUNTERS
// prints them (launches, host-to-device copies, device-to-host copies, host
// waits), so that a test can check what one op does between two reads.
void ferrotune_simt_counters(unsigned long long out[4]) {
    out[0] = g_launches.load();
    out[1] = g_to_device.load();
    out[2] = g_to_host.load();
    out[3] = g_host_waits.load();
}

}  // extern "C"
