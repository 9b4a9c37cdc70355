// TensorLogic CUDA kernels, compiled at run time by NVRTC for the card's
// architecture (see `lib.rs`: the PTX is cached on disk by source hash and
// arch). Every kernel here has a CPU counterpart in tl-core / tl-model that
// the GPU tests hold it to.
//
// Weight layouts on the device (repacked at upload from the GGUF blocks so
// that every load is aligned and vectorised; N output rows of K inputs):
//   Q8_0: p0 int8 qs[N*K]                 p1 half d[N*K/32]
//   Q4_0: p0 u8   qs[N*K/2] (16 B/block)  p1 half d[N*K/32]
//   Q5_0: p0 u8   qs[N*K/2]  p2 u32 qh[N*K/32]  p1 half d
//   Q4_K: p0 the GGML blocks as they are (144 B, 16-byte aligned)
//   Q6_K: p0 ql[N*K/2]  p2 qh[N*K/4]  p3 int8 scales[N*K/16]  p1 half d[N*K/256]
//   Q4_1: p0 u8   qs[N*K/2]  p1 half d  p3 half m
//   Q5_1: p0 u8   qs[N*K/2]  p2 u32 qh  p1 half d  p3 half m
//   Q5_K: p0 the GGML blocks as they are (176 B, 16-byte aligned)
//   F16 : p0 half w[N*K] (F32, BF16, Q2_K and Q3_K are converted to this at load)
// Activations of the quantized products: int8 xq[M*K] with one float scale
// per 32 values, xd[M*K/32] (ggml's q8_1 without the sum: the offsets of
// Q4_0/Q5_0/Q4_K are taken from a dp4a with ones instead).

// Half precision: the toolkit's header when the machine has it (lib.rs
// passes TL_FP16_HEADER and its include path), else the few conversions
// used here, written on PTX's cvt instructions, so a machine with only the
// driver and NVRTC compiles the kernels too.
#ifdef TL_FP16_HEADER
#include <cuda_fp16.h>
#else
struct alignas(2) __half {
    unsigned short x;
};
struct alignas(4) __half2 {
    __half x, y;
};
__device__ __forceinline__ float __half2float(__half h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.x));
    return f;
}
__device__ __forceinline__ __half __float2half_rn(float f) {
    __half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.x) : "f"(f));
    return h;
}
__device__ __forceinline__ float2 __half22float2(__half2 h) {
    float2 r;
    r.x = __half2float(h.x);
    r.y = __half2float(h.y);
    return r;
}
__device__ __forceinline__ __half2 __floats2half2_rn(float a, float b) {
    __half2 r;
    r.x = __float2half_rn(a);
    r.y = __float2half_rn(b);
    return r;
}
__device__ __forceinline__ float __low2float(__half2 h) { return __half2float(h.x); }
__device__ __forceinline__ float __high2float(__half2 h) { return __half2float(h.y); }
#endif

#define TL_INF __int_as_float(0x7f800000)

// Programmatic dependent launch (Hopper+): lib.rs launches every kernel
// with programmatic stream serialisation, so a kernel may start while the
// previous one is finishing; each kernel therefore first waits for its
// predecessors to complete and their writes to be visible (unconditionally,
// before any early return, so "this grid done" still implies "every earlier
// grid done"), then lets its successor launch.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TL_PDL() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define TL_PDL()
#endif

#define T_F16 0
#define T_Q8_0 1
#define T_Q4_0 2
#define T_Q5_0 3
#define T_Q4_K 4
#define T_Q6_K 5
#define T_Q4_1 6
#define T_Q5_1 7
#define T_Q5_K 8
#define T_Q2_K 9
#define T_Q3_K 10

struct W {
    const unsigned char* p0;
    const unsigned char* p1;
    const unsigned char* p2;
    const unsigned char* p3;
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

__device__ __forceinline__ float h2f(const unsigned char* p, long i) {
    return __half2float(((const __half*)p)[i]);
}

__device__ __forceinline__ int ld_int(const unsigned char* p, long byte_off) {
    return *(const int*)(p + byte_off);
}

// ggml get_scale_min_k4.
__device__ __forceinline__ void scale_min_k4(int j, const unsigned char* q, int* sc, int* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Q3_K's 6-bit scale i (0..15) from its 12 packed bytes (ggml's kmask
// unpacking): low 4 bits from byte i (i < 8) or the high nibble of byte
// i - 8, high 2 bits from byte 8 + i % 4 at bit 2·(i / 4); minus 32.
__device__ __forceinline__ int q3k_scale(const unsigned char* s, int i) {
    int lo = i < 8 ? (s[i] & 0xF) : (s[i - 8] >> 4);
    int hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    return (lo | (hi << 4)) - 32;
}

// ---------------------------------------------------------------------------
// Dequantization of one 32-value block (row r, block b of K/32).

template <int T>
__device__ __forceinline__ void dequant32(const W& w, long r, int b, int K, float* v) {
    const long nb = K / 32;
    if (T == T_F16) {
        const __half* p = (const __half*)w.p0 + r * K + b * 32;
        for (int i = 0; i < 32; i++) v[i] = __half2float(p[i]);
    } else if (T == T_Q8_0) {
        const signed char* q = (const signed char*)w.p0 + r * K + b * 32;
        float d = h2f(w.p1, r * nb + b);
        for (int i = 0; i < 32; i++) v[i] = d * q[i];
    } else if (T == T_Q4_0) {
        const unsigned char* q = w.p0 + (r * nb + b) * 16;
        float d = h2f(w.p1, r * nb + b);
        for (int i = 0; i < 16; i++) {
            v[i] = d * ((q[i] & 0xF) - 8);
            v[i + 16] = d * ((q[i] >> 4) - 8);
        }
    } else if (T == T_Q5_0) {
        const unsigned char* q = w.p0 + (r * nb + b) * 16;
        unsigned qh = ((const unsigned*)w.p2)[r * nb + b];
        float d = h2f(w.p1, r * nb + b);
        for (int i = 0; i < 16; i++) {
            int lo = (q[i] & 0xF) | (((qh >> i) & 1) << 4);
            int hi = (q[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
            v[i] = d * (lo - 16);
            v[i + 16] = d * (hi - 16);
        }
    } else if (T == T_Q4_1 || T == T_Q5_1) {
        const unsigned char* q = w.p0 + (r * nb + b) * 16;
        unsigned qh = T == T_Q5_1 ? ((const unsigned*)w.p2)[r * nb + b] : 0;
        float d = h2f(w.p1, r * nb + b), mn = h2f(w.p3, r * nb + b);
        for (int i = 0; i < 16; i++) {
            int lo = (q[i] & 0xF) | (((qh >> i) & 1) << 4);
            int hi = (q[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
            v[i] = d * lo + mn;
            v[i + 16] = d * hi + mn;
        }
    } else if (T == T_Q5_K) {
        const long nbk = K / 256;
        const unsigned char* blk = w.p0 + (r * nbk + b / 8) * 176;
        int j = b % 8;
        float d = __half2float(((const __half*)blk)[0]);
        float dmin = __half2float(((const __half*)blk)[1]);
        int sc, m;
        scale_min_k4(j, blk + 4, &sc, &m);
        const unsigned char* qh = blk + 16;
        const unsigned char* q = blk + 48 + 32 * (j / 2);
        float d1 = d * sc, m1 = dmin * m;
        for (int i = 0; i < 32; i++) {
            int n = ((j & 1) ? (q[i] >> 4) : (q[i] & 0xF)) | (((qh[i] >> j) & 1) << 4);
            v[i] = d1 * n - m1;
        }
    } else if (T == T_Q4_K) {
        const long nbk = K / 256;
        const unsigned char* blk = w.p0 + (r * nbk + b / 8) * 144;
        int j = b % 8;
        float d = __half2float(((const __half*)blk)[0]);
        float dmin = __half2float(((const __half*)blk)[1]);
        int sc, m;
        scale_min_k4(j, blk + 4, &sc, &m);
        const unsigned char* q = blk + 16 + 32 * (j / 2);
        float d1 = d * sc, m1 = dmin * m;
        for (int i = 0; i < 32; i++) {
            int n = (j & 1) ? (q[i] >> 4) : (q[i] & 0xF);
            v[i] = d1 * n - m1;
        }
    } else if (T == T_Q2_K || T == T_Q3_K) {
        // Layouts: p0 = qs (64 bytes a super-block), p1 = d (Q2_K: d, dmin
        // as a half2), p2 = Q3_K's hmask (32 bytes), p3 = scales (Q2_K 16,
        // Q3_K 12 bytes). Block b of a super-block: half n = j / 4, shift
        // j % 4; values l use qs[32 n + l] >> 2 (j % 4) and scale
        // 8 n + 2 (j % 4) + l / 16.
        const long nbk = K / 256;
        long sb = r * nbk + b / 8;
        int j = b % 8, n = j / 4, sh = j % 4;
        const unsigned char* q = w.p0 + sb * 64 + n * 32;
        if (T == T_Q2_K) {
            __half2 dm = ((const __half2*)w.p1)[sb];
            float d = __low2float(dm), dmin = __high2float(dm);
            const unsigned char* sc = w.p3 + sb * 16 + n * 8 + 2 * sh;
            for (int l = 0; l < 32; l++) {
                int c = sc[l / 16];
                v[l] = d * (c & 0xF) * ((q[l] >> (2 * sh)) & 3) - dmin * (c >> 4);
            }
        } else {
            float d = h2f(w.p1, sb);
            const unsigned char* hm = w.p2 + sb * 32;
            const unsigned char* sc = w.p3 + sb * 12;
            int bit = 4 * n + sh;
            for (int l = 0; l < 32; l++) {
                int qv = ((q[l] >> (2 * sh)) & 3) - (((hm[l] >> bit) & 1) ? 0 : 4);
                v[l] = d * q3k_scale(sc, 8 * n + 2 * sh + l / 16) * qv;
            }
        }
    } else if (T == T_Q6_K) {
        const long nbk = K / 256;
        long sb = r * nbk + b / 8;
        int j = b % 8, n = j / 4, k = j % 4;
        const unsigned char* ql = w.p0 + sb * 128 + n * 64 + (k & 1) * 32;
        const unsigned char* qh = w.p2 + sb * 64 + n * 32;
        const signed char* sc = (const signed char*)w.p3 + sb * 16 + n * 8;
        float d = h2f(w.p1, sb);
        for (int l = 0; l < 32; l++) {
            int lo = (k >= 2) ? (ql[l] >> 4) : (ql[l] & 0xF);
            int q = (lo | (((qh[l] >> (2 * k)) & 3) << 4)) - 32;
            v[l] = d * sc[l / 16 + 2 * k] * q;
        }
    }
}

// out[r, :] (f16, row-major [N, K]) = the dequantized weight; one thread per
// 32-value block.
template <int T>
__device__ void dequant_f16(W w, __half* out, int N, int K) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long nb = K / 32;
    if (i >= (long)N * nb) return;
    long r = i / nb;
    int b = (int)(i % nb);
    float v[32];
    dequant32<T>(w, r, b, K, v);
    __half2* o = (__half2*)(out + r * K + b * 32);
#pragma unroll
    for (int k = 0; k < 16; k++) o[k] = __floats2half2_rn(v[2 * k], v[2 * k + 1]);
}

extern "C" __global__ void dequant_f16_q8_0(W w, __half* o, int N, int K) { TL_PDL(); dequant_f16<T_Q8_0>(w, o, N, K); }
extern "C" __global__ void dequant_f16_q4_0(W w, __half* o, int N, int K) { TL_PDL(); dequant_f16<T_Q4_0>(w, o, N, K); }
extern "C" __global__ void dequant_f16_q5_0(W w, __half* o, int N, int K) { TL_PDL(); dequant_f16<T_Q5_0>(w, o, N, K); }
extern "C" __global__ void dequant_f16_q4_k(W w, __half* o, int N, int K) { TL_PDL(); dequant_f16<T_Q4_K>(w, o, N, K); }
extern "C" __global__ void dequant_f16_q6_k(W w, __half* o, int N, int K) { TL_PDL(); dequant_f16<T_Q6_K>(w, o, N, K); }
extern "C" __global__ void dequant_f16_q4_1(W w, __half* o, int N, int K) { TL_PDL(); dequant_f16<T_Q4_1>(w, o, N, K); }
extern "C" __global__ void dequant_f16_q5_1(W w, __half* o, int N, int K) { TL_PDL(); dequant_f16<T_Q5_1>(w, o, N, K); }
extern "C" __global__ void dequant_f16_q5_k(W w, __half* o, int N, int K) { TL_PDL(); dequant_f16<T_Q5_K>(w, o, N, K); }
extern "C" __global__ void dequant_f16_q2_k(W w, __half* o, int N, int K) { TL_PDL(); dequant_f16<T_Q2_K>(w, o, N, K); }
extern "C" __global__ void dequant_f16_q3_k(W w, __half* o, int N, int K) { TL_PDL(); dequant_f16<T_Q3_K>(w, o, N, K); }

// Embedding rows: out[t, :] = scale * table[ids[t], :]; grid.x = tokens,
// threads over the row's 32-value blocks.
template <int T>
__device__ void embed(W w, const int* ids, float* out, int K, float scale) {
    int t = blockIdx.x;
    long r = ids[t];
    for (int b = threadIdx.x; b < K / 32; b += blockDim.x) {
        float v[32];
        dequant32<T>(w, r, b, K, v);
        float* o = out + (long)t * K + b * 32;
        for (int i = 0; i < 32; i++) o[i] = v[i] * scale;
    }
}

extern "C" __global__ void embed_f16(W w, const int* ids, float* o, int K, float s) { TL_PDL(); embed<T_F16>(w, ids, o, K, s); }
extern "C" __global__ void embed_q8_0(W w, const int* ids, float* o, int K, float s) { TL_PDL(); embed<T_Q8_0>(w, ids, o, K, s); }
extern "C" __global__ void embed_q4_0(W w, const int* ids, float* o, int K, float s) { TL_PDL(); embed<T_Q4_0>(w, ids, o, K, s); }
extern "C" __global__ void embed_q5_0(W w, const int* ids, float* o, int K, float s) { TL_PDL(); embed<T_Q5_0>(w, ids, o, K, s); }
extern "C" __global__ void embed_q4_k(W w, const int* ids, float* o, int K, float s) { TL_PDL(); embed<T_Q4_K>(w, ids, o, K, s); }
extern "C" __global__ void embed_q6_k(W w, const int* ids, float* o, int K, float s) { TL_PDL(); embed<T_Q6_K>(w, ids, o, K, s); }
extern "C" __global__ void embed_q4_1(W w, const int* ids, float* o, int K, float s) { TL_PDL(); embed<T_Q4_1>(w, ids, o, K, s); }
extern "C" __global__ void embed_q5_1(W w, const int* ids, float* o, int K, float s) { TL_PDL(); embed<T_Q5_1>(w, ids, o, K, s); }
extern "C" __global__ void embed_q5_k(W w, const int* ids, float* o, int K, float s) { TL_PDL(); embed<T_Q5_K>(w, ids, o, K, s); }
extern "C" __global__ void embed_q2_k(W w, const int* ids, float* o, int K, float s) { TL_PDL(); embed<T_Q2_K>(w, ids, o, K, s); }
extern "C" __global__ void embed_q3_k(W w, const int* ids, float* o, int K, float s) { TL_PDL(); embed<T_Q3_K>(w, ids, o, K, s); }

// ---------------------------------------------------------------------------
extern "C" __global__ void to_f16(const float* x, __half* y, long n) { TL_PDL();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2half_rn(x[i]);
}

// ---------------------------------------------------------------------------
// Quantized matrix-vector products for 1..8 activation rows: one warp (or
// `split` warps) per output row, lanes over "units" of the row (a unit is
// 16 bytes of quantized weights where the layout allows, 8 for the 4/5-bit
// 32-value blocks, and the activations they meet), each weight load used
// for all M rows. out[m * ldo + row].

template <int T>
__device__ __forceinline__ int units_per_row(int K) {
    return (T == T_Q2_K || T == T_Q3_K) ? K / 64 : (T == T_Q4_K || T == T_Q5_K) ? K / 32 : K / 16;
}

__device__ __forceinline__ int dot4(int4 a, int4 b) {
    return __dp4a(a.x, b.x, __dp4a(a.y, b.y, __dp4a(a.z, b.z, __dp4a(a.w, b.w, 0))));
}

__device__ __forceinline__ int sum4(int4 b) {
    return __dp4a(0x01010101, b.x, __dp4a(0x01010101, b.y, __dp4a(0x01010101, b.z, __dp4a(0x01010101, b.w, 0))));
}

// Bits 0..3 of x to bit 4 of bytes 0..3.
__device__ __forceinline__ int spread4(unsigned x) {
    return (int)(((x & 1) << 4) | ((x & 2) << 11) | ((x & 4) << 18) | ((x & 8) << 25));
}

template <int T, int M>
__device__ __forceinline__ void unit_dot(const W& w, long r, int u, int K, const signed char* xq,
                                         const float* xd, float* acc) {
    const long nb = K / 32;
    if (T == T_Q8_0) {
        int b = u / 2, off = (u % 2) * 16;
        int4 q = *(const int4*)(w.p0 + r * K + b * 32 + off);
        float d = h2f(w.p1, r * nb + b);
#pragma unroll
        for (int m = 0; m < M; m++) {
            int4 x = *(const int4*)(xq + (long)m * K + b * 32 + off);
            acc[m] += d * xd[(long)m * nb + b] * dot4(q, x);
        }
    } else if (T == T_Q4_0 || T == T_Q5_0 || T == T_Q4_1 || T == T_Q5_1) {
        // 8 bytes at j of a block's 16: values j..j+7 (low nibbles) and
        // j+16..j+23 (high nibbles).
        int b = u / 2, j = (u % 2) * 8;
        int2 q = *(const int2*)(w.p0 + (r * nb + b) * 16 + j);
        int4 lh;  // lo(j), lo(j+4), hi(j+16), hi(j+20)
        lh.x = q.x & 0x0F0F0F0F;
        lh.y = q.y & 0x0F0F0F0F;
        lh.z = (q.x >> 4) & 0x0F0F0F0F;
        lh.w = (q.y >> 4) & 0x0F0F0F0F;
        int off = (T == T_Q4_0) ? 8 : (T == T_Q5_0 ? 16 : 0);
        if (T == T_Q5_0 || T == T_Q5_1) {
            unsigned qh = ((const unsigned*)w.p2)[r * nb + b];
            unsigned hl = (qh >> j) & 0xFF, hh = (qh >> (j + 16)) & 0xFF;
            lh.x |= spread4(hl & 0xF);
            lh.y |= spread4(hl >> 4);
            lh.z |= spread4(hh & 0xF);
            lh.w |= spread4(hh >> 4);
        }
        float d = h2f(w.p1, r * nb + b);
        float mn = (T == T_Q4_1 || T == T_Q5_1) ? h2f(w.p3, r * nb + b) : 0.0f;
#pragma unroll
        for (int m = 0; m < M; m++) {
            const signed char* xb = xq + (long)m * K + b * 32;
            int2 x0 = *(const int2*)(xb + j), x1 = *(const int2*)(xb + 16 + j);
            int4 x = make_int4(x0.x, x0.y, x1.x, x1.y);
            int s = dot4(lh, x), sx = sum4(x);
            float dx = xd[(long)m * nb + b];
            acc[m] += d * dx * (s - off * sx) + mn * dx * sx;
        }
    } else if (T == T_Q4_K || T == T_Q5_K) {
        // 16 bytes of a super-block's quants: group g's (two 32-value
        // sub-blocks, low and high nibbles) values 16h..16h+15.
        const long nbk = K / 256;
        int sb = u / 8, l = u % 8, g = l / 2, hq = 16 * (l % 2);
        const int bs = T == T_Q4_K ? 144 : 176, qs = T == T_Q4_K ? 16 : 48;
        const unsigned char* blk = w.p0 + (r * nbk + sb) * bs;
        int4 q = *(const int4*)(blk + qs + 32 * g + hq);
        int4 lo, hi;
        lo.x = q.x & 0x0F0F0F0F; hi.x = (q.x >> 4) & 0x0F0F0F0F;
        lo.y = q.y & 0x0F0F0F0F; hi.y = (q.y >> 4) & 0x0F0F0F0F;
        lo.z = q.z & 0x0F0F0F0F; hi.z = (q.z >> 4) & 0x0F0F0F0F;
        lo.w = q.w & 0x0F0F0F0F; hi.w = (q.w >> 4) & 0x0F0F0F0F;
        if (T == T_Q5_K) {
            int4 qh = *(const int4*)(blk + 16 + hq);
            int s0 = 2 * g, s1 = 2 * g + 1;
            lo.x |= ((qh.x >> s0) & 0x01010101) << 4; hi.x |= ((qh.x >> s1) & 0x01010101) << 4;
            lo.y |= ((qh.y >> s0) & 0x01010101) << 4; hi.y |= ((qh.y >> s1) & 0x01010101) << 4;
            lo.z |= ((qh.z >> s0) & 0x01010101) << 4; hi.z |= ((qh.z >> s1) & 0x01010101) << 4;
            lo.w |= ((qh.w >> s0) & 0x01010101) << 4; hi.w |= ((qh.w >> s1) & 0x01010101) << 4;
        }
        __half2 dm = *(const __half2*)blk;
        float d = __low2float(dm), dmin = __high2float(dm);
        int sc0, m0, sc1, m1;
        scale_min_k4(2 * g, blk + 4, &sc0, &m0);
        scale_min_k4(2 * g + 1, blk + 4, &sc1, &m1);
        int b0 = sb * 8 + 2 * g, b1 = b0 + 1;
#pragma unroll
        for (int m = 0; m < M; m++) {
            const signed char* xr = xq + (long)m * K;
            int4 x0 = *(const int4*)(xr + b0 * 32 + hq), x1 = *(const int4*)(xr + b1 * 32 + hq);
            float dx0 = xd[(long)m * nb + b0], dx1 = xd[(long)m * nb + b1];
            int s0 = dot4(lo, x0), s1 = dot4(hi, x1);
            int sx0 = sum4(x0), sx1 = sum4(x1);
            acc[m] += d * (sc0 * s0 * dx0 + sc1 * s1 * dx1) - dmin * (m0 * sx0 * dx0 + m1 * sx1 * dx1);
        }
    } else if (T == T_Q2_K || T == T_Q3_K) {
        // 16 bytes of qs (values l0..l0+15 of half n) hold four 2-bit
        // planes: shift j is the 16 values at 128 n + 32 j + l0, with scale
        // 8 n + 2 j + l0 / 16 and the activations of 32-block 8 sb + 4 n + j.
        // Q3_K's third bit comes from hmask bit 4 n + j of the same 16
        // bytes' positions; its levels are (0..7) - 4.
        const long nbk = K / 256;
        int sb = u / 4, n = (u % 4) / 2, l0 = 16 * (u % 2);
        long sbi = r * nbk + sb;
        int4 q = *(const int4*)(w.p0 + sbi * 64 + n * 32 + l0);
        int4 hm = make_int4(0, 0, 0, 0);
        float d, dmin = 0.0f;
        if (T == T_Q2_K) {
            __half2 dm = ((const __half2*)w.p1)[sbi];
            d = __low2float(dm);
            dmin = __high2float(dm);
        } else {
            hm = *(const int4*)(w.p2 + sbi * 32 + l0);
            d = h2f(w.p1, sbi);
        }
        int4 qj[4];
        int scj[4], mj[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            qj[j].x = (q.x >> (2 * j)) & 0x03030303;
            qj[j].y = (q.y >> (2 * j)) & 0x03030303;
            qj[j].z = (q.z >> (2 * j)) & 0x03030303;
            qj[j].w = (q.w >> (2 * j)) & 0x03030303;
            int si = 8 * n + 2 * j + l0 / 16;
            if (T == T_Q2_K) {
                int c = w.p3[sbi * 16 + si];
                scj[j] = c & 0xF;
                mj[j] = c >> 4;
            } else {
                int bit = 4 * n + j;
                qj[j].x |= ((hm.x >> bit) & 0x01010101) << 2;
                qj[j].y |= ((hm.y >> bit) & 0x01010101) << 2;
                qj[j].z |= ((hm.z >> bit) & 0x01010101) << 2;
                qj[j].w |= ((hm.w >> bit) & 0x01010101) << 2;
                scj[j] = q3k_scale(w.p3 + sbi * 12, si);
                mj[j] = 4 * scj[j];
            }
        }
        int xb0 = sb * 8 + n * 4;
#pragma unroll
        for (int m = 0; m < M; m++) {
            const signed char* xr = xq + (long)m * K;
            float s = 0.0f, t = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int4 x = *(const int4*)(xr + (xb0 + j) * 32 + l0);
                float dx = xd[(long)m * nb + xb0 + j];
                s += dx * (float)(scj[j] * dot4(qj[j], x));
                t += dx * (float)(mj[j] * sum4(x));
            }
            // Q2_K: d·Σ sc·q·x − dmin·Σ m·x; Q3_K: d·Σ sc·(q − 4)·x, the
            // 4·sc·Σx in t.
            acc[m] += T == T_Q2_K ? d * s - dmin * t : d * (s - t);
        }
    } else if (T == T_Q6_K) {
        const long nbk = K / 256;
        int sb = u / 16, rr = u % 16, n = rr / 8, l = 4 * (rr % 8);
        long sbi = r * nbk + sb;
        int ql0 = ld_int(w.p0, sbi * 128 + n * 64 + l);
        int ql1 = ld_int(w.p0, sbi * 128 + n * 64 + 32 + l);
        int qh = ld_int(w.p2, sbi * 64 + n * 32 + l);
        int q[4];
        q[0] = __vsubss4((ql0 & 0x0F0F0F0F) | (((qh >> 0) & 0x03030303) << 4), 0x20202020);
        q[1] = __vsubss4((ql1 & 0x0F0F0F0F) | (((qh >> 2) & 0x03030303) << 4), 0x20202020);
        q[2] = __vsubss4(((ql0 >> 4) & 0x0F0F0F0F) | (((qh >> 4) & 0x03030303) << 4), 0x20202020);
        q[3] = __vsubss4(((ql1 >> 4) & 0x0F0F0F0F) | (((qh >> 6) & 0x03030303) << 4), 0x20202020);
        const signed char* sc = (const signed char*)w.p3 + sbi * 16 + n * 8 + l / 16;
        float d = h2f(w.p1, sbi);
        int xb = sb * 8 + n * 4;
#pragma unroll
        for (int m = 0; m < M; m++) {
            const signed char* xr = xq + (long)m * K;
            float s = 0.0f;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                int x = *(const int*)(xr + (xb + k) * 32 + l);
                s += (float)(sc[2 * k] * __dp4a(q[k], x, 0)) * xd[(long)m * nb + xb + k];
            }
            acc[m] += d * s;
        }
    }
}

// Rows of length K are split over `split` warps (1, 2 or 4 of the block's
// 4) when K is long, so a short, wide product (ffn_down of a small model)
// still has enough loads in flight; the loop is unrolled for the same
// reason. The partial sums of a row meet in shared memory.
template <int M>
__device__ __forceinline__ void gemv_store(float* acc, float* out, long r, bool valid, int N, int ldo,
                                           int split) {
    __shared__ float red[4][8];
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
#pragma unroll
    for (int m = 0; m < M; m++) acc[m] = warp_sum(acc[m]);
    if (split == 1) {
        if (valid && lane == 0) {
#pragma unroll
            for (int m = 0; m < M; m++) out[(long)m * ldo + r] = acc[m];
        }
        return;
    }
    if (lane == 0) {
#pragma unroll
        for (int m = 0; m < M; m++) red[warp][m] = acc[m];
    }
    __syncthreads();
    if (valid && warp % split == 0 && lane < M) {
        float s = 0.0f;
        for (int p = 0; p < split; p++) s += red[warp + p][lane];
        out[(long)lane * ldo + r] = s;
    }
}

template <int T, int M>
__device__ void gemv_q(W w, const signed char* xq, const float* xd, float* out, int N, int K, int ldo, int split) {
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * ((blockDim.x / 32) / split) + warp / split;
    bool valid = r < N;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; m++) acc[m] = 0.0f;
    if (valid) {
        int units = units_per_row<T>(K);
#pragma unroll 4
        for (int u = (warp % split) * 32 + lane; u < units; u += 32 * split) unit_dot<T, M>(w, r, u, K, xq, xd, acc);
    }
    gemv_store<M>(acc, out, r, valid, N, ldo, split);
}

// f16 weights against f32 activations.
template <int M>
__device__ void gemv_h(W w, const float* x, float* out, int N, int K, int ldo, int split) {
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * ((blockDim.x / 32) / split) + warp / split;
    bool valid = r < N;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; m++) acc[m] = 0.0f;
    if (valid) {
        const __half* wr = (const __half*)w.p0 + r * K;
#pragma unroll 4
        for (int c = ((warp % split) * 32 + lane) * 8; c < K; c += 256 * split) {
            uint4 raw = *(const uint4*)(wr + c);
            const __half2* h = (const __half2*)&raw;
            float wf[8];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float2 f = __half22float2(h[k]);
                wf[2 * k] = f.x;
                wf[2 * k + 1] = f.y;
            }
#pragma unroll
            for (int m = 0; m < M; m++) {
                const float4* xp = (const float4*)(x + (long)m * K + c);
                float4 a = xp[0], b = xp[1];
                acc[m] += wf[0] * a.x + wf[1] * a.y + wf[2] * a.z + wf[3] * a.w + wf[4] * b.x + wf[5] * b.y +
                          wf[6] * b.z + wf[7] * b.w;
            }
        }
    }
    gemv_store<M>(acc, out, r, valid, N, ldo, split);
}

