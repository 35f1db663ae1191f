/* MATLAB-exact 1-D bicubic passes on uint8 images (rlfn/bicubic_native.py builds and loads
 * this file; rlfn/bicubic.py says what MATLAB does).
 *
 * One pass resizes the rows of an (n_in, m) uint8 matrix to (n_out, m) (output rows i0..i1-1
 * of them: threads take bands of rows): output row i is
 * sum_p w[i][p] * in[idx[i][p]], accumulated in double in tap order (acc = w0*x0, then
 * acc = acc + wp*xp: compiled with -ffp-contract=off, so no fused multiply-add changes a
 * rounding), then rounded half away from zero and saturated to uint8: the float64 loop MATLAB
 * runs, bit for bit. The loop over a row's m values is what the compiler vectorises.
 *
 * The output is written transposed, as (m / k, n_out, k) with k values per pixel: an image
 * (H, W, k) resized along H comes out as (W, H', k), so the width pass is again a pass over
 * rows, and its transposed output is (H', W', k), the resized image.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int rlfn_bicubic_pass(const uint8_t *in, int64_t n_in, int64_t m, int64_t k, uint8_t *out,
                      int64_t n_out, const double *w, const int64_t *idx, int64_t taps,
                      int64_t i0, int64_t i1)
{
    if (n_in < 1 || m < 1 || k < 1 || m % k || n_out < 1 || taps < 1 || i0 < 0 || i1 > n_out
        || i0 >= i1)
        return 1;
    double *acc = (double *)malloc((size_t)m * sizeof(double));
    uint8_t *row = (uint8_t *)malloc((size_t)m);
    if (!acc || !row) {
        free(acc);
        free(row);
        return 2;
    }
    const int64_t cols = m / k;
    for (int64_t i = i0; i < i1; i++) {
        const double *wi = w + i * taps;
        const int64_t *ii = idx + i * taps;
        for (int64_t p = 0; p < taps; p++) {
            if (ii[p] < 0 || ii[p] >= n_in) {
                free(acc);
                free(row);
                return 3;
            }
        }
        const uint8_t *r = in + ii[0] * m;
        const double w0 = wi[0];
        for (int64_t j = 0; j < m; j++)
            acc[j] = w0 * (double)r[j];
        for (int64_t p = 1; p < taps; p++) {
            const uint8_t *rp = in + ii[p] * m;
            const double wp = wi[p];
            for (int64_t j = 0; j < m; j++)
                acc[j] = acc[j] + wp * (double)rp[j];
        }
        for (int64_t j = 0; j < m; j++) {  /* MATLAB's double -> uint8 */
            double v = floor(acc[j] + 0.5);
            v = v < 0.0 ? 0.0 : v;
            v = v > 255.0 ? 255.0 : v;
            row[j] = (uint8_t)v;
        }
        if (k == 1) {
            for (int64_t c = 0; c < cols; c++)
                out[c * n_out + i] = row[c];
        } else {
            for (int64_t c = 0; c < cols; c++)
                memcpy(out + (c * n_out + i) * k, row + c * k, (size_t)k);
        }
    }
    free(acc);
    free(row);
    return 0;
}
