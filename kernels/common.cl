/* Element types of cmatrix operands, chosen at build time.
 *
 * A_KIND / B_KIND: 0 = float32, 1 = float16, 2 = bfloat16.
 * float16 is read with vload_half, so no cl_khr_fp16 is needed; bfloat16 is
 * stored as raw ushort bits and widened with a shift. Every kernel computes
 * and writes float32.
 *
 * With HALF_BITS, float16 is also read as ushort and widened by integer arithmetic
 * (exact, subnormals, inf and NaN included): on CPU OpenCL (PoCL) vload_half is an
 * out-of-line library call per element, while this inlines and vectorises.
 */
#ifndef A_KIND
#define A_KIND 0
#endif
#ifndef B_KIND
#define B_KIND 0
#endif

inline float half_bits_to_float(const uint h)
{
    /* Exponent and mantissa moved into float position and rescaled by 2^112 (exact,
     * subnormal halves included); inf/NaN get the all-ones exponent back. */
    const float f = as_float((h & 0x7fffu) << 13) * 0x1p112f;
    const uint special = (h & 0x7c00u) == 0x7c00u ? 0x7f800000u : 0u;
    return as_float(as_uint(f) | special | ((h & 0x8000u) << 16));
}

/* min() is an out-of-line call on some CPU runtimes (PoCL 3). */
#define IMIN(a, b) ((a) < (b) ? (a) : (b))

#if A_KIND == 0
#define A_T float
#define LOAD_A(p, i) ((p)[i])
#elif A_KIND == 1 && defined(HALF_BITS)
#define A_T ushort
#define LOAD_A(p, i) half_bits_to_float((p)[i])
#elif A_KIND == 1
#define A_T half
#define LOAD_A(p, i) vload_half((i), (p))
#else
#define A_T ushort
#define LOAD_A(p, i) as_float((uint)(p)[i] << 16)
#endif

#if B_KIND == 0
#define B_T float
#define LOAD_B(p, i) ((p)[i])
#elif B_KIND == 1 && defined(HALF_BITS)
#define B_T ushort
#define LOAD_B(p, i) half_bits_to_float((p)[i])
#elif B_KIND == 1
#define B_T half
#define LOAD_B(p, i) vload_half((i), (p))
#else
#define B_T ushort
#define LOAD_B(p, i) as_float((uint)(p)[i] << 16)
#endif
