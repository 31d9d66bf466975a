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