// Mixture-of-experts products, one (token, expert) slot per blockIdx.y:
// `w` holds every expert's rows stacked (expert e's row r is row e*N + r),
// ids[slot] names the slot's expert, and the input row is the slot's own
// (xs 1: the experts' activations) or its token's (xs 0: slot / kk, the
// normed row every expert of a token reads). Out row = slot.
template <int T>
__device__ void gemv_id(W w, const int* ids, int kk, int xs, const signed char* xq, const float* xd, float* out,
                        int N, int K, int ldo, int split) {
    int slot = blockIdx.y;
    long e = ids[slot];
    long xr = xs ? slot : slot / kk;
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * ((blockDim.x / 32) / split) + warp / split;
    bool valid = r < N;
    float acc[1] = {0.0f};
    if (valid) {
        int units = units_per_row<T>(K);
        const signed char* xqr = xq + xr * K;
        const float* xdr = xd + xr * (K / 32);
#pragma unroll 4
        for (int u = (warp % split) * 32 + lane; u < units; u += 32 * split)
            unit_dot<T, 1>(w, e * N + r, u, K, xqr, xdr, acc);
    }
    gemv_store<1>(acc, out + (long)slot * ldo, r, valid, N, ldo, split);
}

#define GEMV_Q(name, T)                                                                                  \
    extern "C" __global__ void name##_id(W w, const int* ids, int kk, int xs, const signed char* xq, const float* xd, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_id<T>(w, ids, kk, xs, xq, xd, o, N, K, ld, sp); } \
    extern "C" __global__ void name##_1(W w, const signed char* xq, const float* xd, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_q<T, 1>(w, xq, xd, o, N, K, ld, sp); } \
    extern "C" __global__ void name##_2(W w, const signed char* xq, const float* xd, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_q<T, 2>(w, xq, xd, o, N, K, ld, sp); } \
    extern "C" __global__ void name##_3(W w, const signed char* xq, const float* xd, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_q<T, 3>(w, xq, xd, o, N, K, ld, sp); } \
    extern "C" __global__ void name##_4(W w, const signed char* xq, const float* xd, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_q<T, 4>(w, xq, xd, o, N, K, ld, sp); } \
    extern "C" __global__ void name##_5(W w, const signed char* xq, const float* xd, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_q<T, 5>(w, xq, xd, o, N, K, ld, sp); } \
    extern "C" __global__ void name##_6(W w, const signed char* xq, const float* xd, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_q<T, 6>(w, xq, xd, o, N, K, ld, sp); } \
    extern "C" __global__ void name##_7(W w, const signed char* xq, const float* xd, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_q<T, 7>(w, xq, xd, o, N, K, ld, sp); } \
    extern "C" __global__ void name##_8(W w, const signed char* xq, const float* xd, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_q<T, 8>(w, xq, xd, o, N, K, ld, sp); }

GEMV_Q(gemv_q8_0, T_Q8_0)
GEMV_Q(gemv_q4_0, T_Q4_0)
GEMV_Q(gemv_q5_0, T_Q5_0)
GEMV_Q(gemv_q4_k, T_Q4_K)
GEMV_Q(gemv_q6_k, T_Q6_K)
GEMV_Q(gemv_q4_1, T_Q4_1)
GEMV_Q(gemv_q5_1, T_Q5_1)
GEMV_Q(gemv_q5_k, T_Q5_K)
GEMV_Q(gemv_q2_k, T_Q2_K)
GEMV_Q(gemv_q3_k, T_Q3_K)

extern "C" __global__ void gemv_f16_1(W w, const float* x, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_h<1>(w, x, o, N, K, ld, sp); }
// gemv_id for f16 experts (f32 input rows x, K floats each).
extern "C" __global__ void gemv_f16_id(W w, const int* ids, int kk, int xs, const float* x, float* o, int N, int K, int ld, int sp) {
    TL_PDL();
    int slot = blockIdx.y;
    long e = ids[slot];
    long xr = xs ? slot : slot / kk;
    W we = w;
    we.p0 = w.p0 + e * N * (long)K * 2;
    gemv_h<1>(we, x + xr * K, o + (long)slot * ld, N, K, ld, sp);
}
extern "C" __global__ void gemv_f16_2(W w, const float* x, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_h<2>(w, x, o, N, K, ld, sp); }
extern "C" __global__ void gemv_f16_3(W w, const float* x, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_h<3>(w, x, o, N, K, ld, sp); }
extern "C" __global__ void gemv_f16_4(W w, const float* x, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_h<4>(w, x, o, N, K, ld, sp); }
extern "C" __global__ void gemv_f16_5(W w, const float* x, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_h<5>(w, x, o, N, K, ld, sp); }
extern "C" __global__ void gemv_f16_6(W w, const float* x, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_h<6>(w, x, o, N, K, ld, sp); }
extern "C" __global__ void gemv_f16_7(W w, const float* x, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_h<7>(w, x, o, N, K, ld, sp); }
extern "C" __global__ void gemv_f16_8(W w, const float* x, float* o, int N, int K, int ld, int sp) { TL_PDL(); gemv_h<8>(w, x, o, N, K, ld, sp); }

