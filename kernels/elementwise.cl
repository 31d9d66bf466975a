/* c = a + b and c = a - b, element by element over n values, written as float32.
 * Needs common.cl (A_T/B_T, LOAD_A/LOAD_B); a and b may differ in element type.
 * Each work-item handles EW consecutive elements: 1 on a GPU, a long run on a CPU,
 * where the run becomes one vectorised loop. */
#ifndef EW
#define EW 1
#endif

#define EW_KERNEL(name, op)                                                              \
    __kernel void name(const long n, __global const A_T *restrict a,                     \
                       __global const B_T *restrict b, __global float *restrict c)       \
    {                                                                                    \
        const long i0 = (long)get_global_id(0) * EW;                                     \
        const long end = i0 + EW < n ? i0 + EW : n;                                      \
        for (long i = i0; i < end; i++)                                                  \
            c[i] = LOAD_A(a, i) op LOAD_B(b, i);                                         \
    }

EW_KERNEL(ew_add, +)
EW_KERNEL(ew_sub, -)
