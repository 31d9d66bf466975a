/* C (M x N, float32, row-major) = op(A) @ op(B), accumulated in float32.
 *
 * Needs common.cl (A_T/B_T, LOAD_A/LOAD_B). The blocking is set by build macros:
 *   TM x TN x TK  the tile of C and the depth of K that a work-group stages in local
 *                 memory per step (A and B tiles, zero-padded at the edges, so any
 *                 M, N, K works);
 *   TX x TY       work-items per work-group;
 *   WM x WN       a register block: outputs one work-item accumulates at a time, WN
 *                 columns as WN / VW vectors of VW floats.
 * A work-item owns (TM / TY / WM) x (TN / TX / WN) register blocks of the tile. GPUs
 * want one block per work-item and many work-items (its sums stay in registers); a CPU
 * (PoCL) wants one work-item per group that walks its blocks, keeping their running
 * sums in a local-memory C tile (no work-item loops, registers reused per block).
 * op(A) = A^T when A is stored K x M, op(B) = B^T when B is stored N x K; the four
 * cases are four kernels (gemm_nn ... gemm_tt) sharing one inlined body.
 */
#ifndef TM
#define TM 64
#endif
#ifndef TN
#define TN 64
#endif
#ifndef TK
#define TK 16
#endif
#ifndef TX
#define TX 16
#endif
#ifndef TY
#define TY 16
#endif
#ifndef WM
#define WM 4
#endif
#ifndef WN
#define WN 4
#endif
#ifndef VW
#define VW 4
#endif
#define NT (TX * TY)
#define NV (WN / VW)
#define RM (TM / (TY * WM))
#define RN (TN / (TX * WN))
#if RM * TY * WM != TM || RN * TX * WN != TN || NV * VW != WN
#error "gemm.cl: TM must be a multiple of TY*WM, TN of TX*WN, WN of VW"
#endif
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FLOATV CAT(float, VW)
#define VSTOREV CAT(vstore, VW)
#if RM * RN == 1
#define CS_SIZE 1
#define ACC(rm, rn, i, v) acc[i][v]
#else
#define CS_SIZE (TM * TN / VW)
#define ACC(rm, rn, i, v) Cs[(((rm) * TY + ty) * WM + (i)) * (TN / VW) + ((rn) * TX + tx) * NV + (v)]
#endif

