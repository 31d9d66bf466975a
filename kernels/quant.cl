/* Products with a weight kept as ggml's q8_0 / q4_0 blocks (32 values sharing one float16
 * scale d; 34 and 18 bytes a block), laid out as `lines` rows of blocks along the
 * contracted axis:
 *
 *     y[i, j] = sum_k op(a)[i, k] * w[j, k]      (w dequantised on the fly)
 *
 * op(a)[i, k] = a[i * a_row + k * a_col]: the strides read a stored or transposed.
 * One work item per output; the scale is read once per block, so a block costs 32
 * multiply-adds and one multiply. q8_0: the codes are signed bytes; q4_0: byte i holds
 * value i in its low nibble and value i + 16 in its high one, both offset by 8.
 */

inline float block_scale(__global const uchar *block)
{
    return half_bits_to_float((uint)block[0] | ((uint)block[1] << 8));
}

__kernel void q8_0_product(const int m, const int n, const int k, const int a_row, const int a_col,
                           __global const A_T *a, __global const uchar *w, __global float *y)
{
    const int j = get_global_id(0), i = get_global_id(1);
    if (i >= m || j >= n)
        return;
    const int blocks = k / 32;
    __global const uchar *line = w + (size_t)j * blocks * 34;
    float acc = 0.0f;
    for (int b = 0; b < blocks; ++b) {
        __global const uchar *block = line + b * 34;
        __global const char *codes = (__global const char *)(block + 2);
        float sum = 0.0f;
        for (int t = 0; t < 32; ++t)
            sum += LOAD_A(a, i * a_row + (b * 32 + t) * a_col) * (float)codes[t];
        acc += block_scale(block) * sum;
    }
    y[(size_t)i * n + j] = acc;
}

__kernel void q4_0_product(const int m, const int n, const int k, const int a_row, const int a_col,
                           __global const A_T *a, __global const uchar *w, __global float *y)
{
    const int j = get_global_id(0), i = get_global_id(1);
    if (i >= m || j >= n)
        return;
    const int blocks = k / 32;
    __global const uchar *line = w + (size_t)j * blocks * 18;
    float acc = 0.0f;
    for (int b = 0; b < blocks; ++b) {
        __global const uchar *block = line + b * 18;
        const int base = b * 32;
        float sum = 0.0f;
        for (int t = 0; t < 16; ++t) {
            const uint byte = block[2 + t];
            sum += LOAD_A(a, i * a_row + (base + t) * a_col) * (float)((int)(byte & 15u) - 8);
            sum += LOAD_A(a, i * a_row + (base + t + 16) * a_col) * (float)((int)(byte >> 4) - 8);
        }
        acc += block_scale(block) * sum;
    }
    y[(size_t)i * n + j] = acc;
}

#if A_KIND == 0
/* The common case, a float32 op(a) stored row by row: blocks of a and of codes in 8-wide
 * vectors, which a CPU runtime turns into SIMD (the strided kernels above it cannot).
 * 8 wide, not 16: PoCL loads only half of a float16 vector. The codes go through private
 * memory first: they start 2 bytes into a block, and a vector load from global memory may
 * be made as if it were aligned. */
inline float sum8(const float8 s)
{
    const float4 t = s.lo + s.hi;
    return (t.x + t.y) + (t.z + t.w);
}

__kernel void q8_0_rows(const int m, const int n, const int k, __global const float *a,
                        __global const uchar *w, __global float *y)
{
    const int j = get_global_id(0), i = get_global_id(1);
    if (i >= m || j >= n)
        return;
    const int blocks = k / 32;
    __global const uchar *line = w + (size_t)j * blocks * 34;
    __global const float *row = a + (size_t)i * k;
    float acc = 0.0f;
    for (int b = 0; b < blocks; ++b) {
        __global const uchar *block = line + b * 34;
        char codes[32];
        for (int t = 0; t < 32; ++t)
            codes[t] = (char)block[2 + t];
        __global const float *x = row + b * 32;
        float8 s = vload8(0, x) * convert_float8(vload8(0, codes));
        s += vload8(1, x) * convert_float8(vload8(1, codes));
        s += vload8(2, x) * convert_float8(vload8(2, codes));
        s += vload8(3, x) * convert_float8(vload8(3, codes));
        acc += block_scale(block) * sum8(s);
    }
    y[(size_t)i * n + j] = acc;
}

__kernel void q4_0_rows(const int m, const int n, const int k, __global const float *a,
                        __global const uchar *w, __global float *y)
{
    const int j = get_global_id(0), i = get_global_id(1);
    if (i >= m || j >= n)
        return;
    const int blocks = k / 32;
    __global const uchar *line = w + (size_t)j * blocks * 18;
    __global const float *row = a + (size_t)i * k;
    float acc = 0.0f;
    for (int b = 0; b < blocks; ++b) {
        __global const uchar *block = line + b * 18;
        uchar bytes[16];
        for (int t = 0; t < 16; ++t)
            bytes[t] = block[2 + t];
        const uchar8 q0 = vload8(0, bytes), q1 = vload8(1, bytes);
        __global const float *x = row + b * 32;
        float8 s = vload8(0, x) * (convert_float8(q0 & (uchar8)15) - 8.0f);
        s += vload8(1, x) * (convert_float8(q1 & (uchar8)15) - 8.0f);
        s += vload8(2, x) * (convert_float8(q0 >> (uchar8)4) - 8.0f);
        s += vload8(3, x) * (convert_float8(q1 >> (uchar8)4) - 8.0f);
        acc += block_scale(block) * sum8(s);
    }
    y[(size_t)i * n + j] = acc;
}
#endif