// ---------------------------------------------------------------------------
// Quantized products for 9..64 activation rows on the tensor cores (int8
// mma.sync), on the same 8-bit activations as the GEMVs. A warp computes
// 16 output rows × all M (≤ 64) activation rows, 8 at a time (one m16n8
// tile each): per 32-value block it unpacks its 16 weight rows straight
// into the A fragment (lane l: rows l/4 and l/4 + 8, values 4(l%4)..+3
// and 16 + 4(l%4)..+3), reads each tile's B fragment (the same values of
// activation rows l/4) and scales the exact int32 products by the
// weight's and the activation's block scales. Each weight byte is read
// once a step, where the 8-row GEMVs read it once per 8 rows.
// Blocks of 4 warps; `split` (1, 2, 4) warps share one 16-row tile, each
// a part of K, their sums meeting in shared memory (narrow products keep
// enough warps busy that way). grid.x = ceil(N / (16 · 4 / split)).

// Rows g and g + 8's weights for one block: values lo = 4·tig..+3 and
// hi = 16 + 4·tig..+3 as int8, the scale of each half (s0, s1) and the
// offset m (w = s · q + m).
struct APart {
    int lo, hi;
    float s0, s1, m;
};

template <int T>
__device__ __forceinline__ APart mmq_load(const W& w, long r, int kb, int K, int tig) {
    APart a;
    const long nb = K / 32;
    a.m = 0.0f;
    if (T == T_Q8_0) {
        const unsigned char* q = w.p0 + r * K + kb * 32 + 4 * tig;
        a.lo = ld_int(q, 0);
        a.hi = ld_int(q, 16);
        a.s0 = a.s1 = h2f(w.p1, r * nb + kb);
    } else if (T == T_Q4_0 || T == T_Q5_0 || T == T_Q4_1 || T == T_Q5_1) {
        // Byte j of the block: value j (low nibble) and j + 16 (high).
        int q = ld_int(w.p0, (r * nb + kb) * 16 + 4 * tig);
        a.lo = q & 0x0F0F0F0F;
        a.hi = (q >> 4) & 0x0F0F0F0F;
        if (T == T_Q5_0 || T == T_Q5_1) {
            unsigned qh = ((const unsigned*)w.p2)[r * nb + kb];
            a.lo |= spread4((qh >> (4 * tig)) & 0xF);
            a.hi |= spread4((qh >> (16 + 4 * tig)) & 0xF);
        }
        if (T == T_Q4_0) { a.lo = __vsubss4(a.lo, 0x08080808); a.hi = __vsubss4(a.hi, 0x08080808); }
        if (T == T_Q5_0) { a.lo = __vsubss4(a.lo, 0x10101010); a.hi = __vsubss4(a.hi, 0x10101010); }
        a.s0 = a.s1 = h2f(w.p1, r * nb + kb);
        if (T == T_Q4_1 || T == T_Q5_1) a.m = h2f(w.p3, r * nb + kb);
    } else if (T == T_Q4_K || T == T_Q5_K) {
        const long nbk = K / 256;
        const int bs = T == T_Q4_K ? 144 : 176, qs = T == T_Q4_K ? 16 : 48;
        int j = kb % 8;
        const unsigned char* blk = w.p0 + (r * nbk + kb / 8) * bs;
        const unsigned char* q = blk + qs + 32 * (j / 2) + 4 * tig;
        int sh = 4 * (j & 1);
        a.lo = (ld_int(q, 0) >> sh) & 0x0F0F0F0F;
        a.hi = (ld_int(q, 16) >> sh) & 0x0F0F0F0F;
        if (T == T_Q5_K) {
            a.lo |= ((ld_int(blk, 16 + 4 * tig) >> j) & 0x01010101) << 4;
            a.hi |= ((ld_int(blk, 32 + 4 * tig) >> j) & 0x01010101) << 4;
        }
        __half2 dm = *(const __half2*)blk;
        int sc, mn;
        scale_min_k4(j, blk + 4, &sc, &mn);
        a.s0 = a.s1 = __low2float(dm) * sc;
        a.m = -__high2float(dm) * mn;
    } else if (T == T_Q6_K) {
        const long nbk = K / 256;
        long sb = r * nbk + kb / 8;
        int j = kb % 8, n = j / 4, k = j % 4;
        const unsigned char* ql = w.p0 + sb * 128 + n * 64 + (k & 1) * 32 + 4 * tig;
        const unsigned char* qh = w.p2 + sb * 64 + n * 32 + 4 * tig;
        int sh = k >= 2 ? 4 : 0;
        a.lo = __vsubss4(((ld_int(ql, 0) >> sh) & 0x0F0F0F0F) | (((ld_int(qh, 0) >> (2 * k)) & 0x03030303) << 4),
                         0x20202020);
        a.hi = __vsubss4(((ld_int(ql, 16) >> sh) & 0x0F0F0F0F) | (((ld_int(qh, 16) >> (2 * k)) & 0x03030303) << 4),
                         0x20202020);
        const signed char* sc = (const signed char*)w.p3 + sb * 16 + n * 8 + 2 * k;
        float d = h2f(w.p1, sb);
        a.s0 = d * sc[0];
        a.s1 = d * sc[1];
    }
    return a;
}

__device__ __forceinline__ void mma_k32(int* c, int a0, int a1, int a2, int a3, int b0, int b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(0));
}

__device__ __forceinline__ void mma_k16(int* c, int a0, int a1, int b) {
    asm("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%7,%7,%7};"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a0), "r"(a1), "r"(b), "r"(0));
}

template <int T>
__device__ void mmq(W w, const signed char* xq, const float* xd, float* out, int N, int K, int ldo, int M,
                    int split) {
    __shared__ float red[4][32][33];
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane / 4, tig = lane & 3;
    const long r0 = ((long)blockIdx.x * (4 / split) + warp / split) * 16;
    const int part = warp % split;
    const long ra = min(r0 + g, (long)N - 1), rb = min(r0 + g + 8, (long)N - 1);
    const int nb = K / 32, nt = (M + 7) / 8;
    const int per = (nb + split - 1) / split, kb0 = part * per, kb1 = min(nb, kb0 + per);
    const bool has_min = T == T_Q4_1 || T == T_Q5_1 || T == T_Q4_K || T == T_Q5_K;
    float acc[8][4];
#pragma unroll
    for (int t = 0; t < 8; t++) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
#pragma unroll 2
    for (int kb = kb0; kb < kb1; kb++) {
        APart pa = mmq_load<T>(w, ra, kb, K, tig), pb = mmq_load<T>(w, rb, kb, K, tig);
#pragma unroll
        for (int t = 0; t < 8; t++) {
            if (t < nt) {
                const signed char* xr = xq + (long)min(8 * t + g, M - 1) * K + kb * 32 + 4 * tig;
                int b0 = *(const int*)xr, b1 = *(const int*)(xr + 16);
                float d0 = xd[(long)min(8 * t + 2 * tig, M - 1) * nb + kb];
                float d1 = xd[(long)min(8 * t + 2 * tig + 1, M - 1) * nb + kb];
                int c[4];
                if (T == T_Q6_K) {
                    int e[4];
                    mma_k16(c, pa.lo, pb.lo, b0);
                    mma_k16(e, pa.hi, pb.hi, b1);
                    acc[t][0] += ((float)c[0] * pa.s0 + (float)e[0] * pa.s1) * d0;
                    acc[t][1] += ((float)c[1] * pa.s0 + (float)e[1] * pa.s1) * d1;
                    acc[t][2] += ((float)c[2] * pb.s0 + (float)e[2] * pb.s1) * d0;
                    acc[t][3] += ((float)c[3] * pb.s0 + (float)e[3] * pb.s1) * d1;
                } else {
                    mma_k32(c, pa.lo, pb.lo, pa.hi, pb.hi, b0, b1);
                    acc[t][0] += (float)c[0] * pa.s0 * d0;
                    acc[t][1] += (float)c[1] * pa.s0 * d1;
                    acc[t][2] += (float)c[2] * pb.s0 * d0;
                    acc[t][3] += (float)c[3] * pb.s0 * d1;
                    if (has_min) {
                        // The activations' block sums, in the same layout.
                        int sx[4];
                        mma_k32(sx, 0x01010101, 0x01010101, 0x01010101, 0x01010101, b0, b1);
                        acc[t][0] += pa.m * d0 * (float)sx[0];
                        acc[t][1] += pa.m * d1 * (float)sx[1];
                        acc[t][2] += pb.m * d0 * (float)sx[0];
                        acc[t][3] += pb.m * d1 * (float)sx[1];
                    }
                }
            }
        }
    }
    if (split > 1) {
#pragma unroll
        for (int t = 0; t < 8; t++)
#pragma unroll
            for (int i = 0; i < 4; i++) red[warp][t * 4 + i][lane] = acc[t][i];
        __syncthreads();
        if (part != 0) return;
#pragma unroll
        for (int t = 0; t < 8; t++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                for (int p = 1; p < split; p++) acc[t][i] += red[warp + p][t * 4 + i][lane];
    }
#pragma unroll
    for (int t = 0; t < 8; t++) {
        int m0 = 8 * t + 2 * tig;
        if (t < nt) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                long r = r0 + g + (i >= 2 ? 8 : 0);
                int m = m0 + (i & 1);
                if (r < N && m < M) out[(long)m * ldo + r] = acc[t][i];
            }
        }
    }
}

#define MMQ(name, T)                                                                                          \
    extern "C" __global__ void name(W w, const signed char* xq, const float* xd, float* o, int N, int K, int ld, \
                                    int M, int sp) { TL_PDL(); mmq<T>(w, xq, xd, o, N, K, ld, M, sp); }
MMQ(mmq_q8_0, T_Q8_0)
MMQ(mmq_q4_0, T_Q4_0)
MMQ(mmq_q5_0, T_Q5_0)
MMQ(mmq_q4_k, T_Q4_K)
MMQ(mmq_q6_k, T_Q6_K)
MMQ(mmq_q4_1, T_Q4_1)
MMQ(mmq_q5_1, T_Q5_1)
MMQ(mmq_q5_k, T_Q5_K)

// ---------------------------------------------------------------------------
// The same tensor-core products with their operands staged in shared
// memory (`mmqs_*`): a block of 4 warps owns 64 weight rows and walks K in
// chunks (128 values; 256 for the K-quants), copying each chunk of its
// weight rows (every component array) and of the ≤ 64 activation rows into
// shared memory with cp.async, three chunks in flight, while its warps
// multiply the chunk copied before. The direct kernel above issues each
// lane's 4-byte loads straight from global memory one K block at a time,
// with too few bytes in flight to cover the memory's latency (1.5B shape,
// 64 rows: gate_up at ≈10% of the card's bandwidth); here every load is a
// 16-byte copy issued chunks ahead. Row strides in shared memory are
// padded (≡ 16 mod 32 bytes) so that the 8 rows a warp reads at once fall
// in different banks. Narrow products split K over grid.y: each split
// writes its partial sums, and the last split of a row tile to finish (a
// counter per tile, reset by that block) adds them in split order and
// writes the output, so the result does not depend on timing.

template <int T> __device__ __forceinline__ constexpr int mmqs_ch() {
    return (T == T_Q4_K || T == T_Q5_K || T == T_Q6_K) ? 256 : 128;
}

// Bytes of component array c (p0..p3) per weight row per chunk.
template <int T> __device__ __forceinline__ constexpr int mmqs_bytes(int c) {
    return T == T_Q8_0   ? (c == 0 ? 128 : c == 1 ? 8 : 0)
         : T == T_Q4_0   ? (c == 0 ? 64 : c == 1 ? 8 : 0)
         : T == T_Q5_0   ? (c == 0 ? 64 : c == 1 ? 8 : c == 2 ? 16 : 0)
         : T == T_Q4_1   ? (c == 0 ? 64 : c == 1 ? 8 : c == 3 ? 8 : 0)
         : T == T_Q5_1   ? (c == 0 ? 64 : c == 1 ? 8 : c == 2 ? 16 : 8)
         : T == T_Q4_K   ? (c == 0 ? 144 : 0)
         : T == T_Q5_K   ? (c == 0 ? 176 : 0)
         : /* Q6_K */      (c == 0 ? 128 : c == 1 ? 2 : c == 2 ? 64 : 16);
}

// Shared-memory row stride of a component of b bytes a row.
__device__ __forceinline__ constexpr int mmqs_stride(int b) {
    return b == 0 ? 0 : b < 8 ? 4 : b < 16 ? b : (b % 32 == 16 ? b : b + 16);
}

#define MMQS_ROWS 64
#define MMQS_STAGES 3

