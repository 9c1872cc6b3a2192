/* Trilinear samples of a cubic volume on central slices, and their backward pass.
 *
 * Included twice by slice_kernel.c, with REAL = float and double and FN() naming
 * each function for its type. The volume is vol[z][y][x] with side d; slice n is
 * the plane through `center` spanned by the rows p[0:3] and p[3:6] of
 * planes[6 n : 6 n + 6] (index units), and its sample j is at
 * (kx p[0:3] + ky p[3:6] + center) with (kx, ky) = freqs[2 j : 2 j + 2], as
 * (x, y, z). Corners outside the grid read zero, as grid_sample's zero padding.
 * Each call handles slices n0 .. n1 - 1, so that callers split the work over
 * threads; the backward pass adds to its own grad_vol, which callers sum.
 */

/* floor(x) as an integer, without a libm call (x86-64's baseline has no rounding instruction). */
static inline long FN(floor_index)(REAL x)
{
    const long i = (long)x;
    return i - (x < (REAL)i);
}

static inline REAL FN(value_at)(const REAL *vol, long d, long ix, long iy, long iz)
{
    if (ix < 0 || iy < 0 || iz < 0 || ix >= d || iy >= d || iz >= d)
        return 0;
    return vol[(iz * d + iy) * d + ix];
}

/* The eight corner values of the cell holding (x, y, z), v[4 dz + 2 dy + dx]. */
static inline void FN(corners)(const REAL *vol, long d, long ix, long iy, long iz, REAL v[8])
{
    if (ix >= 0 && iy >= 0 && iz >= 0 && ix < d - 1 && iy < d - 1 && iz < d - 1) {
        const REAL *c = vol + (iz * d + iy) * d + ix;
        const long sy = d, sz = d * d;
        v[0] = c[0];
        v[1] = c[1];
        v[2] = c[sy];
        v[3] = c[sy + 1];
        v[4] = c[sz];
        v[5] = c[sz + 1];
        v[6] = c[sz + sy];
        v[7] = c[sz + sy + 1];
        return;
    }
    for (int k = 0; k < 8; ++k)
        v[k] = FN(value_at)(vol, d, ix + (k & 1), iy + ((k >> 1) & 1), iz + (k >> 2));
}

void FN(slice_forward)(const REAL *vol, long d, const REAL *planes, const REAL *freqs, long m,
                       REAL center, REAL *out, long n0, long n1)
{
    for (long n = n0; n < n1; ++n) {
        const REAL *p = planes + 6 * n;
        REAL *o = out + m * n;
        for (long j = 0; j < m; ++j) {
            const REAL kx = freqs[2 * j], ky = freqs[2 * j + 1];
            const REAL x = kx * p[0] + ky * p[3] + center;
            const REAL y = kx * p[1] + ky * p[4] + center;
            const REAL z = kx * p[2] + ky * p[5] + center;
            const long ix = FN(floor_index)(x), iy = FN(floor_index)(y), iz = FN(floor_index)(z);
            const REAL fx = x - (REAL)ix, fy = y - (REAL)iy, fz = z - (REAL)iz;
            REAL v[8];
            FN(corners)(vol, d, ix, iy, iz, v);
            const REAL a = v[0] + fx * (v[1] - v[0]), b = v[2] + fx * (v[3] - v[2]);
            const REAL c = v[4] + fx * (v[5] - v[4]), e = v[6] + fx * (v[7] - v[6]);
            const REAL lo = a + fy * (b - a), hi = c + fy * (e - c);
            o[j] = lo + fz * (hi - lo);
        }
    }
}

static inline void FN(add_at)(REAL *grad, long d, long ix, long iy, long iz, REAL w)
{
    if (ix < 0 || iy < 0 || iz < 0 || ix >= d || iy >= d || iz >= d)
        return;
    grad[(iz * d + iy) * d + ix] += w;
}

