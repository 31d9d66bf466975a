/* Products with a weight kept as ggml's q8_0 / q4_0 blocks (32 values sharing one float16
 * scale d; 34 and 18 bytes a block), laid out as rows of blocks along the contracted axis:
 *
 *     y[i, j] = sum_k op(a)[i, k] * w[j, k]      (w dequantised as it is read)
 *
 * One work item per output. q8_0: the codes are signed bytes; q4_0: byte t holds value t
 * in its low nibble and value t + 16 in its high one, both offset by 8. Each kind declares
 * how one block meets 32 values of a; one macro makes the kernels of every kind.
 */

inline float block_scale(__global const uchar *block)
{
    return half_bits_to_float((uint)block[0] | ((uint)block[1] << 8));
}

/* --- any op(a): element (i, k) at a[i * a_row + k * a_col], of any A_KIND ----------------- */

inline float q8_0_strided(__global const uchar *block, __global const A_T *a, const int at, const int step)
{
    __global const char *codes = (__global const char *)(block + 2);
    float sum = 0.0f;
    for (int t = 0; t < 32; ++t)
        sum += LOAD_A(a, at + t * step) * (float)codes[t];
    return block_scale(block) * sum;
}

inline float q4_0_strided(__global const uchar *block, __global const A_T *a, const int at, const int step)
{
    float sum = 0.0f;
    for (int t = 0; t < 16; ++t) {
        const uint byte = block[2 + t];
        sum += LOAD_A(a, at + t * step) * (float)((int)(byte & 15u) - 8);
        sum += LOAD_A(a, at + (t + 16) * step) * (float)((int)(byte >> 4) - 8);
    }
    return block_scale(block) * sum;
}

#define STRIDED_KERNEL(KIND, BYTES)                                                               \
__kernel void KIND##_product(const int m, const int n, const int k, const int a_row,             \
                             const int a_col, __global const A_T *a, __global const uchar *w,   \
                             __global float *y)                                                  \
{                                                                                                \
    const int j = get_global_id(0), i = get_global_id(1);                                       \
    if (i >= m || j >= n)                                                                        \
        return;                                                                                  \
    __global const uchar *line = w + (size_t)j * (k / 32) * BYTES;                               \
    float acc = 0.0f;                                                                            \
    for (int b = 0; b < k / 32; ++b)                                                             \
        acc += KIND##_strided(line + b * BYTES, a, i * a_row + b * 32 * a_col, a_col);           \
    y[(size_t)i * n + j] = acc;                                                                  \
}

STRIDED_KERNEL(q8_0, 34)
STRIDED_KERNEL(q4_0, 18)

#if A_KIND == 0
/* --- the common case, a float32 op(a) stored row by row ------------------------------------
 * Blocks of a and of codes in 8-wide vectors, which a CPU runtime turns into SIMD. 8 wide,
 * not 16: PoCL loads only half of a float16 vector. The codes go through private memory:
 * they start 2 bytes into a block, and a vector load from global memory may be made as if
 * it were aligned. */

inline float sum8(const float8 s)
{
    const float4 t = s.lo + s.hi;
    return (t.x + t.y) + (t.z + t.w);
}

inline float q8_0_vector(__global const uchar *block, __global const float *x)
{
    char codes[32];
    for (int t = 0; t < 32; ++t)
        codes[t] = (char)block[2 + t];
    float8 s = vload8(0, x) * convert_float8(vload8(0, codes));
    s += vload8(1, x) * convert_float8(vload8(1, codes));
    s += vload8(2, x) * convert_float8(vload8(2, codes));
    s += vload8(3, x) * convert_float8(vload8(3, codes));
    return block_scale(block) * sum8(s);
}

inline float q4_0_vector(__global const uchar *block, __global const float *x)
{
    uchar bytes[16];
    for (int t = 0; t < 16; ++t)
        bytes[t] = block[2 + t];
    const uchar8 q0 = vload8(0, bytes), q1 = vload8(1, bytes);
    float8 s = vload8(0, x) * (convert_float8(q0 & (uchar8)15) - 8.0f);
    s += vload8(1, x) * (convert_float8(q1 & (uchar8)15) - 8.0f);
    s += vload8(2, x) * (convert_float8(q0 >> (uchar8)4) - 8.0f);
    s += vload8(3, x) * (convert_float8(q1 >> (uchar8)4) - 8.0f);
    return block_scale(block) * sum8(s);
}

#define ROWS_KERNEL(KIND, BYTES)                                                                  \
__kernel void KIND##_rows(const int m, const int n, const int k, __global const float *a,        \
                          __global const uchar *w, __global float *y)                            \
{                                                                                                \
    const int j = get_global_id(0), i = get_global_id(1);                                       \
    if (i >= m || j >= n)                                                                        \
        return;                                                                                  \
    __global const uchar *line = w + (size_t)j * (k / 32) * BYTES;                               \
    __global const float *row = a + (size_t)i * k;                                               \
    float acc = 0.0f;                                                                            \
    for (int b = 0; b < k / 32; ++b)                                                             \
        acc += KIND##_vector(line + b * BYTES, row + b * 32);                                    \
    y[(size_t)i * n + j] = acc;                                                                  \
}

ROWS_KERNEL(q8_0, 34)
ROWS_KERNEL(q4_0, 18)
#endif