// Bytes of one stage: the weight components for 64 rows, then mt
// activation rows and their scales.
template <int T> __device__ __forceinline__ int mmqs_stage_bytes(int mt) {
    constexpr int CH = mmqs_ch<T>();
    int b = 0;
#pragma unroll
    for (int c = 0; c < 4; c++) b += MMQS_ROWS * mmqs_stride(mmqs_bytes<T>(c));
    return b + mt * (CH + 16) + mt * mmqs_stride(CH / 8);
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// Issues the copies of chunk `ck` (rows r0.., activation rows 0..mt) into
// stage buffer `sm`.
template <int T>
__device__ __forceinline__ void mmqs_stage(const W& w, unsigned char* sm, const signed char* xq, const float* xd,
                                           long r0, int N, int K, int M, int mt, int ck) {
    constexpr int CH = mmqs_ch<T>();
    const int tid = threadIdx.x;
    const unsigned char* src[4] = {w.p0, w.p1, w.p2, w.p3};
    unsigned char* p = sm;
#pragma unroll
    for (int c = 0; c < 4; c++) {
        const int b = mmqs_bytes<T>(c), s = mmqs_stride(b);
        if (b == 0) continue;
        const long rowb = (long)(K / CH) * b;
        const unsigned char* g = src[c] + (long)ck * b;
        if (b % 16 == 0) {
            const int per = b / 16;
            for (int i = tid; i < MMQS_ROWS * per; i += 128) {
                const int r = i / per, u = i - r * per;
                const long gr = min(r0 + r, (long)N - 1);
                cp_async16(p + r * s + u * 16, g + gr * rowb + u * 16);
            }
        } else if (b == 8) {
            for (int r = tid; r < MMQS_ROWS; r += 128) {
                const long gr = min(r0 + r, (long)N - 1);
                cp_async8(p + r * s, g + gr * rowb);
            }
        } else {
            // Q6_K's one f16 scale a row: a plain copy, visible after the
            // barrier that precedes this stage's use.
            for (int r = tid; r < MMQS_ROWS; r += 128) {
                const long gr = min(r0 + r, (long)N - 1);
                *(unsigned short*)(p + r * s) = *(const unsigned short*)(g + gr * rowb);
            }
        }
        p += MMQS_ROWS * s;
    }
    const int xs = CH + 16, ds = mmqs_stride(CH / 8);
    for (int i = tid; i < mt * (CH / 16); i += 128) {
        const int r = i / (CH / 16), u = i - r * (CH / 16);
        const long gr = min(r, M - 1);
        cp_async16(p + r * xs + u * 16, xq + gr * K + (long)ck * CH + u * 16);
    }
    p += mt * xs;
    for (int i = tid; i < mt * (CH / 128); i += 128) {
        const int r = i / (CH / 128), u = i - r * (CH / 128);
        const long gr = min(r, M - 1);
        cp_async16(p + r * ds + u * 16, (const unsigned char*)xd + (gr * (K / 32) + (long)ck * (CH / 32)) * 4 + u * 16);
    }
}

// mmq_load's unpacking, from a staged chunk: local row r, block kb of the
// chunk.
template <int T>
__device__ __forceinline__ APart mmqs_load(const unsigned char* sm, int r, int kb, int tig) {
    constexpr int s0 = mmqs_stride(mmqs_bytes<T>(0)), s1 = mmqs_stride(mmqs_bytes<T>(1)),
                  s2 = mmqs_stride(mmqs_bytes<T>(2)), s3 = mmqs_stride(mmqs_bytes<T>(3));
    const unsigned char* p0 = sm;
    const unsigned char* p1 = p0 + MMQS_ROWS * s0;
    const unsigned char* p2 = p1 + MMQS_ROWS * s1;
    const unsigned char* p3 = p2 + MMQS_ROWS * s2;
    APart a;
    a.m = 0.0f;
    if (T == T_Q8_0) {
        const unsigned char* q = p0 + r * s0 + kb * 32 + 4 * tig;
        a.lo = ld_int(q, 0);
        a.hi = ld_int(q, 16);
        a.s0 = a.s1 = h2f(p1 + r * s1, kb);
    } else if (T == T_Q4_0 || T == T_Q5_0 || T == T_Q4_1 || T == T_Q5_1) {
        int q = ld_int(p0 + r * s0, kb * 16 + 4 * tig);
        a.lo = q & 0x0F0F0F0F;
        a.hi = (q >> 4) & 0x0F0F0F0F;
        if (T == T_Q5_0 || T == T_Q5_1) {
            unsigned qh = ((const unsigned*)(p2 + r * s2))[kb];
            a.lo |= spread4((qh >> (4 * tig)) & 0xF);
            a.hi |= spread4((qh >> (16 + 4 * tig)) & 0xF);
        }
        if (T == T_Q4_0) { a.lo = __vsubss4(a.lo, 0x08080808); a.hi = __vsubss4(a.hi, 0x08080808); }
        if (T == T_Q5_0) { a.lo = __vsubss4(a.lo, 0x10101010); a.hi = __vsubss4(a.hi, 0x10101010); }
        a.s0 = a.s1 = h2f(p1 + r * s1, kb);
        if (T == T_Q4_1 || T == T_Q5_1) a.m = h2f(p3 + r * s3, kb);
    } else if (T == T_Q4_K || T == T_Q5_K) {
        const int qs = T == T_Q4_K ? 16 : 48;
        const unsigned char* blk = p0 + r * s0;
        const unsigned char* q = blk + qs + 32 * (kb / 2) + 4 * tig;
        int sh = 4 * (kb & 1);
        a.lo = (ld_int(q, 0) >> sh) & 0x0F0F0F0F;
        a.hi = (ld_int(q, 16) >> sh) & 0x0F0F0F0F;
        if (T == T_Q5_K) {
            a.lo |= ((ld_int(blk, 16 + 4 * tig) >> kb) & 0x01010101) << 4;
            a.hi |= ((ld_int(blk, 32 + 4 * tig) >> kb) & 0x01010101) << 4;
        }
        __half2 dm = *(const __half2*)blk;
        int sc, mn;
        scale_min_k4(kb, blk + 4, &sc, &mn);
        a.s0 = a.s1 = __low2float(dm) * sc;
        a.m = -__high2float(dm) * mn;
    } else if (T == T_Q6_K) {
        int n = kb / 4, k = kb % 4;
        const unsigned char* ql = p0 + r * s0 + n * 64 + (k & 1) * 32 + 4 * tig;
        const unsigned char* qh = p2 + r * s2 + n * 32 + 4 * tig;
        int sh = k >= 2 ? 4 : 0;
        a.lo = __vsubss4(((ld_int(ql, 0) >> sh) & 0x0F0F0F0F) | (((ld_int(qh, 0) >> (2 * k)) & 0x03030303) << 4),
                         0x20202020);
        a.hi = __vsubss4(((ld_int(ql, 16) >> sh) & 0x0F0F0F0F) | (((ld_int(qh, 16) >> (2 * k)) & 0x03030303) << 4),
                         0x20202020);
        const signed char* sc = (const signed char*)(p3 + r * s3) + n * 8 + 2 * k;
        float d = h2f(p1 + r * s1, 0);
        a.s0 = d * sc[0];
        a.s1 = d * sc[1];
    }
    return a;
}

// grid (ceil(N / 64), splits), or (ceil(M / 64), ceil(N / 64)) for more
// than 64 activation rows; 128 threads; dynamic shared memory
// MMQS_STAGES · mmqs_stage_bytes(mt). part: splits · M · N floats, cnt: one
// zeroed counter per row tile (both unused when splits == 1).
template <int T>
__device__ void mmqs(W w, const signed char* xq, const float* xd, float* out, int N, int K, int ldo, int M,
                     float* part, int* cnt) {
    extern __shared__ __align__(16) unsigned char mmqs_smem[];
    constexpr int CH = mmqs_ch<T>(), KB = CH / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane / 4, tig = lane & 3;
    // More than 64 activation rows (prompts): grid (row groups of 64,
    // weight tiles), the row groups of one weight tile side by side so that
    // they find its chunks in L2; no split. Else grid (weight tiles, splits).
    long r0;
    int splits, split;
    if (M > 64) {
        const int z = blockIdx.x;
        r0 = (long)blockIdx.y * MMQS_ROWS;
        xq += (long)z * 64 * K;
        xd += (long)z * 64 * (K / 32);
        out += (long)z * 64 * ldo;
        M = min(64, M - z * 64);
        splits = 1;
        split = 0;
    } else {
        r0 = (long)blockIdx.x * MMQS_ROWS;
        splits = gridDim.y;
        split = blockIdx.y;
    }
    const int mt = min(64, (M + 7) & ~7), nt = mt / 8;
    const int stage = mmqs_stage_bytes<T>(mt);
    const int nch = K / CH;
    const int per = (nch + splits - 1) / splits, c0 = split * per, c1 = min(nch, c0 + per);
    const int n = max(c1 - c0, 0);
    constexpr int wbytes = MMQS_ROWS * (mmqs_stride(mmqs_bytes<T>(0)) + mmqs_stride(mmqs_bytes<T>(1)) +
                                        mmqs_stride(mmqs_bytes<T>(2)) + mmqs_stride(mmqs_bytes<T>(3)));
    const int xs = CH + 16, ds = mmqs_stride(CH / 8);
    const bool has_min = T == T_Q4_1 || T == T_Q5_1 || T == T_Q4_K || T == T_Q5_K;
    float acc[8][4];
#pragma unroll
    for (int t = 0; t < 8; t++) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
#pragma unroll
    for (int s = 0; s < MMQS_STAGES - 1; s++) {
        if (s < n) mmqs_stage<T>(w, mmqs_smem + s * stage, xq, xd, r0, N, K, M, mt, c0 + s);
        cp_async_commit();
    }
    const int ra = warp * 16 + g, rb = ra + 8;
    for (int i = 0; i < n; i++) {
        cp_async_wait<MMQS_STAGES - 2>();
        __syncthreads();
        if (i + MMQS_STAGES - 1 < n)
            mmqs_stage<T>(w, mmqs_smem + ((i + MMQS_STAGES - 1) % MMQS_STAGES) * stage, xq, xd, r0, N, K, M, mt,
                          c0 + i + MMQS_STAGES - 1);
        cp_async_commit();
        const unsigned char* sm = mmqs_smem + (i % MMQS_STAGES) * stage;
        const unsigned char* xs_ = sm + wbytes;
        const float* xd_ = (const float*)(xs_ + mt * xs);
#pragma unroll
        for (int kb = 0; kb < KB; kb++) {
            APart pa = mmqs_load<T>(sm, ra, kb, tig), pb = mmqs_load<T>(sm, rb, kb, tig);
#pragma unroll
            for (int t = 0; t < 8; t++) {
                if (t < nt) {
                    const unsigned char* xr = xs_ + (8 * t + g) * xs + kb * 32 + 4 * tig;
                    int b0 = ld_int(xr, 0), b1 = ld_int(xr, 16);
                    float d0 = xd_[(8 * t + 2 * tig) * (ds / 4) + kb];
                    float d1 = xd_[(8 * t + 2 * tig + 1) * (ds / 4) + kb];
                    int c[4];
                    if (T == T_Q6_K) {
                        int e[4];
                        mma_k16(c, pa.lo, pb.lo, b0);
                        mma_k16(e, pa.hi, pb.hi, b1);
                        acc[t][0] += ((float)c[0] * pa.s0 + (float)e[0] * pa.s1) * d0;
                        acc[t][1] += ((float)c[1] * pa.s0 + (float)e[1] * pa.s1) * d1;
                        acc[t][2] += ((float)c[2] * pb.s0 + (float)e[2] * pb.s1) * d0;
                        acc[t][3] += ((float)c[3] * pb.s0 + (float)e[3] * pb.s1) * d1;
                    } else {
                        mma_k32(c, pa.lo, pb.lo, pa.hi, pb.hi, b0, b1);
                        acc[t][0] += (float)c[0] * pa.s0 * d0;
                        acc[t][1] += (float)c[1] * pa.s0 * d1;
                        acc[t][2] += (float)c[2] * pb.s0 * d0;
                        acc[t][3] += (float)c[3] * pb.s0 * d1;
                        if (has_min) {
                            int sx[4];
                            mma_k32(sx, 0x01010101, 0x01010101, 0x01010101, 0x01010101, b0, b1);
                            acc[t][0] += pa.m * d0 * (float)sx[0];
                            acc[t][1] += pa.m * d1 * (float)sx[1];
                            acc[t][2] += pb.m * d0 * (float)sx[0];
                            acc[t][3] += pb.m * d1 * (float)sx[1];
                        }
                    }
                }
            }
        }
    }
    cp_async_wait<0>();
    const long rw = r0 + warp * 16 + g;
    if (splits == 1) {
#pragma unroll
        for (int t = 0; t < 8; t++) {
            if (t < nt) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    long r = rw + (i >= 2 ? 8 : 0);
                    int m = 8 * t + 2 * tig + (i & 1);
                    if (r < N && m < M) out[(long)m * ldo + r] = acc[t][i];
                }
            }
        }
        return;
    }
    // Split K: this split's sums to part[split][m][r]; the tile's last
    // split adds them up in order.
    float* mine = part + (long)split * M * N;
#pragma unroll
    for (int t = 0; t < 8; t++) {
        if (t < nt) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                long r = rw + (i >= 2 ? 8 : 0);
                int m = 8 * t + 2 * tig + (i & 1);
                if (r < N && m < M) mine[(long)m * N + r] = acc[t][i];
            }
        }
    }
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) last = atomicAdd(&cnt[blockIdx.x], 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int rows = (int)min((long)MMQS_ROWS, (long)N - r0);
    for (int i = threadIdx.x; i < rows * M; i += 128) {
        const int m = i / rows;
        const long r = r0 + (i - m * rows);
        float s = 0.0f;
        for (int p = 0; p < splits; p++) s += ((volatile const float*)part)[((long)p * M + m) * N + r];
        out[(long)m * ldo + r] = s;
    }
    if (threadIdx.x == 0) cnt[blockIdx.x] = 0;
}

#define MMQS(name, T)                                                                                         \
    extern "C" __global__ void name(W w, const signed char* xq, const float* xd, float* o, int N, int K, int ld, \
                                    int M, float* part, int* cnt) { TL_PDL(); mmqs<T>(w, xq, xd, o, N, K, ld, M, part, cnt); }
MMQS(mmqs_q8_0, T_Q8_0)
MMQS(mmqs_q4_0, T_Q4_0)
MMQS(mmqs_q5_0, T_Q5_0)
MMQS(mmqs_q4_k, T_Q4_K)
MMQS(mmqs_q6_k, T_Q6_K)
MMQS(mmqs_q4_1, T_Q4_1)
MMQS(mmqs_q5_1, T_Q5_1)
MMQS(mmqs_q5_k, T_Q5_K)

// ---------------------------------------------------------------------------
// Norms and element-wise epilogues. One block per row, blockDim a multiple
// of 32 (≤ 1024).

__device__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = lane < nw ? sh[lane] : -TL_INF;
    return warp_max(t);
}

__device__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(t);
}

// Stores value `v` of element `i` (of a row-major activation whose rows are
// whole 32-value blocks) quantized to 8 bits: the 32 lanes of the calling
// warp must hold 32 consecutive elements of one block (loops that stride by
// a multiple of 32 from the thread index give that).
__device__ __forceinline__ void store_q8(float v, long i, signed char* xq, float* xd) {
    float amax = warp_max(fabsf(v));
    float d = amax / 127.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    xq[i] = (signed char)__float2int_rn(v * id);
    if ((threadIdx.x & 31) == 0) xd[i / 32] = d;
}

// x[n] (rows of whole 32-value blocks, n a multiple of 32) quantized to 8
// bits as the norm kernels leave their output for the next product: for a
// product whose input comes from the host (a program's `linear`).
extern "C" __global__ void quant_q8(const float* x, signed char* xq, float* xd, long n) { TL_PDL();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    // n and blockDim are multiples of 32: whole warps leave together.
    if (i >= n) return;
    store_q8(x[i], i, xq, xd);
}

// out[row] = x[src] / sqrt(mean(x[src]^2) + eps) * w, with src = rows ? rows[row] : row;
// with xq, also the 8-bit quantized row (d a multiple of 32).
// The scale of a row's norm over its d values: RMS (ln 0) or LayerNorm
// without bias (ln 1: the mean taken first; `*mean` set). Every thread of
// the block calls it.
__device__ float norm_scale(const float* xr, int d, float eps, int ln, float* mean, float* sh) {
    float mu = 0.0f;
    if (ln) {
        float s = 0.0f;
        for (int i = threadIdx.x; i < d; i += blockDim.x) s += xr[i];
        mu = block_sum(s, sh) / d;
        __syncthreads();
    }
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = xr[i] - mu;
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    *mean = mu;
    return rsqrtf(ss / d + eps);
}

// out = norm(x) * w (RMS, or LayerNorm with ln), or a copy of x without w;
// rows of x picked by `rows` when given; with xq, quantized to 8 bits too.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, const int* rows, int d, float eps,
                                    signed char* xq, float* xd, int ln) { TL_PDL();
    __shared__ float sh[32];
    long src = rows ? rows[blockIdx.x] : blockIdx.x;
    const float* xr = x + src * d;
    float mu = 0.0f, sc = 1.0f;
    if (w) sc = norm_scale(xr, d, eps, ln, &mu, sh);
    float* o = out + (long)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = w ? (xr[i] - mu) * sc * w[i] : xr[i];
        o[i] = v;
        if (xq) store_q8(v, (long)blockIdx.x * d + i, xq, xd);
    }
}

// In place over part of each row: x[row * ld + off ..][..d] = norm(..) * w
// (the Q or K projection normed as one vector, OLMo 2). With a grid of
// several y blocks, block y norms the y-th `d` values after `off` with the
// y-th `d` weights (a Q/K norm weight per head, Command-R of 64+ layers).
extern "C" __global__ void norm_part(float* x, int ld, int off, int d, const float* w, float eps, int ln) { TL_PDL();
    __shared__ float sh[32];
    float* xr = x + (long)blockIdx.x * ld + off + (long)blockIdx.y * d;
    w += (long)blockIdx.y * d;
    float mu = 0.0f;
    float sc = norm_scale(xr, d, eps, ln, &mu, sh);
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) xr[i] = (xr[i] - mu) * sc * w[i];
}

// x += (pw ? norm(o) * pw : o) * rs; then, with xn, xn = norm(x) * nw (a
// copy of x when nw is null), quantized to 8 bits too with xq. With `par`
// (attention and FFN in parallel) instead x = (o + x) + par.
extern "C" __global__ void add_norm(float* x, const float* o, const float* pw, const float* nw, float* xn, int d, float eps,
                                    signed char* xq, float* xd, float rs, int ln, const float* par) { TL_PDL();
    __shared__ float sh[32];
    float* xr = x + (long)blockIdx.x * d;
    const float* orow = o + (long)blockIdx.x * d;
    float pmu = 0.0f, psc = 1.0f;
    if (pw) {
        psc = norm_scale(orow, d, eps, ln, &pmu, sh);
        __syncthreads();
    }
    const float* prow = par ? par + (long)blockIdx.x * d : 0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float y = pw ? (orow[i] - pmu) * psc * pw[i] : orow[i];
        if (rs != 1.0f) y *= rs;
        xr[i] = prow ? (y + xr[i]) + prow[i] : xr[i] + y;
    }
    if (!xn) return;
    __syncthreads();
    float mu = 0.0f, sc = 1.0f;
    if (nw) sc = norm_scale(xr, d, eps, ln, &mu, sh);
    float* xo = xn + (long)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = nw ? (xr[i] - mu) * sc * nw[i] : xr[i];
        xo[i] = v;
        if (xq) store_q8(v, (long)blockIdx.x * d + i, xq, xd);
    }
}

__device__ __forceinline__ float gelu_tanh(float x) {
    // ggml's GELU (tanh approximation); ggml stores 0 below -10.
    if (x <= -10.0f) return 0.0f;
    const float c = 0.7978845608028654f;
    return 0.5f * x * (1.0f + tanhf(c * x * (1.0f + 0.044715f * x * x)));
}

// out[t, i] = act(gu[t, i]) * gu[t, f + i]; act 0 = SiLU, 1 = GELU; with xq,
// also quantized to 8 bits (f a multiple of 32, blockDim a multiple of 32).
extern "C" __global__ void gated(const float* gu, float* out, int f, long n, int act, signed char* xq, float* xd) { TL_PDL();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long t = i / f, c = i % f;
    float g = gu[t * 2 * f + c], u = gu[t * 2 * f + f + c];
    float v;
    if (act == 2) {
        // ggml swiglu_oai (gpt-oss): alpha 1.702, limit 7.
        float x = fminf(g, 7.0f), y = fminf(fmaxf(u, -7.0f), 7.0f);
        v = x / (1.0f + expf(1.702f * -x)) * (y + 1.0f);
    } else {
        float a = act == 0 ? g / (1.0f + expf(-g)) : gelu_tanh(g);
        v = a * u;
    }
    out[i] = v;
    if (xq) store_q8(v, i, xq, xd);
}

// Logits times `mul` (1: unchanged), then soft-capped when cap > 0.
extern "C" __global__ void softcap(float* x, long n, float mul, float cap) { TL_PDL();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    if (mul != 1.0f) v *= mul;
    if (cap > 0.0f) v = tanhf(v * (1.0f / cap)) * cap;
    x[i] = v;
}

// o[t] = sum over the token's k slots (rank order) of wts[slot] * y[slot];
// with a shared expert, + sy[t] * (silu(z[t]) / z[t]).
extern "C" __global__ void moe_combine(const float* y, const float* wts, int k, int d, float* o, const float* sy,
                                       const float* z) { TL_PDL();
    long t = blockIdx.x;
    float g = 0.0f;
    if (sy) {
        float zt = z[t];
        g = (zt / (1.0f + expf(-zt))) / zt;
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = y[(t * k) * d + i] * wts[t * k];
        for (int j = 1; j < k; j++) acc += y[(t * k + j) * d + i] * wts[t * k + j];
        if (sy) acc += sy[t * d + i] * g;
        o[t * d + i] = acc;
    }
}

// Greedy argmax of each logits row (first index on ties), in two passes so
// a 150k-entry row is read by many blocks at once: argmax_part's block
// (b, row) reduces chunk b of the row to pv/pi[row * P + b]; argmax_final
// (one warp per row) reduces the P partials. blockDim 256.
__device__ __forceinline__ void arg_best(float& best, int& bi, float ov, int oi) {
    if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
}

__device__ __forceinline__ void warp_arg_best(float& best, int& bi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffff, best, o);
        int oi = __shfl_xor_sync(0xffffffff, bi, o);
        arg_best(best, bi, ov, oi);
    }
}

