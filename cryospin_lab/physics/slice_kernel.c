/* The slicer's C kernels in single and double precision (see slice_kernel.h);
 * built on first use by cryospin_lab/physics/slice_kernel.py. */
#include <math.h>

#define REAL float
#define FN(name) name##_f32
#include "slice_kernel.h"
#undef REAL
#undef FN

#define REAL double
#define FN(name) name##_f64
#include "slice_kernel.h"
#undef REAL
#undef FN
