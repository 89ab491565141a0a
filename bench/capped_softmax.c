/* stabench's compiled CPU kernel: the soft-capped softmax cross-entropy of a chunk of logits, in place.
 *
 * Built on first use by bench/native.py (the system C compiler, -O3, the CPU's vector width), loaded with
 * ctypes, and checked against PyTorch before use. Plain C, no PyTorch headers; OpenMP over rows where the
 * compiler has it (PyTorch's own libgomp then runs the threads).
 *
 * For each row i of raw logits l (n x V, row-major, fp32) and cap c, with s = sigmoid(2l/c) and the capped
 * logits lt = c tanh(l/c) = 2c s - c:
 *   pass 1: s in place of l; Σ lt, Σ lt² and max |lt| (per row, summed in float as PyTorch sums a row); a row
 *           with a NaN logit ends here, its log Z and gradient NaN;
 *   pass 2: log Z = m + log Σ exp(lt - m), m the row's largest lt; with grad, exp(lt - m) s (1 - s) in place of
 *           s: the gradient of the cross-entropy with respect to l times Z e^-m / 4, one-hot term aside (the
 *           caller divides the row by Z e^-m, returned, and multiplies by 4 on the GEMMs' small sides;
 *           d lt / d l = 1 - tanh² = 4 s (1 - s)).
 * Each pass reads one row (32 KiB at V = 8192) from the first-level caches: the chunk crosses memory once
 * each way, where PyTorch's separate passes (the capped logits, the softmax, the slope) cross it for each.
 * The arithmetic is theirs: an exponential for σ and one for the softmax per logit.
 */
#include <math.h>
#include <stdint.h>

/* e^x, Cephes-style: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r (max relative error ~2e-7
 * against the exact value), times 2^n built in the exponent bits. Branch-free, so the compiler vectorizes it.
 * x is clamped to [-87.34, 87.34], e^x to about [2^-126, 2^126]: never a subnormal or an infinity (every
 * argument here but pass 1's is <= 0). x must not be NaN (pass 1 keeps NaN away). */
static inline float exp_poly(float x) {
    x = x < -87.33654f ? -87.33654f : x;
    x = x > 87.33654f ? 87.33654f : x;
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return p * two_n.f;
}

/* Rows [0, n) of l, in place (see above). y (n,) the targets; out:
 *   lse (n,): log Z of the capped logits;  norm (n,): Z e^-m, the sum the gradient's row is to be divided by;
 *   lt_y (n,): the target's capped logit;  s_y (n,): s at the target;
 *   stats (n, 3) or NULL: Σ lt, Σ lt², max |lt| per row.
 * grad: whether pass 2 writes the gradient. threads: OpenMP threads over rows (ignored where built without OpenMP). */
void stabench_capped_rows(float *l, int64_t n, int64_t V, const int64_t *y, float c, double *lse, double *norm,
                          double *lt_y, float *s_y, float *stats, int grad, int threads) {
    const float a = 2.0f * c, k = -2.0f / c;
    int64_t i;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i = 0; i < n; ++i) {
        float *row = l + i * V;
        float hi = 0.0f, lo = 1.0f, sum = 0.0f, sq = 0.0f;
        int64_t j;
#pragma omp simd reduction(max : hi) reduction(min : lo) reduction(+ : sum, sq)
        for (j = 0; j < V; ++j) {
            const float v = row[j];
            const int nan = v != v;
            const float e = exp_poly(k * (nan ? 0.0f : v));
            const float s = nan ? v : 1.0f / (1.0f + e);
            const float t = a * s - c;
            row[j] = s;
            hi = s > hi ? s : hi;
            lo = s < lo ? s : lo;
            sum += t;
            sq += t * t;
        }
        const float sy = row[y[i]];
        s_y[i] = sy;
        lt_y[i] = (double)a * sy - c;
        if (stats) {
            const float top = a * hi - c, bottom = a * lo - c;
            stats[3 * i] = sum;
            stats[3 * i + 1] = sq;
            stats[3 * i + 2] = sum != sum ? sum : (top > -bottom ? top : -bottom); /* NaN as PyTorch's max gives */
        }
        if (sum != sum) { /* a NaN logit (t is finite otherwise): NaN log Z and gradient, as PyTorch's passes give */
            lse[i] = sum;
            norm[i] = 1.0;
            if (grad)
                for (j = 0; j < V; ++j) row[j] = sum;
            continue;
        }
        const float m = a * hi - c; /* the row's largest capped logit */
        const float shift = -c - m;
        float z = 0.0f;
        if (grad) {
#pragma omp simd reduction(+ : z)
            for (j = 0; j < V; ++j) {
                const float s = row[j];
                const float e = exp_poly(a * s + shift);
                z += e;
                row[j] = e * s * (1.0f - s);
            }
        } else {
#pragma omp simd reduction(+ : z)
            for (j = 0; j < V; ++j) z += exp_poly(a * row[j] + shift);
        }
        lse[i] = (double)m + log((double)z);
        norm[i] = z;
    }
}