// Router logits from f32 weights in f32 (as the CPU's f32 product): block
// (e, row) writes out[row * ne + e] = x[row, ..k] · w[e, ..k]. Expert
// choice turns on small differences between these logits, so the router
// is not rounded to f16.
extern "C" __global__ void router_f32(const float* x, const float* w, float* out, int k, int ne) { TL_PDL();
    __shared__ float sh[32];
    const float* xr = x + (long)blockIdx.y * k;
    const float* wr = w + (long)blockIdx.x * k;
    float s = 0.0f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) s += xr[i] * wr[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) out[(long)blockIdx.y * ne + blockIdx.x] = s;
}

// Mixture-of-experts routing, one warp per token, over the ne router
// logits (plus `bias` when given) — tl-model's CPU `moe_ffn`: with sel 0,
// softmax over all, the k most probable experts (ties: the lower index)
// in rank order and their probabilities (renormalised to sum 1 with
// norm_w, the sum clamped below at 2^-14); with sel 1 (gpt-oss), the k
// largest logits and a softmax over just those.
extern "C" __global__ void moe_route(const float* logits, const float* bias, int ne, int k, int norm_w, int sel,
                                     int* ids, float* wts) { TL_PDL();
    const float* l = logits + (long)blockIdx.x * ne;
    int lane = threadIdx.x;
    float mx = -TL_INF;
    for (int e = lane; e < ne; e += 32) mx = fmaxf(mx, l[e] + (bias ? bias[e] : 0.0f));
    mx = warp_max(mx);
    float sum = 0.0f;
    if (!sel) {
        for (int e = lane; e < ne; e += 32) sum += expf(l[e] + (bias ? bias[e] : 0.0f) - mx);
        sum = warp_sum(sum);
    }
    int* id = ids + (long)blockIdx.x * k;
    float* wt = wts + (long)blockIdx.x * k;
    float wsum = 0.0f;
    for (int j = 0; j < k; j++) {
        float best = -TL_INF;
        int bi = 0x7fffffff;
        for (int e = lane; e < ne; e += 32) {
            bool taken = false;
            for (int i = 0; i < j; i++) taken |= id[i] == e;
            float v = l[e] + (bias ? bias[e] : 0.0f);
            float p = sel ? v : expf(v - mx) / sum;
            if (!taken) arg_best(best, bi, p, e);
        }
        warp_arg_best(best, bi);
        if (lane == 0) {
            id[j] = bi;
            wt[j] = sel ? expf(best - mx) : best;
        }
        wsum += sel ? expf(best - mx) : best;
        __syncwarp();
    }
    if (lane == 0 && sel) {
        float inv = 1.0f / wsum;
        for (int j = 0; j < k; j++) wt[j] *= inv;
    } else if (lane == 0 && norm_w) {
        wsum = fmaxf(wsum, 6.103515625e-5f);
        for (int j = 0; j < k; j++) wt[j] = wt[j] / wsum;
    }
}

// out[slot * ld + c] += b[ids[slot] * N + c]: each slot's expert's bias.
extern "C" __global__ void expert_bias(float* out, int ld, const float* b, const int* ids, int N) { TL_PDL();
    long slot = blockIdx.x;
    const float* be = b + (long)ids[slot] * N;
    for (int c = threadIdx.x; c < N; c += blockDim.x) out[slot * ld + c] += be[c];
}

// Rows of d floats moved through an index (a mixture of experts' rows
// grouped by expert): gather (scatter 0) dst[r] = src[idx[r] / div],
// scatter (1) dst[idx[r]] = src[r]; one grid row per r.
extern "C" __global__ void copy_rows(const float* src, float* dst, const int* idx, int d, int div,
                                     int scatter) { TL_PDL();
    long r = blockIdx.y;
    long j = idx[r];
    const float* s = src + (scatter ? r : j / div) * (long)d;
    float* o = dst + (scatter ? j : r) * (long)d;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < d; c += gridDim.x * blockDim.x) o[c] = s[c];
}

// x[row * d + c] += b[c] over n values: a bias on every row.
extern "C" __global__ void add_bias(float* x, const float* b, int d, long n) { TL_PDL();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += b[i % d];
}

extern "C" __global__ void argmax_part(const float* x, int n, float* pv, int* pi) { TL_PDL();
    __shared__ float sv[32];
    __shared__ int si[32];
    int P = gridDim.x, row = blockIdx.y;
    int chunk = (n + P - 1) / P;
    int lo = blockIdx.x * chunk, hi = min(n, lo + chunk);
    const float* r = x + (long)row * n;
    float best = -TL_INF;
    int bi = 0x7fffffff;
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) arg_best(best, bi, r[i], i);
    warp_arg_best(best, bi);
    int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    if (lane == 0) { sv[warp] = best; si[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x / 32;
        best = lane < nw ? sv[lane] : -TL_INF;
        bi = lane < nw ? si[lane] : 0x7fffffff;
        warp_arg_best(best, bi);
        if (lane == 0) { pv[(long)row * P + blockIdx.x] = best; pi[(long)row * P + blockIdx.x] = bi; }
    }
}

extern "C" __global__ void argmax_final(const float* pv, const int* pi, int P, int* ids) { TL_PDL();
    int row = blockIdx.x, lane = threadIdx.x;
    float best = -TL_INF;
    int bi = 0x7fffffff;
    for (int i = lane; i < P; i += 32) arg_best(best, bi, pv[(long)row * P + i], pi[(long)row * P + i]);
    warp_arg_best(best, bi);
    // A row of NaNs only: index 0, as the CPU's argmax.
    if (lane == 0) ids[row] = bi == 0x7fffffff ? 0 : bi;
}

// ---------------------------------------------------------------------------
// Q/K/V epilogue: biases, Gemma's per-head q/k RMS norms, RoPE (the angle
// built as ggml builds it: theta *= base^(-2/n_rot) pair after pair), the
// query scale, and the K/V write into the paged f16 cache.
// qkv: [n, qd + 2 kvd] (the fused projection); q_out: [n, qd].
// Cache layout per layer: [block][kv_head][16 slots][hd] f16.
// grid.x = tokens, grid.y = n_heads + n_kv_heads (query heads, then key
// heads; a key head's block also writes its V head). blockDim = hd / 2.
struct RopeArgs {
    int n_heads, n_kv_heads, hd, n_rot, neox;
    float base, eps, q_scale;
    int kv_type;
    int k_rot, v_rot;  // Hadamard block sizes of K/queries and V (0: none)
    // YaRN (yarn 1): angles interpolated by freq_scale, mixed back towards
    // the extrapolated ones over the pairs [corr_lo, corr_hi] by ext_factor,
    // cos and sin times mscale (tl-core's `rope_cache_yarn`).
    int yarn;
    float freq_scale, ext_factor, mscale, corr_lo, corr_hi;
    // Attention temperature (Mistral 3; temp_scale 0: off): the query at
    // position p times 1 + temp_scale * ln(floor(p / temp_floor) + 1), in
    // the CPU's float order (tl-model's `AttnTemp::at`).
    float temp_scale;
    int temp_floor;
};

// Rotates each block of nb values of the hd values at x (shared memory) by
// the orthonormal Walsh-Hadamard matrix (tl-model's `kv::hadamard`: the
// same butterflies in the same order, then the scale 1/sqrt(nb) rounded
// to f32, so the bits equal the CPU's). Every thread of the block calls it.
__device__ void hadamard_sh(float* x, int hd, int nb) {
    for (int s = 1; s < nb; s *= 2) {
        __syncthreads();
        for (int i = threadIdx.x; i < hd / 2; i += blockDim.x) {
            int j = (i / s) * 2 * s + (i % s);
            float a = x[j], d = x[j + s];
            x[j] = __fadd_rn(a, d);
            x[j + s] = __fsub_rn(a, d);
        }
    }
    __syncthreads();
    float c = (float)(1.0 / sqrt((double)nb));
    for (int i = threadIdx.x; i < hd; i += blockDim.x) x[i] = __fmul_rn(x[i], c);
    __syncthreads();
}

// ---------------------------------------------------------------------------
// KV cache element types (tl-model's kv.rs, `KvType`). A head row of hd
// values is stored as its type's values (`data`, row r at r * row_bytes)
// and, quantized, f16 scales (`sc`, row r at r * row_scales):
//   f16 : half[hd]
//   q8_0: int8[hd], one scale per 32 (d = amax / 127, q = round(x / d))
//   q4_0: per 32 values 16 bytes, byte j = q[j] | q[j + 16] << 4, one scale
//         per 32 (d = max / -8 of the largest magnitude, x = (q - 8) d)
//   fp8 : E4M3 codes[hd], one scale per row (d = amax / 448)
// The writer computes the bytes the CPU's `KvType::quantize_row` does.
#define KV_F16 0
#define KV_Q8_0 1
#define KV_Q4_0 2
#define KV_FP8 3

// FP8 E4M3 (e4m3fn) code of x: round to nearest even, saturating at ±448
// (tl-model's `fp8_e4m3`).
__device__ __forceinline__ unsigned int fp8_e4m3(float x) {
    unsigned int sign = (__float_as_uint(x) >> 24) & 0x80u;
    float a = fabsf(x);
    if (a != a) return 0u;
    if (a >= 448.0f) return sign | 0x7eu;
    if (a < 0.015625f) return sign | (unsigned int)rintf(__fmul_rn(a, 512.0f));
    int e = (int)(__float_as_uint(a) >> 23) - 127;
    int m = (int)rintf(__fmul_rn(a, __uint_as_float((unsigned int)(127 + 3 - e) << 23)));
    if (m == 16) { m = 8; e += 1; }
    return sign | (unsigned int)min(((e + 7) << 3) | (m - 8), 0x7e);
}

// The value of an FP8 E4M3 code (the NaN codes read as 0).
__device__ __forceinline__ float fp8_val(unsigned int c) {
    unsigned int e = (c >> 3) & 15u, m = c & 7u;
    float mag = e == 0 ? (float)m * 0.001953125f : __uint_as_float(((e + 120u) << 23) | (m << 20));
    if (e == 15u && m == 7u) mag = 0.0f;
    return (c & 0x80u) ? -mag : mag;
}

// Writes one head row into the cache in its type. Thread i (blockDim =
// hd / 2) holds values 2i and 2i + 1; `row` is the head row's index in the
// layer's pool; `sh` 32 floats of shared scratch.
__device__ void kv_store(float x0, float x1, long row, const RopeArgs& a, void* data, __half* sc, float* sh) {
    int i = threadIdx.x, hd = a.hd;
    unsigned int mask = hd / 2 >= 32 ? 0xffffffffu : (1u << (hd / 2)) - 1u;
    if (a.kv_type == KV_F16) {
        __half* d = (__half*)data + row * hd;
        d[2 * i] = __float2half_rn(x0);
        d[2 * i + 1] = __float2half_rn(x1);
    } else if (a.kv_type == KV_Q8_0) {
        // 16 threads hold a group of 32.
        float am = fmaxf(fabsf(x0), fabsf(x1));
        for (int o = 8; o > 0; o >>= 1) am = fmaxf(am, __shfl_xor_sync(mask, am, o));
        float d = am / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        signed char* q = (signed char*)data + row * hd;
        q[2 * i] = (signed char)roundf(__fmul_rn(x0, id));
        q[2 * i + 1] = (signed char)roundf(__fmul_rn(x1, id));
        if ((i & 15) == 0) sc[row * (hd / 32) + i / 16] = __float2half_rn(d);
    } else if (a.kv_type == KV_Q4_0) {
        // The value of largest magnitude, the first on ties (llama.cpp's loop).
        float am = fabsf(x0), mx = x0;
        int at = 2 * i;
        if (fabsf(x1) > am) { am = fabsf(x1); mx = x1; at = 2 * i + 1; }
        for (int o = 8; o > 0; o >>= 1) {
            float am2 = __shfl_xor_sync(mask, am, o), mx2 = __shfl_xor_sync(mask, mx, o);
            int at2 = __shfl_xor_sync(mask, at, o);
            if (am2 > am || (am2 == am && at2 < at)) { am = am2; mx = mx2; at = at2; }
        }
        float d = mx / -8.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        int q0 = min(15, (int)__fadd_rn(__fmul_rn(x0, id), 8.5f));
        int q1 = min(15, (int)__fadd_rn(__fmul_rn(x1, id), 8.5f));
        // Thread i + 8 holds values j + 16 of this thread's j.
        int p0 = __shfl_xor_sync(mask, q0, 8), p1 = __shfl_xor_sync(mask, q1, 8);
        int l = 2 * (i & 15);
        if (l < 16) {
            unsigned char* q = (unsigned char*)data + row * (hd / 2) + (i / 16) * 16;
            q[l] = (unsigned char)(q0 | (p0 << 4));
            q[l + 1] = (unsigned char)(q1 | (p1 << 4));
        }
        if ((i & 15) == 0) sc[row * (hd / 32) + i / 16] = __float2half_rn(d);
    } else {
        float am = fmaxf(fabsf(x0), fabsf(x1));
        am = warp_max(am);
        __syncthreads();
        if ((i & 31) == 0) sh[i / 32] = am;
        __syncthreads();
        float m = 0.0f;
        for (int w = 0; w < (hd / 2 + 31) / 32; w++) m = fmaxf(m, sh[w]);
        __half dh = __float2half_rn(m / 448.0f);
        float d = __half2float(dh);
        float id = d > 0.0f ? 1.0f / d : 0.0f;
        unsigned char* q = (unsigned char*)data + row * hd;
        q[2 * i] = (unsigned char)fp8_e4m3(__fmul_rn(x0, id));
        q[2 * i + 1] = (unsigned char)fp8_e4m3(__fmul_rn(x1, id));
        if (i == 0) sc[row] = dh;
        __syncthreads();
    }
}

// Values sub*8 .. sub*8 + 7 of head row `row` of a cache of type KT.
template <int KT, int HD>
__device__ __forceinline__ void kv_load8(const void* data, const __half* sc, long row, int sub, float* f) {
    if (KT == KV_F16) {
        uint4 raw = *(const uint4*)((const __half*)data + row * HD + sub * 8);
        const __half2* h2 = (const __half2*)&raw;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 v = __half22float2(h2[k]);
            f[2 * k] = v.x;
            f[2 * k + 1] = v.y;
        }
    } else if (KT == KV_Q8_0) {
        uint2 raw = *(const uint2*)((const signed char*)data + row * HD + sub * 8);
        const signed char* c = (const signed char*)&raw;
        float d = __half2float(sc[row * (HD / 32) + sub / 4]);
#pragma unroll
        for (int k = 0; k < 8; k++) f[k] = (float)c[k] * d;
    } else if (KT == KV_Q4_0) {
        int j0 = (sub & 3) * 8;  // position within the group of 32
        uint2 raw = *(const uint2*)((const unsigned char*)data + row * (HD / 2) + (sub / 4) * 16 + (j0 & 15));
        const unsigned char* c = (const unsigned char*)&raw;
        int sh = j0 >= 16 ? 4 : 0;
        float d = __half2float(sc[row * (HD / 32) + sub / 4]);
#pragma unroll
        for (int k = 0; k < 8; k++) f[k] = (float)(((c[k] >> sh) & 15) - 8) * d;
    } else {
        uint2 raw = *(const uint2*)((const unsigned char*)data + row * HD + sub * 8);
        const unsigned char* c = (const unsigned char*)&raw;
        float d = __half2float(sc[row]);
#pragma unroll
        for (int k = 0; k < 8; k++) f[k] = fp8_val(c[k]) * d;
    }
}

__device__ void rope_head(float* h, int pos, const RopeArgs& a, float* sh, const float* norm_w, const float* ff) {
    int i = threadIdx.x;  // pair index, 0 .. hd/2
    int hd = a.hd;
    if (norm_w) {
        float v0 = h[2 * i], v1 = h[2 * i + 1];
        float ss = block_sum(v0 * v0 + v1 * v1, sh);
        float sc = rsqrtf(ss / hd + a.eps);
        __syncthreads();
        h[2 * i] = v0 * sc * norm_w[2 * i];
        h[2 * i + 1] = v1 * sc * norm_w[2 * i + 1];
    }
    __syncthreads();
    int npairs = a.n_rot / 2;
    float x0 = 0, x1 = 0;
    int i0 = 0, i1 = 0;
    if (i < npairs) {
        float theta_scale = powf(a.base, -2.0f / a.n_rot);
        float theta = (float)pos;
        for (int k = 0; k < i; k++) theta *= theta_scale;
        if (ff) theta /= ff[i];  // rope_freqs (Llama 3.1+)
        float c, s;
        if (a.yarn) {
            float ang = a.freq_scale * theta;
            if (a.ext_factor != 0.0f) {
                float y = ((float)i - a.corr_lo) / fmaxf(0.001f, a.corr_hi - a.corr_lo);
                float mix = (1.0f - fminf(1.0f, fmaxf(0.0f, y))) * a.ext_factor;
                ang = ang * (1.0f - mix) + theta * mix;
            }
            c = cosf(ang) * a.mscale;
            s = sinf(ang) * a.mscale;
        } else {
            c = cosf(theta);
            s = sinf(theta);
        }
        if (a.neox) { i0 = i; i1 = i + npairs; } else { i0 = 2 * i; i1 = 2 * i + 1; }
        float a0 = h[i0], a1 = h[i1];
        x0 = a0 * c - a1 * s;
        x1 = a0 * s + a1 * c;
    }
    __syncthreads();
    if (i < npairs) { h[i0] = x0; h[i1] = x1; }
    __syncthreads();
}