inline void gemm_body(const int M, const int N, const int K,
                      __global const A_T *restrict A, __global const B_T *restrict B,
                      __global float *restrict C, __local float *restrict As,
                      __local FLOATV *restrict Bs, __local FLOATV *restrict Cs, const int ta,
                      const int tb)
{
    const int tx = get_local_id(0), ty = get_local_id(1);
    const int lid = ty * TX + tx;
    const int m0 = get_group_id(1) * TM, n0 = get_group_id(0) * TN;
    __local float *restrict Bf = (__local float *)Bs;
#if RM * RN == 1
    FLOATV acc[WM][NV];
#endif
    for (int rn = 0; rn < RN; rn++)
        for (int rm = 0; rm < RM; rm++)
#pragma unroll
            for (int i = 0; i < WM; i++)
#pragma unroll
                for (int v = 0; v < NV; v++)
                    ACC(rm, rn, i, v) = (FLOATV)(0.0f);

    for (int k0 = 0; k0 < K; k0 += TK) {
        /* A tile -> As[k][m] and B tile -> Bs[k][n], reading along each operand's
         * contiguous axis. */
        for (int e = lid; e < TM * TK; e += NT) {
            const int m = ta ? e % TM : e / TK, k = ta ? e / TM : e % TK;
            const int gm = m0 + m, gk = k0 + k;
            float x = 0.0f;
            if (gm < M && gk < K)
                x = LOAD_A(A, ta ? (size_t)gk * M + gm : (size_t)gm * K + gk);
            As[k * TM + m] = x;
        }
        for (int e = lid; e < TN * TK; e += NT) {
            const int n = tb ? e / TK : e % TN, k = tb ? e % TK : e / TN;
            const int gn = n0 + n, gk = k0 + k;
            float x = 0.0f;
            if (gn < N && gk < K)
                x = LOAD_B(B, tb ? (size_t)gn * K + gk : (size_t)gk * N + gn);
            Bf[k * TN + n] = x;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int rn = 0; rn < RN; rn++) {
            const int nv = (rn * TX + tx) * NV; /* first vector column of the block */
            if (n0 + nv * VW >= N)
                break; /* blocks wholly past the edge are skipped (a CPU walks many) */
            for (int rm = 0; rm < RM; rm++) {
                const int mm = (rm * TY + ty) * WM; /* first row of the block */
                if (m0 + mm >= M)
                    break;
                FLOATV c[WM][NV];
#pragma unroll
                for (int i = 0; i < WM; i++)
#pragma unroll
                    for (int v = 0; v < NV; v++)
                        c[i][v] = ACC(rm, rn, i, v);
                for (int k = 0; k < TK; k++) {
                    FLOATV b[NV];
#pragma unroll
                    for (int v = 0; v < NV; v++)
                        b[v] = Bs[k * (TN / VW) + nv + v];
#pragma unroll
                    for (int i = 0; i < WM; i++) {
                        const float a = As[k * TM + mm + i];
#pragma unroll
                        for (int v = 0; v < NV; v++)
                            c[i][v] += a * b[v];
                    }
                }
#pragma unroll
                for (int i = 0; i < WM; i++)
#pragma unroll
                    for (int v = 0; v < NV; v++)
                        ACC(rm, rn, i, v) = c[i][v];
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int rn = 0; rn < RN; rn++) {
        for (int rm = 0; rm < RM; rm++) {
#pragma unroll
            for (int i = 0; i < WM; i++) {
                const int gm = m0 + (rm * TY + ty) * WM + i;
#pragma unroll
                for (int v = 0; v < NV; v++) {
                    const int gn = n0 + ((rn * TX + tx) * NV + v) * VW;
                    if (gm < M && gn + VW <= N) {
                        VSTOREV(ACC(rm, rn, i, v), 0, C + (size_t)gm * N + gn);
                    } else if (gm < M) {
                        float t[VW];
                        VSTOREV(ACC(rm, rn, i, v), 0, t);
                        for (int j = 0; j < VW && gn + j < N; j++)
                            C[(size_t)gm * N + gn + j] = t[j];
                    }
                }
            }
        }
    }
}

#define GEMM_KERNEL(name, ta, tb)                                                        \
    __kernel __attribute__((reqd_work_group_size(TX, TY, 1)))                            \
    void name(const int M, const int N, const int K, __global const A_T *restrict A,     \
              __global const B_T *restrict B, __global float *restrict C)                \
    {                                                                                    \
        __local float As[TK * TM];                                                       \
        __local FLOATV Bs[TK * TN / VW];                                                 \
        __local FLOATV Cs[CS_SIZE];                                                      \
        gemm_body(M, N, K, A, B, C, As, Bs, Cs, ta, tb);                                 \
    }

GEMM_KERNEL(gemm_nn, 0, 0)
GEMM_KERNEL(gemm_nt, 0, 1)
GEMM_KERNEL(gemm_tn, 1, 0)
GEMM_KERNEL(gemm_tt, 1, 1)

/* y (1 x N) = x (1 x K) @ op(B): the M == 1 product of LLM decoding, bound by reading
 * B once. x is staged in local memory XT values at a time (zero-padded past K).
 * Work-group: GX work-items. */
#ifndef GX
#define GX 64
#endif
#ifndef CN
#define CN 4
#endif
#ifndef RB
#define RB 4
#endif
#ifndef UNR
#define UNR 4
#endif
#ifndef XT
#define XT 512
#endif

inline void stage_x(__local float *restrict xs, __global const A_T *restrict X, const int k0,
                    const int K)
{
    for (int e = get_local_id(0); e < XT; e += GX)
        xs[e] = k0 + e < K ? LOAD_A(X, k0 + e) : 0.0f;
    barrier(CLK_LOCAL_MEM_FENCE);
}

/* B stored K x N: work-item l of group g owns columns g*GX*S + c*GX + l, c < S <= CN. A GPU
 * wants GX wide and S small; a CPU one work-item sweeping a long stretch of each row
 * (S up to CN, chosen per call), so that B streams through memory in order. */
#if CN <= 16
#define FOR_STRIP(c, n) _Pragma("unroll") for (int c = 0; c < CN; c++) if (c < (n))
#else
#define FOR_STRIP(c, n) for (int c = 0; c < (n); c++)
#endif

__kernel __attribute__((reqd_work_group_size(GX, 1, 1)))
void gemv_n(const int N, const int K, const int S, __global const A_T *restrict X,
            __global const B_T *restrict B, __global float *restrict Y)
{
    __local float xs[XT];
    const int l = get_local_id(0);
    const int nb = get_group_id(0) * GX * S + l;
    const int cols = IMIN(S, (N - nb + GX - 1) / GX); /* my columns inside N (may be <= 0) */
    float acc[CN];
    FOR_STRIP(c, cols) acc[c] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += XT) {
        stage_x(xs, X, k0, K);
        const int kn = IMIN(XT, K - k0);
        int k = 0;
        for (; k + 4 <= kn; k += 4) { /* four rows of B per sweep over the accumulators */
            const float x0 = xs[k], x1 = xs[k + 1], x2 = xs[k + 2], x3 = xs[k + 3];
            __global const B_T *restrict r0 = B + (size_t)(k0 + k) * N;
            __global const B_T *restrict r1 = r0 + N, *restrict r2 = r1 + N, *restrict r3 = r2 + N;
            FOR_STRIP(c, cols) {
                const int j = nb + c * GX;
                acc[c] += x0 * LOAD_B(r0, j) + x1 * LOAD_B(r1, j) + x2 * LOAD_B(r2, j)
                    + x3 * LOAD_B(r3, j);
            }
        }
        for (; k < kn; k++) {
            const float xk = xs[k];
            __global const B_T *restrict row = B + (size_t)(k0 + k) * N;
            FOR_STRIP(c, cols) acc[c] += xk * LOAD_B(row, nb + c * GX);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    FOR_STRIP(c, cols) Y[nb + c * GX] = acc[c];
}

/* Vector reads of UNR consecutive B values as floatUNR. With PTR_VLOAD (CPU) they are
 * plain unaligned vector loads; PoCL calls out of line for vloadN. */
#define FLOATU CAT(float, UNR)
#define UINTU CAT(uint, UNR)
#define USHORTU CAT(ushort, UNR)
#ifdef PTR_VLOAD
typedef FLOATU __attribute__((aligned(4))) floatu_unaligned;
typedef USHORTU __attribute__((aligned(2))) ushortu_unaligned;
#define VLOAD_F32(p, i) (*(__global const floatu_unaligned *)((p) + (i)))
#define VLOAD_U16(p, i) (*(__global const ushortu_unaligned *)((p) + (i)))
#else
#define VLOAD_F32(p, i) CAT(vload, UNR)(0, (p) + (i))
#define VLOAD_U16(p, i) CAT(vload, UNR)(0, (p) + (i))
#endif
#if B_KIND == 0
#define LOADV_B(p, i) VLOAD_F32(p, i)
#elif B_KIND == 1 && defined(HALF_BITS)
inline FLOATU half_bits_to_floatu(const UINTU h)
{
    const FLOATU f = CAT(as_float, UNR)((h & 0x7fffu) << 13) * 0x1p112f;
    const UINTU special = (h & 0x7c00u) == 0x7c00u ? (UINTU)(0x7f800000u) : (UINTU)(0u);
    return CAT(as_float, UNR)(CAT(as_uint, UNR)(f) | special | ((h & 0x8000u) << 16));
}
#define LOADV_B(p, i) half_bits_to_floatu(CAT(convert_uint, UNR)(VLOAD_U16(p, i)))
#elif B_KIND == 1
#define LOADV_B(p, i) CAT(vload_half, UNR)(0, (p) + (i))
#else
#define LOADV_B(p, i) CAT(as_float, UNR)(CAT(convert_uint, UNR)(VLOAD_U16(p, i)) << 16)
#endif

/* B stored N x K: group g owns rows g*RB .. g*RB+RB-1, each a dot product with x. Its
 * GX work-items (a power of two) take interleaved vectors of UNR values along K and
 * meet in a local-memory reduction. */
__kernel __attribute__((reqd_work_group_size(GX, 1, 1)))
void gemv_t(const int N, const int K, __global const A_T *restrict X,
            __global const B_T *restrict B, __global float *restrict Y)
{
    __local FLOATU xs[XT / UNR];
    __local float red[GX * RB];
    __local float *restrict xf = (__local float *)xs;
    const int l = get_local_id(0);
    const int r0 = get_group_id(0) * RB;
    FLOATU acc[RB];
    float tail[RB];
    size_t row[RB];
#pragma unroll
    for (int r = 0; r < RB; r++) {
        row[r] = (size_t)IMIN(r0 + r, N - 1) * K;
        acc[r] = (FLOATU)(0.0f);
        tail[r] = 0.0f;
    }
    for (int k0 = 0; k0 < K; k0 += XT) {
        stage_x(xf, X, k0, K);
        if (k0 + XT <= K) {
            for (int kv = l; kv < XT / UNR; kv += GX) {
                const FLOATU xv = xs[kv];
#pragma unroll
                for (int r = 0; r < RB; r++)
                    acc[r] += xv * LOADV_B(B, row[r] + k0 + kv * UNR);
            }
        } else {
            for (int k = l; k < K - k0; k += GX) {
#pragma unroll
                for (int r = 0; r < RB; r++)
                    tail[r] += xf[k] * LOAD_B(B, row[r] + k0 + k);
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
#pragma unroll
    for (int r = 0; r < RB; r++) {
        const FLOATU v = acc[r];
        const float *t = (const float *)&v;
        float s = tail[r];
        for (int j = 0; j < UNR; j++)
            s += t[j];
        red[r * GX + l] = s;
    }
    for (int w = GX / 2; w > 0; w /= 2) {
        barrier(CLK_LOCAL_MEM_FENCE);
        if (l < w)
#pragma unroll
            for (int r = 0; r < RB; r++)
                red[r * GX + l] += red[r * GX + l + w];
    }
    if (l == 0)
#pragma unroll
        for (int r = 0; r < RB; r++)
            if (r0 + r < N)
                Y[r0 + r] = red[r * GX];
}
