/* Trilinear samples of a cubic volume on central slices, and their backward pass.
 *
 * Included twice by slice_kernel.c, with REAL = float and double and FN() naming
 * each function for its type. The volume is vol[z][y][x] of side d + 2: the
 * caller's d^3 volume with a border of zeros, so that every corner read stays
 * inside and the loops have no branches (the compiler then vectorises them with
 * gather instructions). Slice n is the plane through `center` spanned by the
 * rows p[0:3] and p[3:6] of planes[6 n : 6 n + 6] (index units of the unpadded
 * volume); its sample j is at kx p[0:3] + ky p[3:6] + center, (x, y, z), with
 * (kx, ky) = freqs[2 j : 2 j + 2]. Corners outside the d^3 grid read zero, as
 * grid_sample's zero padding. Each call handles slices n0 .. n1 - 1, so that
 * callers split the work over threads; the backward pass adds to its own
 * (padded) grad_vol, which callers sum and crop.
 */

static inline long FN(floor_index)(REAL x)
{
    const long i = (long)x;
    return i - (x < (REAL)i);
}

/* The padded index of the cell holding (x, y, z), its fractions, and whether any corner
 * lies inside the grid (1 or 0; a cell entirely outside reads the border's first cell). */
static inline long FN(cell)(REAL x, REAL y, REAL z, long d, REAL *fx, REAL *fy, REAL *fz, REAL *inside)
{
    long ix = FN(floor_index)(x), iy = FN(floor_index)(y), iz = FN(floor_index)(z);
    *fx = x - (REAL)ix;
    *fy = y - (REAL)iy;
    *fz = z - (REAL)iz;
    const int ok = ix >= -1 && iy >= -1 && iz >= -1 && ix < d && iy < d && iz < d;
    *inside = (REAL)ok;
    ix = ok ? ix : -1;
    iy = ok ? iy : -1;
    iz = ok ? iz : -1;
    const long s = d + 2;
    return ((iz + 1) * s + (iy + 1)) * s + (ix + 1);
}

void FN(slice_forward)(const REAL *restrict vol, long d, const REAL *restrict planes,
                       const REAL *restrict freqs, long m, REAL center, REAL *restrict out, long n0,
                       long n1)
{
    const long sy = d + 2, sz = (d + 2) * (d + 2);
    for (long n = n0; n < n1; ++n) {
        const REAL *p = planes + 6 * n;
        const REAL p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3], p4 = p[4], p5 = p[5];
        REAL *o = out + m * n;
        for (long j = 0; j < m; ++j) {
            const REAL kx = freqs[2 * j], ky = freqs[2 * j + 1];
            const REAL x = kx * p0 + ky * p3 + center, y = kx * p1 + ky * p4 + center;
            const REAL z = kx * p2 + ky * p5 + center;
            REAL fx, fy, fz, inside;
            const long c = FN(cell)(x, y, z, d, &fx, &fy, &fz, &inside);
            const REAL v0 = vol[c], v1 = vol[c + 1], v2 = vol[c + sy], v3 = vol[c + sy + 1];
            const REAL v4 = vol[c + sz], v5 = vol[c + sz + 1];
            const REAL v6 = vol[c + sz + sy], v7 = vol[c + sz + sy + 1];
            const REAL a = v0 + fx * (v1 - v0), b = v2 + fx * (v3 - v2);
            const REAL e = v4 + fx * (v5 - v4), f = v6 + fx * (v7 - v6);
            const REAL lo = a + fy * (b - a), hi = e + fy * (f - e);
            /* a NaN coordinate (a diverged pose) gives NaN, not an empty sample, so that it shows */
            const REAL nan_if_nan = (x == x && y == y && z == z) ? (REAL)0 : (REAL)NAN;
            o[j] = inside * (lo + fz * (hi - lo)) + nan_if_nan;
        }
    }
}