extern "C" __global__ void qkv_rope_store(const float* qkv, const float* bq, const float* bk, const float* bv,
                                          const float* qn, const float* kn, const float* ff, const int* pos,
                                          const int* slots, void* kc, void* vc, __half* ks, __half* vs,
                                          float* q_out, RopeArgs a) { TL_PDL();
    extern __shared__ float smem[];  // 2 hd floats + 32
    float* h = smem;
    float* sh = smem + a.hd;
    float* vsh = smem + a.hd + 32;
    int t = blockIdx.x, head = blockIdx.y, hd = a.hd;
    int qd = a.n_heads * hd, kvd = a.n_kv_heads * hd;
    const float* row = qkv + (long)t * (qd + 2 * kvd);
    int i = threadIdx.x;
    bool is_q = head < a.n_heads;
    int kh = head - a.n_heads;
    const float* src = is_q ? row + head * hd : row + qd + kh * hd;
    const float* bias = is_q ? (bq ? bq + head * hd : 0) : (bk ? bk + kh * hd : 0);
    for (int k = 2 * i; k < 2 * i + 2; k++) h[k] = src[k] + (bias ? bias[k] : 0.0f);
    __syncthreads();
    rope_head(h, pos[t], a, sh, is_q ? qn : kn, ff);
    // A quantized cache holds K rotated, so the queries are rotated alike.
    if (a.k_rot) hadamard_sh(h, hd, a.k_rot);
    if (is_q) {
        float* o = q_out + (long)t * qd + head * hd;
        float tf = 1.0f;
        if (a.temp_scale != 0.0f) {
            float fl = floorf(__fdiv_rn((float)pos[t], (float)a.temp_floor));
            tf = (float)(log((double)fl + 1.0) * (double)a.temp_scale + 1.0);
        }
        o[2 * i] = h[2 * i] * tf * a.q_scale;
        o[2 * i + 1] = h[2 * i + 1] * tf * a.q_scale;
    } else {
        long slot = slots[t];
        // A padding row of a captured decode step writes nothing.
        if (slot < 0) return;
        long r = ((slot / 16) * a.n_kv_heads + kh) * 16 + (slot % 16);
        const float* vsrc = row + qd + kvd + kh * hd;
        float v0 = vsrc[2 * i] + (bv ? bv[kh * hd + 2 * i] : 0.0f);
        float v1 = vsrc[2 * i + 1] + (bv ? bv[kh * hd + 2 * i + 1] : 0.0f);
        if (a.v_rot) {
            vsh[2 * i] = v0;
            vsh[2 * i + 1] = v1;
            hadamard_sh(vsh, hd, a.v_rot);
            v0 = vsh[2 * i];
            v1 = vsh[2 * i + 1];
        }
        kv_store(h[2 * i], h[2 * i + 1], r, a, kc, ks, sh);
        kv_store(v0, v1, r, a, vc, vs, sh);
    }
}

// ---------------------------------------------------------------------------
// Attention of each token's query heads over its sequence's paged f16 KV
// cache (causal, GQA, optional sliding window), online softmax in f32.
// A group of HD/8 lanes handles one key position at a time (8 dims a lane,
// one 16-byte load of K and of V); groups and warps take positions in turn
// and their partial softmax states are merged in shared memory at the end;
// with xq, the output is also left quantized to 8 bits for the next product.
//
// Split-KV (flash-decoding): with `chunk` > 0 (decode steps), each (token,
// head) pair's keys are cut into chunks of `chunk` positions from the
// window's start, one block each (grid.z, enough for the longest context
// the block tables hold). A block writes its partial state (max, sum,
// unnormalised output) to `part`; the last block of the pair to finish
// (counted in `cnt`, which it resets to 0) merges them in chunk order. The
// chunks depend on the context length only, never on the batch, so a
// sequence's attention is the same arithmetic alone or among others; one
// captured graph serves every length, and a context of one chunk writes
// its output directly. With `chunk` 0 (prefill) a pair is one block.
// grid = (n_heads, n_tokens, chunks), blockDim = 256.
// A load that bypasses L1 (other blocks' writes, seen after a fence).
__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
struct AttnArgs {
    int n_heads, n_kv_heads, max_blocks, window;
    float scale;
    int chunk;
    int v_rot;  // the output is rotated back by this Hadamard block (V was rotated); 0: none
    float softcap;  // scores become tanh(s / cap) * cap when > 0 (Gemma 2)
    const float* sinks;  // a sink logit per query head (gpt-oss), or null
};

// Writes one (token, head) pair's attention output from shared memory,
// rotated back first when the cache's V is rotated, and its 8-bit copy.
__device__ void store_attn_out(float* so, int hd, int v_rot, long pair, float* out, signed char* xq, float* xd) {
    if (v_rot) hadamard_sh(so, hd, v_rot);
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        long i = pair * hd + d;
        float v = so[d];
        out[i] = v;
        // (hd is a multiple of 32 and ≤ blockDim: whole warps store.)
        if (xq) store_q8(v, i, xq, xd);
    }
}

// One head's block result from its G groups' states (this thread's group
// `g` holds m, l and acc[8] for values sub*8 ..): sm = [G] m, [G] l,
// [G][HD] acc; each group's weight exp(m - M) once, in s_w. A context of
// one chunk (ns == 1) writes the output; otherwise this chunk's state goes
// to `part` ([pair][gridDim.z][2 + HD]). Every thread of the block calls
// it; it ends with a barrier, so the next head may reuse shared memory.
template <int HD>
__device__ void attn_combine(float m, float l, const float* acc, int g, int sub, int G, int ns, int z, long pair,
                             const AttnArgs& a, float* sm, float* s_w, float* s_out, float* part, float* out,
                             signed char* xq, float* xd) {
    float* sm_m = sm;
    float* sm_l = sm + G;
    float* sm_a = sm + 2 * G;
    if (sub == 0) { sm_m[g] = m; sm_l[g] = l; }
#pragma unroll
    for (int k = 0; k < 8; k++) sm_a[g * HD + sub * 8 + k] = acc[k];
    __syncthreads();
    float M = -TL_INF;
    for (int i = 0; i < G; i++) M = fmaxf(M, sm_m[i]);
    if (threadIdx.x < G) s_w[threadIdx.x] = sm_m[threadIdx.x] != -TL_INF ? expf(sm_m[threadIdx.x] - M) : 0.0f;
    __syncthreads();
    float L = 0.0f;
    for (int i = 0; i < G; i++) L += sm_l[i] * s_w[i];
    // A sink logit takes part in the softmax's sum only (added once, by
    // the block that normalises).
    if (ns == 1 && a.sinks && M != -TL_INF) L += expf(a.sinks[pair % a.n_heads] - M);
    if (ns == 1) {
        for (int d = threadIdx.x; d < HD; d += blockDim.x) {
            float o = 0.0f;
            for (int i = 0; i < G; i++) o += sm_a[i * HD + d] * s_w[i];
            s_out[d] = L > 0.0f ? o / L : 0.0f;
        }
        store_attn_out(s_out, HD, a.v_rot, pair, out, xq, xd);
    } else {
        float* pz = part + (pair * gridDim.z + z) * (2 + HD);
        for (int d = threadIdx.x; d < HD; d += blockDim.x) {
            float o = 0.0f;
            for (int i = 0; i < G; i++) o += sm_a[i * HD + d] * s_w[i];
            pz[2 + d] = o;
        }
        if (threadIdx.x == 0) { pz[0] = M; pz[1] = L; }
    }
    __syncthreads();
}

// The last block of a pair merges every chunk's state in chunk order, with
// every thread taking a share (one chunk's loads do not wait on another's):
// the chunks' maxima and weights in shared memory (sm holds 2G + G*HD >=
// 2112 floats; attn_chunks keeps a pair at <= 2048 chunks), then each
// output value summed over a slice of the chunks by blockDim/HD threads.
// Ends with a barrier, like attn_combine.
template <int HD>
__device__ void attn_merge(long pair, int ns, const AttnArgs& a, float* sm, float* s_red, float* s_slice, float* s_out,
                           const float* part, float* out, signed char* xq, float* xd) {
    const float* p0 = part + pair * gridDim.z * (2 + HD);
    float* wm = sm;
    float mloc = -TL_INF;
    for (int i = threadIdx.x; i < ns; i += blockDim.x) {
        float mi = ld_cg(p0 + i * (2 + HD));
        wm[i] = mi;
        mloc = fmaxf(mloc, mi);
    }
    float MM = block_max(mloc, s_red);
    float lloc = 0.0f;
    for (int i = threadIdx.x; i < ns; i += blockDim.x) {
        float mi = wm[i];
        float w = mi != -TL_INF ? expf(mi - MM) : 0.0f;
        wm[i] = w;
        lloc += ld_cg(p0 + i * (2 + HD) + 1) * w;
    }
    float LL = block_sum(lloc, s_red);
    if (a.sinks && MM != -TL_INF) LL += expf(a.sinks[pair % a.n_heads] - MM);
    __syncthreads();
    int nsl = blockDim.x / HD, d = threadIdx.x % HD, sl = threadIdx.x / HD;
    float o = 0.0f;
    if (sl < nsl)
        for (int i = sl; i < ns; i += nsl) o += ld_cg(p0 + i * (2 + HD) + 2 + d) * wm[i];
    s_slice[threadIdx.x] = o;
    __syncthreads();
    if (threadIdx.x < HD) {
        float sum = 0.0f;
        for (int k = 0; k < nsl; k++) sum += s_slice[k * HD + threadIdx.x];
        s_out[threadIdx.x] = LL > 0.0f ? sum / LL : 0.0f;
    }
    store_attn_out(s_out, HD, a.v_rot, pair, out, xq, xd);
    __syncthreads();
}