/* grad_vol (d^3, added to) and grad_planes (6 per slice, overwritten) may each be NULL. */
void FN(slice_backward)(const REAL *vol, long d, const REAL *planes, const REAL *freqs, long m,
                        REAL center, const REAL *grad_out, REAL *grad_vol, REAL *grad_planes,
                        long n0, long n1)
{
    for (long n = n0; n < n1; ++n) {
        const REAL *p = planes + 6 * n;
        const REAL *g_row = grad_out + m * n;
        double gp[6] = {0, 0, 0, 0, 0, 0};
        for (long j = 0; j < m; ++j) {
            const REAL g = g_row[j];
            if (g == 0)  /* e.g. the heads that lost the winner-takes-all */
                continue;
            const REAL kx = freqs[2 * j], ky = freqs[2 * j + 1];
            const REAL x = kx * p[0] + ky * p[3] + center;
            const REAL y = kx * p[1] + ky * p[4] + center;
            const REAL z = kx * p[2] + ky * p[5] + center;
            const long ix = FN(floor_index)(x), iy = FN(floor_index)(y), iz = FN(floor_index)(z);
            const REAL fx = x - (REAL)ix, fy = y - (REAL)iy, fz = z - (REAL)iz;
            if (grad_vol) {
                const REAL gx1 = g * fx, gx0 = g - gx1;
                const REAL w00 = (1 - fy) * (1 - fz), w10 = fy * (1 - fz);
                const REAL w01 = (1 - fy) * fz, w11 = fy * fz;
                if (ix >= 0 && iy >= 0 && iz >= 0 && ix < d - 1 && iy < d - 1 && iz < d - 1) {
                    REAL *c = grad_vol + (iz * d + iy) * d + ix;
                    const long sy = d, sz = d * d;
                    c[0] += gx0 * w00;
                    c[1] += gx1 * w00;
                    c[sy] += gx0 * w10;
                    c[sy + 1] += gx1 * w10;
                    c[sz] += gx0 * w01;
                    c[sz + 1] += gx1 * w01;
                    c[sz + sy] += gx0 * w11;
                    c[sz + sy + 1] += gx1 * w11;
                } else {
                    FN(add_at)(grad_vol, d, ix, iy, iz, gx0 * w00);
                    FN(add_at)(grad_vol, d, ix + 1, iy, iz, gx1 * w00);
                    FN(add_at)(grad_vol, d, ix, iy + 1, iz, gx0 * w10);
                    FN(add_at)(grad_vol, d, ix + 1, iy + 1, iz, gx1 * w10);
                    FN(add_at)(grad_vol, d, ix, iy, iz + 1, gx0 * w01);
                    FN(add_at)(grad_vol, d, ix + 1, iy, iz + 1, gx1 * w01);
                    FN(add_at)(grad_vol, d, ix, iy + 1, iz + 1, gx0 * w11);
                    FN(add_at)(grad_vol, d, ix + 1, iy + 1, iz + 1, gx1 * w11);
                }
            }
            if (grad_planes) {
                REAL v[8];
                FN(corners)(vol, d, ix, iy, iz, v);
                /* derivatives of the trilinear interpolant along x, y and z */
                const REAL dx00 = v[1] - v[0], dx10 = v[3] - v[2], dx01 = v[5] - v[4], dx11 = v[7] - v[6];
                const REAL dvdx = (1 - fz) * (dx00 + fy * (dx10 - dx00)) + fz * (dx01 + fy * (dx11 - dx01));
                const REAL a = v[0] + fx * dx00, b = v[2] + fx * dx10;
                const REAL c = v[4] + fx * dx01, e = v[6] + fx * dx11;
                const REAL dvdy = (1 - fz) * (b - a) + fz * (e - c);
                const REAL dvdz = (a + fy * (b - a)) - (c + fy * (e - c));
                const REAL gx = g * dvdx, gy = g * dvdy, gz = -g * dvdz;
                gp[0] += kx * gx;
                gp[1] += kx * gy;
                gp[2] += kx * gz;
                gp[3] += ky * gx;
                gp[4] += ky * gy;
                gp[5] += ky * gz;
            }
        }
        if (grad_planes)
            for (int k = 0; k < 6; ++k)
                grad_planes[6 * n + k] = (REAL)gp[k];
    }
}