/* grad_vol ((d + 2)^3, added to) and grad_planes (6 per slice, overwritten) may each be NULL. */
void FN(slice_backward)(const REAL *restrict vol, long d, const REAL *restrict planes,
                        const REAL *restrict freqs, long m, REAL center,
                        const REAL *restrict grad_out, REAL *restrict grad_vol,
                        REAL *restrict grad_planes, long n0, long n1)
{
    const long sy = d + 2, sz = (d + 2) * (d + 2);
    for (long n = n0; n < n1; ++n) {
        const REAL *p = planes + 6 * n;
        const REAL p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3], p4 = p[4], p5 = p[5];
        const REAL *g_row = grad_out + m * n;
        if (grad_vol) {
            for (long j = 0; j < m; ++j) {
                if (g_row[j] == 0)  /* e.g. the heads that lost the winner-takes-all */
                    continue;
                const REAL kx = freqs[2 * j], ky = freqs[2 * j + 1];
                REAL fx, fy, fz, inside;
                const long c = FN(cell)(kx * p0 + ky * p3 + center, kx * p1 + ky * p4 + center,
                                        kx * p2 + ky * p5 + center, d, &fx, &fy, &fz, &inside);
                const REAL g = g_row[j] * inside, gx1 = g * fx, gx0 = g - gx1;
                const REAL w00 = (1 - fy) * (1 - fz), w10 = fy * (1 - fz);
                const REAL w01 = (1 - fy) * fz, w11 = fy * fz;
                REAL *q = grad_vol + c;
                q[0] += gx0 * w00;
                q[1] += gx1 * w00;
                q[sy] += gx0 * w10;
                q[sy + 1] += gx1 * w10;
                q[sz] += gx0 * w01;
                q[sz + 1] += gx1 * w01;
                q[sz + sy] += gx0 * w11;
                q[sz + sy + 1] += gx1 * w11;
            }
        }
        if (grad_planes) {
            REAL g0 = 0, g1 = 0, g2 = 0, g3 = 0, g4 = 0, g5 = 0;
            for (long j = 0; j < m; ++j) {
                const REAL kx = freqs[2 * j], ky = freqs[2 * j + 1];
                REAL fx, fy, fz, inside;
                const long c = FN(cell)(kx * p0 + ky * p3 + center, kx * p1 + ky * p4 + center,
                                        kx * p2 + ky * p5 + center, d, &fx, &fy, &fz, &inside);
                const REAL g = g_row[j] * inside;
                const REAL v0 = vol[c], v1 = vol[c + 1], v2 = vol[c + sy], v3 = vol[c + sy + 1];
                const REAL v4 = vol[c + sz], v5 = vol[c + sz + 1];
                const REAL v6 = vol[c + sz + sy], v7 = vol[c + sz + sy + 1];
                /* derivatives of the trilinear interpolant along x, y and z */
                const REAL dx00 = v1 - v0, dx10 = v3 - v2, dx01 = v5 - v4, dx11 = v7 - v6;
                const REAL dvdx = (1 - fz) * (dx00 + fy * (dx10 - dx00)) + fz * (dx01 + fy * (dx11 - dx01));
                const REAL a = v0 + fx * dx00, b = v2 + fx * dx10, e = v4 + fx * dx01, f = v6 + fx * dx11;
                const REAL dvdy = (1 - fz) * (b - a) + fz * (f - e);
                const REAL dvdz = (e + fy * (f - e)) - (a + fy * (b - a));
                const REAL gx = g * dvdx, gy = g * dvdy, gz = g * dvdz;
                g0 += kx * gx;
                g1 += kx * gy;
                g2 += kx * gz;
                g3 += ky * gx;
                g4 += ky * gy;
                g5 += ky * gz;
            }
            REAL *q = grad_planes + 6 * n;
            q[0] = g0;
            q[1] = g1;
            q[2] = g2;
            q[3] = g3;
            q[4] = g4;
            q[5] = g5;
        }
    }
}