template <int HD, int KT>
__device__ void attention(const float* q, const void* kc, const void* vc, const __half* ks, const __half* vs, const int* tok_pos,
                          const int* tok_seq, const int* tables, float* out, AttnArgs a, signed char* xq,
                          float* xd, float* part, unsigned int* cnt) {
    constexpr int LP = HD / 8;     // lanes per position
    constexpr int GPW = 32 / LP;   // groups per warp
    extern __shared__ float sm[];
    __shared__ int s_last;
    __shared__ float s_out[HD];
    __shared__ float s_w[32];       // the groups' weights (G <= 32)
    __shared__ float s_red[32];     // block reductions
    __shared__ float s_slice[256];  // the merge's per-slice sums (blockDim = 256)
    int head = blockIdx.x, t = blockIdx.y, z = blockIdx.z;
    int kvh = head / (a.n_heads / a.n_kv_heads);
    int lane = threadIdx.x & 31, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    int gl = lane / LP, sub = lane % LP;
    int G = nw * GPW, g = warp * GPW + gl;
    int pos = tok_pos[t];
    const int* table = tables + (long)tok_seq[t] * a.max_blocks;
    int lo = a.window > 0 ? max(0, pos + 1 - a.window) : 0;
    int len = pos + 1 - lo;
    int chunk = a.chunk > 0 ? a.chunk : len;
    int ns = (len + chunk - 1) / chunk;
    if (z >= ns) return;  // uniform over the block
    int p_lo = lo + z * chunk, p_hi = min(pos, lo + (z + 1) * chunk - 1);
    const float* qh = q + ((long)t * a.n_heads + head) * HD + sub * 8;
    float qv[8];
#pragma unroll
    for (int k = 0; k < 8; k++) qv[k] = qh[k] * a.scale;
    float m = -TL_INF, l = 0.0f, acc[8];
#pragma unroll
    for (int k = 0; k < 8; k++) acc[k] = 0.0f;
    // The loop bound is uniform across the warp (p0 depends on the warp
    // only): every lane reaches the shuffles, as __shfl_xor_sync with a
    // full mask requires; lanes past `p_hi` only skip the update.
    for (int p0 = p_lo + warp * GPW; p0 <= p_hi; p0 += G) {
        int p = p0 + gl;
        bool valid = p <= p_hi;
        long row = 0;
        float s = 0.0f;
        if (valid) {
            long blk = table[p / 16];
            row = (blk * a.n_kv_heads + kvh) * 16 + (p % 16);
            float kf[8];
            kv_load8<KT, HD>(kc, ks, row, sub, kf);
#pragma unroll
            for (int k = 0; k < 4; k++) s += qv[2 * k] * kf[2 * k] + qv[2 * k + 1] * kf[2 * k + 1];
        }
#pragma unroll
        for (int o = LP / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        if (!valid) continue;
        if (a.softcap > 0.0f) s = tanhf(s * (1.0f / a.softcap)) * a.softcap;
        float mn = fmaxf(m, s);
        float corr = expf(m - mn), e = expf(s - mn);
        l = l * corr + e;
        float vf[8];
        kv_load8<KT, HD>(vc, vs, row, sub, vf);
#pragma unroll
        for (int k = 0; k < 8; k++) acc[k] = acc[k] * corr + e * vf[k];
        m = mn;
    }
    long pair = (long)t * a.n_heads + head;
    attn_combine<HD>(m, l, acc, g, sub, G, ns, z, pair, a, sm, s_w, s_out, part, out, xq, xd);
    if (ns == 1) return;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(cnt + pair, 1u) == (unsigned)(ns - 1);
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    attn_merge<HD>(pair, ns, a, sm, s_red, s_slice, s_out, part, out, xq, xd);
    if (threadIdx.x == 0) cnt[pair] = 0;
}

extern "C" __global__ void attention_64(const float* q, const void* kc, const void* vc, const __half* ks, const __half* vs, const int* tp, const int* ts, const int* tb, float* o, AttnArgs a, signed char* xq, float* xd, float* part, unsigned int* cnt) { TL_PDL(); attention<64, KV_F16>(q, kc, vc, ks, vs, tp, ts, tb, o, a, xq, xd, part, cnt); }
extern "C" __global__ void attention_128(const float* q, const void* kc, const void* vc, const __half* ks, const __half* vs, const int* tp, const int* ts, const int* tb, float* o, AttnArgs a, signed char* xq, float* xd, float* part, unsigned int* cnt) { TL_PDL(); attention<128, KV_F16>(q, kc, vc, ks, vs, tp, ts, tb, o, a, xq, xd, part, cnt); }
extern "C" __global__ void attention_256(const float* q, const void* kc, const void* vc, const __half* ks, const __half* vs, const int* tp, const int* ts, const int* tb, float* o, AttnArgs a, signed char* xq, float* xd, float* part, unsigned int* cnt) { TL_PDL(); attention<256, KV_F16>(q, kc, vc, ks, vs, tp, ts, tb, o, a, xq, xd, part, cnt); }
extern "C" __global__ void attention_64_q8_0(const float* q, const void* kc, const void* vc, const __half* ks, const __half* vs, const int* tp, const int* ts, const int* tb, float* o, AttnArgs a, signed char* xq, float* xd, float* part, unsigned int* cnt) { TL_PDL(); attention<64, KV_Q8_0>(q, kc, vc, ks, vs, tp, ts, tb, o, a, xq, xd, part, cnt); }
extern "C" __global__ void attention_128_q8_0(const float* q, const void* kc, const void* vc, const __half* ks, const __half* vs, const int* tp, const int* ts, const int* tb, float* o, AttnArgs a, signed char* xq, float* xd, float* part, unsigned int* cnt) { TL_PDL(); attention<128, KV_Q8_0>(q, kc, vc, ks, vs, tp, ts, tb, o, a, xq, xd, part, cnt); }
extern "C" __global__ void attention_256_q8_0(const float* q, const void* kc, const void* vc, const __half* ks, const __half* vs, const int* tp, const int* ts, const int* tb, float* o, AttnArgs a, signed char* xq, float* xd, float* part, unsigned int* cnt) { TL_PDL(); attention<256, KV_Q8_0>(q, kc, vc, ks, vs, tp, ts, tb, o, a, xq, xd, part, cnt); }
extern "C" __global__ void attention_64_q4_0(const float* q, const void* kc, const void* vc, const __half* ks, const __half* vs, const int* tp, const int* ts, const int* tb, float* o, AttnArgs a, signed char* xq, float* xd, float* part, unsigned int* cnt) { TL_PDL(); attention<64, KV_Q4_0>(q, kc, vc, ks, vs, tp, ts, tb, o, a, xq, xd, part, cnt); }
extern "C" __global__ void attention_128_q4_0(const float* q, const void* kc, const void* vc, const __half* ks, const __half* vs, const int* tp, const int* ts, const int* tb, float* o, AttnArgs a, signed char* xq, float* xd, float* part, unsigned int* cnt) { TL_PDL(); attention<128, KV_Q4_0>(q, kc, vc, ks, vs, tp, ts, tb, o, a, xq, xd, part, cnt); }
extern "C" __global__ void attention_256_q4_0(const float* q, const void* kc, const void* vc, const __half* ks, const __half* vs, const int* tp, const int* ts, const int* tb, float* o, AttnArgs a, signed char* xq, float* xd, float* part, unsigned int* cnt) { TL_PDL(); attention<256, KV_Q4_0>(q, kc, vc, ks, vs, tp, ts, tb, o, a, xq, xd, part, cnt); }
extern "C" __global__ void attention_64_fp8(const float* q, const void* kc, const void* vc, const __half* ks, const __half* vs, const int* tp, const int* ts, const int* tb, float* o, AttnArgs a, signed char* xq, float* xd, float* part, unsigned int* cnt) { TL_PDL(); attention<64, KV_FP8>(q, kc, vc, ks, vs, tp, ts, tb, o, a, xq, xd, part, cnt); }
extern "C" __global__ void attention_128_fp8(const float* q, const void* kc, const void* vc, const __half* ks, const __half* vs, const int* tp, const int* ts, const int* tb, float* o, AttnArgs a, signed char* xq, float* xd, float* part, unsigned int* cnt) { TL_PDL(); attention<128, KV_FP8>(q, kc, vc, ks, vs, tp, ts, tb, o, a, xq, xd, part, cnt); }
extern "C" __global__ void attention_256_fp8(const float* q, const void* kc, const void* vc, const __half* ks, const __half* vs, const int* tp, const int* ts, const int* tb, float* o, AttnArgs a, signed char* xq, float* xd, float* part, unsigned int* cnt) { TL_PDL(); attention<256, KV_FP8>(q, kc, vc, ks, vs, tp, ts, tb, o, a, xq, xd, part, cnt); }

// ---------------------------------------------------------------------------
// FlashAttention-style prefill over the paged f16 cache, on the tensor
// cores (mma.sync m16n8k16, f16 inputs, f32 sums). A block is one tile of
// up to 64 consecutive query rows of one sequence (`tiles`: row0, rows,
// built by the host) and one query head; each of its 4 warps owns 16 rows.
// The block walks the sequence's keys 64 at a time from the tile's window
// start to its last row's position: K and V tiles go through shared memory
// (read once per tile and head instead of once per row), S = Q·Kᵀ and
// O += P·V are MMAs, the softmax is online in f32 per row (causal and
// sliding-window masks per element). The queries enter as f16 (scaled
// first, as llama.cpp's FlashAttention does), P as f16.
// Long contexts split each tile's keys over gridDim.z blocks of a.chunk
// keys each (a multiple of 64; 0 with one split) so that short steps over
// long caches still fill the card: each split leaves its rows' running
// maximum, sum and unnormalised output in `part` ([row][head][split]
// [2 + HD]) and `fa_merge` combines them.
// grid = (tiles, n_heads, splits), blockDim = 128.
__device__ __forceinline__ void mma_f16(float* c, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned int pack_h2(float x, float y) {
    __half2 h = __floats2half2_rn(x, y);
    return *(unsigned int*)&h;
}

template <int HD>
__device__ void fa_prefill(const float* q, const __half* kc, const __half* vc, const int* tok_pos, const int* tok_seq,
                           const int* tables, const int* tiles, float* out, AttnArgs a, float* part) {
    constexpr int BK = 64;        // keys per tile
    constexpr int ST = HD + 8;    // shared row stride in halves (staggers the banks)
    __shared__ __align__(16) __half sk[BK * ST];
    __shared__ __align__(16) __half sv[BK * ST];
    int head = blockIdx.y;
    int r0 = tiles[2 * blockIdx.x], nr = tiles[2 * blockIdx.x + 1];
    int kvh = head / (a.n_heads / a.n_kv_heads);
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int* table = tables + (long)tok_seq[r0] * a.max_blocks;
    int pos_first = tok_pos[r0], pos_last = tok_pos[r0 + nr - 1];
    int lo = a.window > 0 ? max(0, pos_first + 1 - a.window) : 0;
    // This block's share of the keys: [kb, ke).
    int ns = gridDim.z, kb = lo, ke = pos_last + 1;
    if (ns > 1) {
        kb = lo + blockIdx.z * a.chunk;
        ke = min(ke, kb + a.chunk);
    }
    int wr = warp * 16;  // this warp's first row in the tile
    bool active = wr < nr;
    int ra = wr + g, rb = wr + g + 8;
    int pa = ra < nr ? tok_pos[r0 + ra] : -1;  // -1: no row (every key masked)
    int pb = rb < nr ? tok_pos[r0 + rb] : -1;
    int wlast = active ? tok_pos[r0 + min(wr + 15, nr - 1)] : -1;
    int qs = a.n_heads * HD;
    unsigned int qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        int d = kk * 16 + t4 * 2;
        const float* qa = q + (long)(r0 + ra) * qs + head * HD + d;
        const float* qb = q + (long)(r0 + rb) * qs + head * HD + d;
        bool va = pa >= 0, vb = pb >= 0;
        qf[kk][0] = va ? pack_h2(qa[0] * a.scale, qa[1] * a.scale) : 0u;
        qf[kk][1] = vb ? pack_h2(qb[0] * a.scale, qb[1] * a.scale) : 0u;
        qf[kk][2] = va ? pack_h2(qa[8] * a.scale, qa[9] * a.scale) : 0u;
        qf[kk][3] = vb ? pack_h2(qb[8] * a.scale, qb[9] * a.scale) : 0u;
    }
    float o[HD / 8][4];
#pragma unroll
    for (int nd = 0; nd < HD / 8; nd++) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
    float ma = -TL_INF, mb = -TL_INF, la = 0.0f, lb = 0.0f;
    for (int k0 = kb; k0 < ke; k0 += BK) {
        __syncthreads();
        for (int i = threadIdx.x; i < BK * HD / 8; i += blockDim.x) {
            int kr = i / (HD / 8), c = i % (HD / 8);
            int p = k0 + kr;
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (p < ke) {
                long row = ((long)table[p / 16] * a.n_kv_heads + kvh) * 16 + (p % 16);
                kv4 = *(const uint4*)(kc + row * HD + c * 8);
                vv4 = *(const uint4*)(vc + row * HD + c * 8);
            }
            *(uint4*)(sk + kr * ST + c * 8) = kv4;
            *(uint4*)(sv + kr * ST + c * 8) = vv4;
        }
        __syncthreads();
        // Keys past this warp's last row, or before its window: nothing to do.
        if (!active || k0 > wlast) continue;
        if (a.window > 0 && k0 + BK - 1 < tok_pos[r0 + wr] + 1 - a.window) continue;
        float sc[BK / 8][4];
#pragma unroll
        for (int nb = 0; nb < BK / 8; nb++) {
            sc[nb][0] = sc[nb][1] = sc[nb][2] = sc[nb][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                const __half* kp = sk + (nb * 8 + g) * ST + kk * 16 + t4 * 2;
                mma_f16(sc[nb], qf[kk], *(const unsigned int*)kp, *(const unsigned int*)(kp + 8));
            }
        }
        // Masks, then each row's running maximum (a row's 64 keys are
        // spread over the 4 lanes of a quad).
        float xa = -TL_INF, xb = -TL_INF;
#pragma unroll
        for (int nb = 0; nb < BK / 8; nb++) {
#pragma unroll
            for (int j = 0; j < 2; j++) {
                int kp = k0 + nb * 8 + t4 * 2 + j;
                if (a.softcap > 0.0f) {
                    sc[nb][j] = tanhf(sc[nb][j] * (1.0f / a.softcap)) * a.softcap;
                    sc[nb][2 + j] = tanhf(sc[nb][2 + j] * (1.0f / a.softcap)) * a.softcap;
                }
                bool oka = kp <= pa && (a.window <= 0 || kp > pa - a.window);
                bool okb = kp <= pb && (a.window <= 0 || kp > pb - a.window);
                if (!oka) sc[nb][j] = -TL_INF;
                if (!okb) sc[nb][2 + j] = -TL_INF;
                xa = fmaxf(xa, sc[nb][j]);
                xb = fmaxf(xb, sc[nb][2 + j]);
            }
        }
        xa = fmaxf(xa, __shfl_xor_sync(0xffffffff, xa, 1));
        xa = fmaxf(xa, __shfl_xor_sync(0xffffffff, xa, 2));
        xb = fmaxf(xb, __shfl_xor_sync(0xffffffff, xb, 1));
        xb = fmaxf(xb, __shfl_xor_sync(0xffffffff, xb, 2));
        float na = fmaxf(ma, xa), nb_ = fmaxf(mb, xb);
        // A row with no key yet keeps 0 (and no NaN from -inf - -inf).
        float sa = na == -TL_INF ? 0.0f : na, sb = nb_ == -TL_INF ? 0.0f : nb_;
        float ca = expf(ma - sa), cb = expf(mb - sb);
        la *= ca;
        lb *= cb;
#pragma unroll
        for (int nd = 0; nd < HD / 8; nd++) {
            o[nd][0] *= ca;
            o[nd][1] *= ca;
            o[nd][2] *= cb;
            o[nd][3] *= cb;
        }
        ma = na;
        mb = nb_;
        unsigned int pf[BK / 16][4];
#pragma unroll
        for (int nb = 0; nb < BK / 8; nb++) {
            float p0 = expf(sc[nb][0] - sa), p1 = expf(sc[nb][1] - sa);
            float p2 = expf(sc[nb][2] - sb), p3 = expf(sc[nb][3] - sb);
            la += p0 + p1;
            lb += p2 + p3;
            // The C fragment of keys nb*8.. is half of P's A fragment.
            pf[nb / 2][(nb & 1) * 2 + 0] = pack_h2(p0, p1);
            pf[nb / 2][(nb & 1) * 2 + 1] = pack_h2(p2, p3);
        }
#pragma unroll
        for (int nd = 0; nd < HD / 8; nd++) {
#pragma unroll
            for (int kk = 0; kk < BK / 16; kk++) {
                const __half* vp = sv + (kk * 16 + t4 * 2) * ST + nd * 8 + g;
                const unsigned short* vh = (const unsigned short*)vp;
                unsigned int b0 = (unsigned int)vh[0] | ((unsigned int)vh[ST] << 16);
                unsigned int b1 = (unsigned int)vh[8 * ST] | ((unsigned int)vh[9 * ST] << 16);
                mma_f16(o[nd], pf[kk], b0, b1);
            }
        }
    }
    if (!active) return;
    la += __shfl_xor_sync(0xffffffff, la, 1);
    la += __shfl_xor_sync(0xffffffff, la, 2);
    lb += __shfl_xor_sync(0xffffffff, lb, 1);
    lb += __shfl_xor_sync(0xffffffff, lb, 2);
    if (ns > 1) {
        // This split's state per row: max, sum, unnormalised output (a
        // split with no key of the row leaves -inf, 0, 0).
#pragma unroll
        for (int half = 0; half < 2; half++) {
            int r = half ? rb : ra;
            if ((half ? pb : pa) < 0) continue;
            float* ps = part + (((long)(r0 + r) * a.n_heads + head) * ns + blockIdx.z) * (HD + 2);
            if (t4 == 0) {
                ps[0] = half ? mb : ma;
                ps[1] = half ? lb : la;
            }
#pragma unroll
            for (int nd = 0; nd < HD / 8; nd++) {
                ps[2 + nd * 8 + t4 * 2] = o[nd][half * 2];
                ps[3 + nd * 8 + t4 * 2] = o[nd][half * 2 + 1];
            }
        }
        return;
    }
    if (a.sinks) {
        float sk = a.sinks[head];
        if (ma != -TL_INF) la += expf(sk - ma);
        if (mb != -TL_INF) lb += expf(sk - mb);
    }
    float ia = la > 0.0f ? 1.0f / la : 0.0f, ib = lb > 0.0f ? 1.0f / lb : 0.0f;
#pragma unroll
    for (int nd = 0; nd < HD / 8; nd++) {
        int d = head * HD + nd * 8 + t4 * 2;
        if (pa >= 0) {
            float* oa = out + (long)(r0 + ra) * qs + d;
            oa[0] = o[nd][0] * ia;
            oa[1] = o[nd][1] * ia;
        }
        if (pb >= 0) {
            float* ob = out + (long)(r0 + rb) * qs + d;
            ob[0] = o[nd][2] * ib;
            ob[1] = o[nd][3] * ib;
        }
    }
}

extern "C" __global__ void fa_prefill_64(const float* q, const __half* kc, const __half* vc, const int* tp, const int* ts, const int* tb, const int* tiles, float* o, AttnArgs a, float* part) { TL_PDL(); fa_prefill<64>(q, kc, vc, tp, ts, tb, tiles, o, a, part); }
extern "C" __global__ void fa_prefill_128(const float* q, const __half* kc, const __half* vc, const int* tp, const int* ts, const int* tb, const int* tiles, float* o, AttnArgs a, float* part) { TL_PDL(); fa_prefill<128>(q, kc, vc, tp, ts, tb, tiles, o, a, part); }

// Combines `fa_prefill`'s per-split states of each (row, head):
// out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s, M = max_s m_s.
// grid = (rows, n_heads), blockDim = head dim (one output element each).
extern "C" __global__ void fa_merge(const float* part, float* out, int n_heads, int hd, int ns, const float* sinks) {
    TL_PDL();
    long pair = (long)blockIdx.x * n_heads + blockIdx.y;
    const float* ps = part + pair * ns * (hd + 2);
    int d = threadIdx.x;
    float m = -TL_INF;
    for (int s = 0; s < ns; s++) m = fmaxf(m, ps[s * (hd + 2)]);
    float l = 0.0f, acc = 0.0f;
    if (m != -TL_INF) {
        for (int s = 0; s < ns; s++) {
            const float* st = ps + s * (hd + 2);
            float w = expf(st[0] - m);
            l += w * st[1];
            acc += w * st[2 + d];
        }
        if (sinks) l += expf(sinks[blockIdx.y] - m);
    }
    out[pair * hd + d] = l > 0.0f ? acc / l : 0.0f;
}

// ---------------------------------------------------------------------------
// Sampling on the device, each logits row spread over many blocks (see
// sample_phase below), the chain of the CPU sampler (tl-model's sampler.rs, llama.cpp's
// default): penalties → top-k → top-p → min-p → temperature → draw.
// Nothing is sorted: top-k's k-th largest logit and top-p's boundary are
// found by radix selection over the logits' order-preserving 32-bit keys
// (4 passes of 8 bits, histograms in shared then global memory); ties at a boundary are
// kept in token order, first ids first, as the CPU's sort by (logit desc,
// id asc) keeps them. Top-p's masses are fixed point (exp(l - max) · 2^40,
// summed as integers), so every sum is exact and the result does not depend
// on the order of the atomics. The draw is the inverse CDF in token order
// at the host's uniform u: the same distribution as the CPU's, not the same
// pick for a given seed.
// Layout: each warp owns a contiguous span of the row and reads it 32
// consecutive logits (one 128-byte line) at a time, so every read is
// coalesced; ranks among equal keys come from ballots. (One 1,024-thread
// block per row, walking a 152k row ten times, took ≈0.8 ms a step at
// batch 1 on an H100.)
#define FP_ONE 1099511627776.0  // 2^40
#define FULL 0xffffffffu
struct SampleRow {
    double u;
    float temp, top_p, min_p, rep, pres, freq;
    int top_k, n_pen, pen_off;
    int mask;  // grammar mask: first word's index from `pens` (4-byte words), -1 none
};

__device__ __forceinline__ unsigned f2key(float f) {
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key2f(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ unsigned match_any(unsigned v) {
    unsigned m;
    asm volatile("match.any.sync.b32 %0, %1, 0xffffffff;" : "=r"(m) : "r"(v));
    return m;
}

__device__ __forceinline__ unsigned long long fp_mass(float l, float M) {
    return (unsigned long long)((double)expf(l - M) * FP_ONE);
}

// The sum of v over the lanes of `peers` (the calling lane among them):
// a mass is < 2^41, so its two 21-bit halves sum exactly in 32 bits
// (32 · 2^21 = 2^26) with the warp's integer reduction.
__device__ __forceinline__ unsigned long long peer_sum(unsigned peers, unsigned long long v) {
    unsigned lo = __reduce_add_sync(peers, (unsigned)(v & 0x1fffffull));
    unsigned hi = __reduce_add_sync(peers, (unsigned)(v >> 21));
    return ((unsigned long long)hi << 21) + lo;
}

struct KeepRule {
    bool tk, tp;
    unsigned tkey, trem;  // top-k: keys > tkey, and the first trem ids with key == tkey
    unsigned pkey, prem;  // top-p: the same over the top-k survivors
    float cut;            // min-p: logits ≥ cut
};

// Whether each lane's token (ok: inside the row) survives top-k; ek, the
// warp's count of tokens of key tkey so far, advances over the 32.
__device__ __forceinline__ bool tile_in_top_k(unsigned k, bool ok, const KeepRule& R, unsigned& ek,
                                              unsigned lt) {
    if (!R.tk) return ok;
    bool eq = ok && k == R.tkey;
    unsigned b = __ballot_sync(FULL, eq);
    unsigned rank = ek + __popc(b & lt);
    ek += __popc(b);
    return ok && (k > R.tkey || (eq && rank < R.trem));
}

// ... and top-p (ep: the count of top-k survivors of key pkey so far) and
// min-p: the kept set.
__device__ __forceinline__ bool tile_kept(float l, bool ok, const KeepRule& R, unsigned& ek, unsigned& ep,
                                          unsigned lt) {
    unsigned k = f2key(l);
    bool in = tile_in_top_k(k, ok, R, ek, lt);
    if (R.tp) {
        bool eq = in && k == R.pkey;
        unsigned b = __ballot_sync(FULL, eq);
        unsigned rank = ep + __popc(b & lt);
        ep += __popc(b);
        in = in && (k > R.pkey || (eq && rank < R.prem));
    }
    return in && l >= R.cut;
}

template <typename T>
__device__ __forceinline__ T warp_sum_t(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

// The row is spread over G blocks of SB_WARPS warps (G = gridDim.x, up to
// SB_MAXG; grid.y = rows) and the chain runs as 14 launches of
// sample_phase (phase = 0 … 13), because each radix pass needs every
// block's histogram before the next can start. Per row, SampScratch in
// global memory carries what one launch leaves the next: each block's
// maximum, the 4 count and 4 mass histograms (integer atomics: the sums do
// not depend on order), each warp's count of boundary-key tokens, each
// block's mass and draw-weight sums. At the start of every launch, warp 0
// of every block replays the decisions of the passes done so far from
// those (a few 256-bin scans), so all blocks hold the same state without a
// grid-wide barrier. Token order is (block, warp, step, lane): warp w of
// block g owns the span [(g·SB_WARPS + w)·span, …), read 32 consecutive
// logits at a time, so ranks among equal keys and the draw's inverse CDF
// are in token order as in the CPU sampler.
//   0      penalties, NaN → -inf, the grammar mask, each block's maximum; block 0 clears the histograms
//   1–4    top-k: count histograms of the 4 key bytes
//   5      top-k boundary: each warp's count of tokens of the boundary key
//   6      top-p: each block's fixed-point mass over the top-k survivors
//   7–10   top-p: mass histograms of the 4 key bytes
//   11     top-p boundary: each warp's count of survivors of the boundary key
//   12     the draw: each block's sum of kept weights and last kept token
//   13     the block whose prefix holds u · total walks its span; block 0
//          writes the greedy pick or, past the end by rounding, the last kept
#define SB_WARPS 8
#define SB_MAXG 64
struct SampScratch {
    float bval[SB_MAXG];
    int bidx[SB_MAXG];
    unsigned hc[4][256];
    unsigned long long hm[4][256];
    unsigned ck[SB_MAXG * SB_WARPS], cp[SB_MAXG * SB_WARPS];
    unsigned long long msum[SB_MAXG];
    double wsum[SB_MAXG];
    int wlast[SB_MAXG];
};
static_assert(sizeof(SampScratch) == 18176, "SAMP_SCRATCH_BYTES in tl-model's cuda/mod.rs");

struct SampCtx {
    float M;
    int arg;
    bool done;                 // greedy, or a row of -inf: the pick is arg
    KeepRule R;
    unsigned prefix, mask;     // the radix state of the pass being built
    unsigned long long target; // top-p's mass target
};

// One radix decision over a 256-bin histogram (shared memory), by the
// whole warp, every lane getting the result: from bin 255 down, the first
// bin where the running total reaches `need`, bin 0 if none — the serial
// `for (b = 255; b > 0; b--) { if (a + h[b] >= need) break; a += h[b]; }`
// in a few steps (lane L holds bins 255-8L … 248-8L; a scan across lanes
// finds the lane, which walks its 8). *above gets the total of the bins
// above the pick.
template <typename T>
__device__ unsigned warp_radix_pick(const T* h, T need, T* above) {
    int lane = threadIdx.x & 31;
    T v[8], s = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) { v[j] = h[255 - 8 * lane - j]; s += v[j]; }
    T inc = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        T y = __shfl_up_sync(FULL, inc, o);
        if (lane >= o) inc += y;
    }
    unsigned hit = __ballot_sync(FULL, inc >= need);
    int f = hit ? __ffs(hit) - 1 : 31;
    T a = __shfl_sync(FULL, inc - s, f);
    unsigned b = 0;
    if (lane == f) {
#pragma unroll
        for (int j = 0; j < 8; j++) {
            int bin = 255 - 8 * lane - j;
            if (bin == 0) break;  // bin 0 is taken without a check
            if (a + v[j] >= need) { b = (unsigned)bin; break; }
            a += v[j];
        }
    }
    *above = __shfl_sync(FULL, a, f);
    return __shfl_sync(FULL, b, f);
}

// Warp 0 (every lane): the state at the start of `phase` from the row's
// scratch; hc/hm are the row's histograms staged in shared memory. Lane 0
// writes *c.
__device__ void samp_resolve(const SampScratch* S, const unsigned (*hc)[256],
                             const unsigned long long (*hm)[256], const SampleRow& P, int V, int G,
                             int phase, SampCtx* c) {
    int lane = threadIdx.x & 31;
    SampCtx t;
    t.M = -TL_INF; t.arg = 0; t.done = false;
    t.prefix = 0; t.mask = 0; t.target = 0;
    KeepRule& R = t.R;
    R.tk = false; R.tp = false; R.tkey = 0; R.trem = 0; R.pkey = 0; R.prem = 0; R.cut = -TL_INF;
    if (phase > 0) {
        float best = -TL_INF;
        int bi = 0x7fffffff;
        for (int g = lane; g < G; g += 32) arg_best(best, bi, S->bval[g], S->bidx[g]);
        warp_arg_best(best, bi);
        t.M = best;
        t.arg = bi == 0x7fffffff ? 0 : bi;
        t.done = P.temp <= 0.0f || best == -TL_INF;
        if (!t.done) {
            R.tk = P.top_k > 0 && P.top_k < V;
            R.tp = P.top_p < 1.0f;
            R.cut = P.min_p > 0.0f ? best + logf(P.min_p) : -TL_INF;
        }
        // Top-k: passes 0 … 3 are built in phases 1 … 4.
        if (R.tk) {
            unsigned prefix = 0, mask = 0, rem = (unsigned)P.top_k;
            int passes = min(phase - 1, 4);
            for (int q = 0; q < passes; q++) {
                int shift = 24 - 8 * q;
                unsigned above;
                prefix |= warp_radix_pick(hc[q], rem, &above) << shift;
                rem -= above;
                mask |= 255u << shift;
            }
            if (phase <= 4) { t.prefix = prefix; t.mask = mask; }
            else { R.tkey = prefix; R.trem = rem; }
        }
        // Top-p: the mass target from phase 7 on, passes built in 7 … 10.
        if (R.tp && phase >= 7) {
            unsigned long long tot = 0;
            for (int g = lane; g < G; g += 32) tot += S->msum[g];
            tot = warp_sum_t(tot);
            unsigned long long target = (unsigned long long)ceil((double)P.top_p * (double)tot);
            if (target < 1) target = 1;
            t.target = target;
            unsigned prefix = 0, mask = 0;
            unsigned long long acc = 0;
            int passes = min(phase - 7, 4);
            for (int q = 0; q < passes; q++) {
                int shift = 24 - 8 * q;
                unsigned long long above;
                prefix |= warp_radix_pick(hm[q], target - acc, &above) << shift;
                acc += above;
                mask |= 255u << shift;
            }
            if (phase <= 10) { t.prefix = prefix; t.mask = mask; }
            else {
                R.pkey = prefix;
                if (phase >= 12) {
                    unsigned n = 0;
                    for (int i = lane; i < G * SB_WARPS; i += 32) n += S->cp[i];
                    n = warp_sum_t(n);
                    // The fewest tokens of the boundary key that reach the target.
                    double f = (double)fp_mass(key2f(prefix), best);
                    unsigned long long need = target - acc;
                    unsigned j = f > 0.0 ? (unsigned)ceil((double)need / f) : 1u;
                    R.prem = max(1u, min(j, n));
                }
            }
        }
    }
    if (lane == 0) *c = t;
}

// The calling warp's first rank among the tokens counted in cnt (warps in
// token order before it); every lane gets it.
__device__ __forceinline__ unsigned warp_base(const unsigned* cnt, int gw) {
    unsigned s = 0;
    for (int i = threadIdx.x & 31; i < gw; i += 32) s += cnt[i];
    return warp_sum_t(s);
}

// Block sum in warp order of one value per warp (lane 0's), to every thread.
template <typename T>
__device__ T block_sum_w(T v, T* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    T t = 0;
    for (int w = 0; w < SB_WARPS; w++) t += sh[w];
    __syncthreads();
    return t;
}

extern "C" __global__ void sample_phase(int phase, float* logits, int V, const SampleRow* rows,
                                        const int* pens, SampScratch* scratch, int* ids) { TL_PDL();
    __shared__ SampCtx c;
    __shared__ unsigned hc[256];
    __shared__ unsigned long long hm[256];
    __shared__ unsigned rhc[4][256];
    __shared__ unsigned long long rhm[4][256];
    __shared__ double shd[SB_WARPS];
    __shared__ unsigned long long shu[SB_WARPS];
    __shared__ float sv[SB_WARPS];
    __shared__ int si[SB_WARPS];
    int r = blockIdx.y, g = blockIdx.x, G = gridDim.x;
    int tid = threadIdx.x, lane = tid & 31, warp = tid / 32, gw = g * SB_WARPS + warp;
    unsigned lt = (1u << lane) - 1u;
    SampleRow P = rows[r];
    SampScratch* S = scratch + r;
    float* x = logits + (long)r * V;
    int span = ((V + G * SB_WARPS * 32 - 1) / (G * SB_WARPS * 32)) * 32;
    int wb = min(V, gw * span), we = min(V, wb + span);
    // The row's histograms of the passes done so far, for warp 0's replay.
    if (phase >= 2) for (int i = tid; i < 4 * 256; i += blockDim.x) (&rhc[0][0])[i] = (&S->hc[0][0])[i];
    if (phase >= 8) for (int i = tid; i < 4 * 256; i += blockDim.x) (&rhm[0][0])[i] = (&S->hm[0][0])[i];
    __syncthreads();
    if (warp == 0) samp_resolve(S, rhc, rhm, P, V, G, phase, &c);
    __syncthreads();
    const KeepRule R = c.R;
    const float M = c.M;
    if (phase == 0) {
        // Penalties on this block's tokens: each distinct token of the
        // window once, with its count; the CPU's arithmetic, unfused.
        int bb = min(V, g * SB_WARPS * span), be = min(V, bb + SB_WARPS * span);
        for (int i = tid; i < P.n_pen; i += blockDim.x) {
            int tok = pens[2 * (P.pen_off + i)], cnt = pens[2 * (P.pen_off + i) + 1];
            if (tok >= bb && tok < be) {
                float l = x[tok];
                l = l > 0.0f ? __fdiv_rn(l, P.rep) : __fmul_rn(l, P.rep);
                x[tok] = __fsub_rn(l, __fadd_rn(__fmul_rn((float)cnt, P.freq), P.pres));
            }
        }
        __syncthreads();
        // The largest logit and its first index (NaN counts as -inf).
        float best = -TL_INF;
        int bi = 0x7fffffff;
        // A grammar's mask refuses the tokens whose bit is clear.
        const unsigned* mw = P.mask >= 0 ? (const unsigned*)pens + P.mask : nullptr;
        for (int i = wb + lane; i < we; i += 32) {
            float l = x[i];
            if (l != l) { l = -TL_INF; x[i] = l; }
            if (mw && !((mw[i >> 5] >> (i & 31)) & 1u)) { l = -TL_INF; x[i] = l; }
            arg_best(best, bi, l, i);
        }
        warp_arg_best(best, bi);
        if (lane == 0) { sv[warp] = best; si[warp] = bi; }
        __syncthreads();
        if (warp == 0) {
            best = lane < SB_WARPS ? sv[lane] : -TL_INF;
            bi = lane < SB_WARPS ? si[lane] : 0x7fffffff;
            warp_arg_best(best, bi);
            if (lane == 0) { S->bval[g] = best; S->bidx[g] = bi; }
        }
        if (g == 0) {
            for (int i = tid; i < 4 * 256; i += blockDim.x) { (&S->hc[0][0])[i] = 0; (&S->hm[0][0])[i] = 0; }
        }
        return;
    }
    if (phase == 13) {
        if (c.done) {
            if (g == 0 && tid == 0) ids[r] = c.arg;
            return;
        }
        double total = 0.0, pre = 0.0, mine = S->wsum[g];
        bool found = false;
        for (int b = 0; b < G; b++) {
            if (b == g) pre = total;
            total += S->wsum[b];
        }
        double target = P.u * total;
        {
            double t = 0.0;
            for (int b = 0; b < G; b++) {
                double w = S->wsum[b];
                if (w > 0.0 && target >= t && target < t + w) found = true;
                t += w;
            }
        }
        if (!found) {
            // Rounding past the end: the last kept token.
            if (g == 0 && tid == 0) {
                int m = -1;
                for (int b = 0; b < G; b++) m = max(m, S->wlast[b]);
                ids[r] = m < 0 ? c.arg : m;
            }
            return;
        }
        if (!(mine > 0.0 && target >= pre && target < pre + mine)) return;
    }
    if (c.done) return;
    if (phase >= 1 && phase <= 5 && !R.tk) return;
    if (phase >= 6 && phase <= 11 && !R.tp) return;
    float inv_t = 1.0f / P.temp;
    if ((phase >= 1 && phase <= 4) || (phase >= 7 && phase <= 10)) {
        // One radix pass: this block's histogram, then its non-empty bins
        // added to the row's.
        bool mass = phase >= 7;
        int q = mass ? phase - 7 : phase - 1, shift = 24 - 8 * q;
        for (int i = tid; i < 256; i += blockDim.x) { hc[i] = 0; hm[i] = 0; }
        __syncthreads();
        unsigned ek = mass && R.tk ? warp_base(S->ck, gw) : 0;
        unsigned prefix = c.prefix, mask = c.mask;
        for (int t0 = wb; t0 < we; t0 += 32) {
            int i = t0 + lane;
            bool ok = i < we;
            float l = ok ? x[i] : -TL_INF;
            unsigned k = f2key(l);
            bool in = mass ? tile_in_top_k(k, ok, R, ek, lt) : ok;
            in = in && (k & mask) == prefix;
            unsigned b = in ? (k >> shift) & 255 : 256u;
            unsigned peers = match_any(b);
            bool leader = (peers & lt) == 0;
            if (mass) {
                unsigned long long f = in ? fp_mass(l, M) : 0ull;
                unsigned long long s = peer_sum(peers, f);
                if (in && leader && s) atomicAdd(&hm[b], s);
            } else if (in && leader) {
                atomicAdd(&hc[b], (unsigned)__popc(peers));
            }
        }
        __syncthreads();
        for (int i = tid; i < 256; i += blockDim.x) {
            if (mass) { if (hm[i]) atomicAdd(&S->hm[q][i], hm[i]); }
            else if (hc[i]) atomicAdd(&S->hc[q][i], hc[i]);
        }
        return;
    }
    if (phase == 5 || phase == 11) {
        // Each warp's count of boundary-key tokens (top-p: among the top-k
        // survivors), in order to rank them.
        bool p = phase == 11;
        unsigned ek = p && R.tk ? warp_base(S->ck, gw) : 0, n = 0;
        unsigned key = p ? R.pkey : R.tkey;
        for (int t0 = wb; t0 < we; t0 += 32) {
            int i = t0 + lane;
            bool ok = i < we;
            unsigned k = f2key(ok ? x[i] : -TL_INF);
            bool in = p ? tile_in_top_k(k, ok, R, ek, lt) : ok;
            n += __popc(__ballot_sync(FULL, in && k == key));
        }
        if (lane == 0) (p ? S->cp : S->ck)[gw] = n;
        return;
    }
    unsigned ek = R.tk ? warp_base(S->ck, gw) : 0;
    if (phase == 6) {
        unsigned long long s = 0;
        for (int t0 = wb; t0 < we; t0 += 32) {
            int i = t0 + lane;
            bool ok = i < we;
            float l = ok ? x[i] : -TL_INF;
            if (tile_in_top_k(f2key(l), ok, R, ek, lt)) s += fp_mass(l, M);
        }
        s = block_sum_w(warp_sum_t(s), shu);
        if (tid == 0) S->msum[g] = s;
        return;
    }
    // Phases 12 and 13: the weights exp((l - M) / T) of the kept tokens.
    unsigned ep0 = R.tp ? warp_base(S->cp, gw) : 0;
    double s = 0.0;
    int last = -1;
    {
        unsigned ek1 = ek, ep = ep0;
        for (int t0 = wb; t0 < we; t0 += 32) {
            int i = t0 + lane;
            bool ok = i < we;
            float l = ok ? x[i] : -TL_INF;
            if (tile_kept(l, ok, R, ek1, ep, lt)) {
                double w = exp((double)__fmul_rn(__fsub_rn(l, M), inv_t));
                s += w;
                if (w > 0.0) last = i;
            }
        }
    }
    s = warp_sum_t(s);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(FULL, last, o));
    if (phase == 12) {
        double bs = block_sum_w(s, shd);
        if (lane == 0) si[warp] = last;
        __syncthreads();
        if (tid == 0) {
            int m = -1;
            for (int w = 0; w < SB_WARPS; w++) m = max(m, si[w]);
            S->wsum[g] = bs;
            S->wlast[g] = m;
        }
        return;
    }
    // Phase 13, the block holding the pick: the warp holding it walks its
    // span 32 tokens at a time.
    double total = 0.0, pre = 0.0;
    for (int b = 0; b < G; b++) {
        if (b == g) pre = total;
        total += S->wsum[b];
    }
    double rr = P.u * total - pre;
    if (lane == 0) { shd[warp] = s; si[warp] = last; }
    __syncthreads();
    double wpre = 0.0;
    int owner = -1;
    for (int w = 0; w < SB_WARPS; w++) {
        if (owner < 0 && shd[w] > 0.0 && rr >= wpre && rr < wpre + shd[w]) owner = w;
        if (owner < 0) wpre += shd[w];
    }
    if (owner < 0) {
        // Rounding between the block's and its warps' sums: its last kept.
        if (tid == 0) {
            int m = -1;
            for (int w = 0; w < SB_WARPS; w++) m = max(m, si[w]);
            ids[r] = m;
        }
        return;
    }
    if (warp != owner) return;
    rr -= wpre;
    unsigned ek1 = ek, ep = ep0;
    int pick = last;
    for (int t0 = wb; t0 < we; t0 += 32) {
        int i = t0 + lane;
        bool ok = i < we;
        float l = ok ? x[i] : -TL_INF;
        double w = tile_kept(l, ok, R, ek1, ep, lt) ? exp((double)__fmul_rn(__fsub_rn(l, M), inv_t)) : 0.0;
        double inc = w;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            double y = __shfl_up_sync(FULL, inc, o);
            if (lane >= o) inc += y;
        }
        unsigned hit = __ballot_sync(FULL, w > 0.0 && inc > rr);
        if (hit) { pick = t0 + __ffs(hit) - 1; break; }
        rr -= __shfl_sync(FULL, inc, 31);
    }
    if (lane == 0) ids[r] = pick;
}

