// libcublas.so for the SIMT emulator: the cuBLAS calls ferrotune's CUDA
// backend makes (handle, stream, cublasGemmEx), computed on the host over the
// emulator's device memory (README.md here).
//
// cublasGemmEx follows the cuBLAS documentation: column-major operands,
// C = alpha op(A) op(B) + beta C with op(A) m x k and op(B) k x n; scalars are
// host f32 (CUBLAS_POINTER_MODE_HOST, compute type CUBLAS_COMPUTE_32F);
// A/B/C each f32 (CUDA_R_32F) or bf16 (CUDA_R_16BF); C is not read when beta
// is 0 (so a poisoned output stays harmless, as on the GPU). Products are
// summed in f64 and the result rounded once to C's type. Every operand must
// lie inside a live device allocation and the leading dimensions must be
// valid, or the call fails with CUBLAS_STATUS_INVALID_VALUE.
#include "simt.h"

typedef int cublasStatus_t;
typedef struct FakeBlas* cublasHandle_t;
struct FakeBlas {};

enum : cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum { CUBLAS_COMPUTE_32F = 68 };

namespace {

double element(const void* p, int type, long long i) {
    if (type == CUDA_R_32F) return ((const float*)p)[i];
    return __bfloat162float(((const __nv_bfloat16*)p)[i]);
}

void store(void* p, int type, long long i, float v) {
    if (type == CUDA_R_32F)
        ((float*)p)[i] = v;
    else
        ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn(v);
}

size_t type_bytes(int type) { return type == CUDA_R_32F ? 4 : 2; }

// Whether a column-major rows x cols operand with leading dimension ld fits
// in one device allocation.
bool operand_ok(const void* p, int type, int rows, int cols, int ld) {
    if (ld < std::max(1, rows)) return false;
    if (rows == 0 || cols == 0) return true;
    const size_t last = (size_t)(cols - 1) * ld + rows;  // elements spanned
    return simt::in_device_memory(p, last * type_bytes(type));
}

}  // namespace

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
    *h = new FakeBlas();
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t h, void*) {
    return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t, int) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t, void*, size_t) { return CUBLAS_STATUS_SUCCESS; }
const char* cublasGetStatusName(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        default: return "CUBLAS_STATUS_UNKNOWN";
    }
}
const char* cublasGetStatusString(cublasStatus_t s) { return cublasGetStatusName(s); }

cublasStatus_t cublasGemmEx(cublasHandle_t h, int transa, int transb, int m, int n, int k, const void* alpha,
                            const void* A, int a_type, int lda, const void* B, int b_type, int ldb, const void* beta,
                            void* C, int c_type, int ldc, int compute_type, int /*algo*/) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (m < 0 || n < 0 || k < 0 || (transa != CUBLAS_OP_N && transa != CUBLAS_OP_T) ||
        (transb != CUBLAS_OP_N && transb != CUBLAS_OP_T))
        return CUBLAS_STATUS_INVALID_VALUE;
    for (int t : {a_type, b_type, c_type})
        if (t != CUDA_R_32F && t != CUDA_R_16BF) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (compute_type != CUBLAS_COMPUTE_32F || a_type != b_type) return CUBLAS_STATUS_NOT_SUPPORTED;
    const bool ta = transa == CUBLAS_OP_T, tb = transb == CUBLAS_OP_T;
    // Stored shapes: A is m x k (k x m when transposed), B is k x n (n x k).
    if (!operand_ok(A, a_type, ta ? k : m, ta ? m : k, lda) || !operand_ok(B, b_type, tb ? n : k, tb ? k : n, ldb) ||
        !operand_ok(C, c_type, m, n, ldc))
        return CUBLAS_STATUS_INVALID_VALUE;
    const float al = *(const float*)alpha, be = *(const float*)beta;
    // op(A) as m rows of k and op(B) as n rows of k, so that every output
    // is one contiguous dot product.
    std::vector<double> a((size_t)m * k), b((size_t)n * k);
    for (int i = 0; i < m; ++i)
        for (int p = 0; p < k; ++p) a[(size_t)i * k + p] = element(A, a_type, ta ? (long long)i * lda + p : (long long)p * lda + i);
    for (int j = 0; j < n; ++j)
        for (int p = 0; p < k; ++p) b[(size_t)j * k + p] = element(B, b_type, tb ? (long long)p * ldb + j : (long long)j * ldb + p);
    for (int j = 0; j < n; ++j) {
        const double* bj = &b[(size_t)j * k];
        for (int i = 0; i < m; ++i) {
            const double* ai = &a[(size_t)i * k];
            double acc = 0;
            for (int p = 0; p < k; ++p) acc += ai[p] * bj[p];
            const long long ci = (long long)j * ldc + i;
            float v = (float)((double)al * acc);
            if (be != 0.0f) v = (float)((double)al * acc + (double)be * element(C, c_type, ci));
            store(C, c_type, ci, v);
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
