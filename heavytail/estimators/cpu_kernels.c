/* heavytail's CPU kernels: the gradient pass, sample gathers and checkpoint top-k, over tables of tensor pointers.
 *
 * Compiled at first use by heavytail/estimators/cpu_pass.py (cc -O3 -march=native, OpenMP when the compiler has
 * it) and called through ctypes, so one call serves every monitored tensor whatever their number: the CPU twin
 * of the Triton pass. Each gradient entry is read once, straight from the parameter's .grad, and everything is
 * computed from it while it is in a register: the float64 power sums S1..S4 (fourth powers of small gradients
 * underflow float32), max |g|, the non-finite count, and with a denominator the max of r = |g| / (sqrt(v / bc) +
 * eps) and #{r > sqrt(threshold)}, exactly as the torch reference computes them in float64 but without a square
 * root and a division per entry: a bound clears almost every entry (see pass_item). Results match the reference
 * (heavytail/estimators/gradient_pass.py): sums to float64 rounding, the ratio max and spike count exactly.
 *
 * dtype codes: 0 float32, 1 float64, 2 bfloat16, 3 float16. A NULL pointer is a tensor that is absent.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

enum { HT_F32 = 0, HT_F64 = 1, HT_BF16 = 2, HT_F16 = 3 };
enum { COUNT, S1, S2, S3, S4, ABSMAX, NONFINITE, RATIO_MAX, RATIO_SPIKES, NSTAT };

#define TILE 512            /* entries converted into an L1-resident buffer at a time */
#define WORK (1 << 16)      /* entries per parallel work item: large tensors spread over threads */
#define SEED_SAMPLES 64     /* entries whose exact ratio seeds a work item's running max */

int ht_abi_version(void) { return 3; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        float f = (float)man * (1.0f / 16777216.0f); /* subnormal (or zero): man * 2^-24 */
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void load_f64(const void *p, int dt, i64 off, int n, double *out) {
    switch (dt) {
    case HT_F32: { const float *q = (const float *)p + off; for (int i = 0; i < n; i++) out[i] = q[i]; break; }
    case HT_F64: memcpy(out, (const double *)p + off, (size_t)n * sizeof(double)); break;
    case HT_BF16: { const uint16_t *q = (const uint16_t *)p + off; for (int i = 0; i < n; i++) out[i] = bf16_to_f32(q[i]); break; }
    default: { const uint16_t *q = (const uint16_t *)p + off; for (int i = 0; i < n; i++) out[i] = f16_to_f32(q[i]); break; }
    }
}

static inline double load1(const void *p, int dt, i64 i) {
    switch (dt) {
    case HT_F32: return ((const float *)p)[i];
    case HT_F64: return ((const double *)p)[i];
    case HT_BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
    default: return f16_to_f32(((const uint16_t *)p)[i]);
    }
}

static inline int isfinite_d(double x) { return x - x == 0.0; }


/* Partials of one work item: entries [start, start + len) of tensor l into part[NSTAT], and the count of NaN
 * denominators into *nan_ratio.
 *
 * The ratio needs a square root and a division per entry, which cost more than everything else here, so it is not
 * computed for every entry. Its two figures only care about large r: the max, and the count of r > threshold.
 * Since (sqrt(v^) + eps)^2 >= v^ + eps^2, an entry with g^2 <= c^2 (v^ + eps^2) has r <= c: with c the smaller of
 * the running max R and the threshold, one multiply-add and a compare per entry clear almost every entry, and only
 * the few that may beat R or cross the threshold (records, spikes, near-ties) get r in float64, exactly as the
 * torch reference computes it. The max and the spike count are therefore exact, at the cost of a read of v. */
/* SUMS_LOOP: the power sums and max |x| of X(i), vectorised in float64 (float32 squares of small gradients go
 * subnormal, which costs ~100 cycles an operation on x86). */
#define SUMS_LOOP(X)                                                                                           \
    _Pragma("omp simd reduction(+ : t1, t2, t3, t4) reduction(max : tmax)")                                    \
    for (int i = 0; i < n; i++) {                                                                              \
        double x = (X), x2 = x * x;                                                                            \
        t1 += x; t2 += x2; t3 += x2 * x; t4 += x2 * x2;                                                        \
        double a = fabs(x);                                                                                    \
        tmax = a > tmax ? a : tmax;                                                                            \
    }

/* log2 of a positive float32 from its bits: (bits / 2^23 - 127) <= log2 y <= that + 0.0861 for normal y (the
 * mantissa's linear approximation); for a subnormal it overestimates. Thresholds on such bit patterns turn the
 * ratio prefilter into integer compares, which never touch the float unit (no subnormal penalties) and take 16
 * lanes at a time. */
#define LOG2_SLACK 0.09
static int32_t bits_threshold(double log2_value) {
    double t = floor((log2_value + 127.0) * 8388608.0) - 2.0;
    if (!(t > -2147483648.0)) return INT32_MIN; /* -inf and NaN: everything passes */
    if (t > 2147483647.0) return INT32_MAX;
    return (int32_t)t;
}

/* Whether a float32 entry may fail the ratio test, by integer compares on the bit patterns (see above).
 * Not flagging an entry must imply x^2 <= k1 v + k0, which holds if x^2 <= k1 v or x^2 <= k0: with B(.) the bit
 * patterns, x^2 > k1 v is only possible if 2 (B(x) + slack) > log2 k1 + B(v), i.e. B(x) - B(v) / 2 > (log2 k1 -
 * 2 slack) / 2 (B(v) >> 1 rounds down: more flags), and not for x = 0; a subnormal v (overestimated) counts as 0;
 * x^2 > k0 needs B(x) + slack > log2 k0 / 2. NaN denominators are flagged too. */
typedef struct { int32_t t1, t0; } BitsTest;

static BitsTest bits_test(double k1, double k0) {
    BitsTest b = {bits_threshold((log2(k1) - 2.0 * LOG2_SLACK) / 2.0 - 63.5),
                  bits_threshold(log2(k0) / 2.0 - LOG2_SLACK)};
    return b;
}

static inline int32_t bits_flag(int32_t gbits, int32_t vbits, BitsTest b) {
    int32_t bx = gbits & 0x7fffffff, bv = vbits & 0x7fffffff;
    int32_t above_v = (bx - (bv >> 1) > b.t1) | (bv < 0x00800000);
    return ((bx != 0) & above_v & (bx > b.t0)) | (bv > 0x7f800000);
}

static int32_t prefilter_bits(const int32_t *gi, const int32_t *vi, int n, BitsTest b) {
    int32_t flags = 0;
#pragma omp simd reduction(+ : flags)
    for (int i = 0; i < n; i++) flags += bits_flag(gi[i], vi[i], b);
    return flags;
}

/* The same test in half the operations, valid when eps^2 >= 5e-38 / bc (any eps that AdamW users set; the caller
 * checks): it drops the x^2 > k0 half (more flags, never fewer) and the per-entry subnormal-v and NaN-v terms. A
 * subnormal v would be overestimated, but an entry it clears has |x| < 1.1e-19 sqrt(k1), so x^2 < k1 1.2e-38 <= k0
 * under that condition, and the entry cannot beat c either way; v = 0 means r = 0 by definition; a NaN v is caught
 * by the tile's largest bit pattern. */
static int32_t prefilter_bits_lean(const int32_t *gi, const int32_t *vi, int n, BitsTest b) {
    int32_t flags = 0, vmax = 0;
#pragma omp simd reduction(+ : flags) reduction(max : vmax)
    for (int i = 0; i < n; i++) {
        int32_t bx = gi[i] & 0x7fffffff, bv = vi[i] & 0x7fffffff;
        flags += bx - (bv >> 1) > b.t1;
        vmax = bv > vmax ? bv : vmax;
    }
    return flags + (vmax > 0x7f800000);
}

/* One entry's float64 look: the reference's r = |x| / (sqrt(v / bc) + eps) (0 where v = 0) where the bound
 * g^2 <= k1 v + k0 cannot clear it, folded into the running max and the spike count; a NaN v is counted (the
 * reference's r is NaN there, and so is its max). */
static inline void exact_ratio(double x, double v, double k1, double k0, double inv_bc, double eps,
                               double threshold, double *rmax, double *spikes, double *rnan) {
    if (v != v) { *rnan += 1; return; }
    if (!(x * x > v * k1 + k0)) return;
    double r = v > 0 ? fabs(x) / (sqrt(v * inv_bc) + eps) : 0.0;
    if (r > *rmax) *rmax = r;
    *spikes += r > threshold ? 1.0 : 0.0;
}

static void pass_item(const void *g, int gdt, const void *v, int vdt, i64 start, i64 len, double inv_bc,
                      double eps, double threshold, double *part, double *nan_ratio) {
    double xb[TILE], vb[TILE];
    double s1 = 0, s2 = 0, s3 = 0, s4 = 0, amax = 0, nf = 0, spikes = 0, rnan = 0, rmax = 0;
    const double t2max = threshold * threshold, e2 = eps * eps;
    double bits_c2 = -1.0; /* the bit test's thresholds, recomputed only when the running max moves */
    BitsTest bits = {0, 0};
    const int lean = e2 >= 5e-38 * inv_bc; /* see prefilter_bits_lean */
    if (v != NULL) {
        /* Seed the running max with the exact ratio of a strided sample of the item's finite entries, so the
         * prefilter clears most of the first tile too (with a max of 0 it would pass every non-zero entry). */
        i64 stride = len / SEED_SAMPLES > 0 ? len / SEED_SAMPLES : 1;
        for (i64 i = start; i < start + len; i += stride) {
            double x = load1(g, gdt, i), vi = load1(v, vdt, i);
            if (!isfinite_d(x) || !(vi > 0) || !isfinite_d(vi)) continue;
            double r = fabs(x) / (sqrt(vi * inv_bc) + eps);
            if (r > rmax) rmax = r;
        }
        if (rmax > threshold) rmax = threshold; /* the seed's own spikes are counted by the pass below */
    }
    for (i64 off = start; off < start + len; off += TILE) {
        int n = (int)((start + len - off) < TILE ? (start + len - off) : TILE);
        /* float32 tensors are read in place; other dtypes go through the float64 tile buffers */
        const float *gf = gdt == HT_F32 ? (const float *)g + off : NULL;
        if (gf == NULL) load_f64(g, gdt, off, n, xb);
        double t1 = 0, t2 = 0, t3 = 0, t4 = 0, tmax = 0;
        if (gf) { SUMS_LOOP(gf[i]) } else { SUMS_LOOP(xb[i]) }
        int slow = !isfinite_d(t2) || !isfinite_d(t1);
        if (slow) {
            /* a non-finite entry (or an overflowing float64 square): count them, read them as 0, and redo the tile */
            if (gf) for (int i = 0; i < n; i++) xb[i] = gf[i];
            double tnf = 0;
            t1 = t2 = t3 = t4 = tmax = 0;
            for (int i = 0; i < n; i++) {
                double x = xb[i];
                if (!isfinite_d(x)) { tnf += 1; x = 0.0; xb[i] = 0.0; }
                double x2 = x * x;
                t1 += x; t2 += x2; t3 += x2 * x; t4 += x2 * x2;
                if (fabs(x) > tmax) tmax = fabs(x);
            }
            nf += tnf;
        }
        s1 += t1; s2 += t2; s3 += t3; s4 += t4;
        if (tmax > amax) amax = tmax;
        if (v == NULL) continue;

        /* The ratio. r^2 may exceed c^2 only where g^2 > c^2 (v^ + eps^2) = k1 v + k0; the margin absorbs the
         * rounding of the float64 test. */
        const double c2 = (rmax * rmax < t2max ? rmax * rmax : t2max) * (1.0 - 1e-9);
        const double k1 = c2 * inv_bc, k0 = c2 * e2;
        const float *vf = vdt == HT_F32 ? (const float *)v + off : NULL;
        if (gf && vf && !slow) {
            /* float32 g and v: the bit test clears the tile, or picks the few entries worth a float64 look (read
             * one by one: converting a whole tile would pay the subnormal penalty on every tiny v) */
            if (c2 != bits_c2) { bits = bits_test(k1, k0); bits_c2 = c2; }
            const int32_t *gi = (const int32_t *)(const void *)gf, *vi = (const int32_t *)(const void *)vf;
            if ((lean ? prefilter_bits_lean(gi, vi, n, bits) : prefilter_bits(gi, vi, n, bits)) == 0) continue;
            /* Then r <= c itself, vectorised in float64 with the square root (the bound above drops the cross
             * term 2 eps sqrt(v^), so ratios crowding just under the running max, as all r ~ 1 when v^ ~ g^2, pass
             * it): the tile is done unless an entry may really beat the max or cross the threshold. */
            const double c = sqrt(c2) * (1.0 - 1e-12);
            double need = 0;
#pragma omp simd reduction(+ : need)
            for (int i = 0; i < n; i++) {
                double x = gf[i], vv = vf[i];
                need += ((vv > 0) & (fabs(x) > c * (sqrt(vv * inv_bc) + eps))) | (vv != vv) ? 1.0 : 0.0;
            }
            if (need == 0) continue;
            for (int i = 0; i < n; i++) {
                if (!bits_flag(gi[i], vi[i], bits)) continue;
                exact_ratio(gf[i], vf[i], k1, k0, inv_bc, eps, threshold, &rmax, &spikes, &rnan);
            }
            continue;
        }
        /* other dtypes, and tiles that had non-finite entries: the float64 look at every entry */
        if (gf && !slow) for (int i = 0; i < n; i++) xb[i] = gf[i];
        if (vf) for (int i = 0; i < n; i++) vb[i] = vf[i];
        else load_f64(v, vdt, off, n, vb);
        for (int i = 0; i < n; i++) exact_ratio(xb[i], vb[i], k1, k0, inv_bc, eps, threshold, &rmax, &spikes, &rnan);
    }
    part[COUNT] = (double)len - nf;
    part[S1] = s1; part[S2] = s2; part[S3] = s3; part[S4] = s4;
    part[ABSMAX] = amax;
    part[NONFINITE] = nf;
    part[RATIO_MAX] = rmax;
    part[RATIO_SPIKES] = spikes;
    *nan_ratio = rnan;
}

/* The parallel work items over L tensors: WORK-entry pieces of every present, non-empty tensor, as the tensor
 * (owner) and first entry of each. Returns their count, or -1 when out of memory (nothing to free then). */
static i64 work_items(i64 L, const void *const *t, const i64 *numel, i64 **owner_out, i64 **first_out) {
    i64 items = 0;
    for (i64 l = 0; l < L; l++)
        if (t[l] != NULL && numel[l] > 0) items += (numel[l] + WORK - 1) / WORK;
    i64 *owner = (i64 *)malloc((size_t)(items > 0 ? items : 1) * sizeof(i64));
    i64 *first = (i64 *)malloc((size_t)(items > 0 ? items : 1) * sizeof(i64));
    if (!owner || !first) { free(owner); free(first); return -1; }
    i64 w = 0;
    for (i64 l = 0; l < L; l++) {
        if (t[l] == NULL || numel[l] <= 0) continue;
        for (i64 s = 0; s < numel[l]; s += WORK) { owner[w] = l; first[w] = s; w++; }
    }
    *owner_out = owner;
    *first_out = first;
    return items;
}

/* The gradient pass over L tensors (see gradient_pass.py for the contract). stats: (L, NSTAT); gs, rs, vs:
 * (L, S) samples of the cleaned g, of r (float64 formula) and of v. has_den = 0: no tensor has a denominator
 * (RATIO_MAX NaN, RATIO_SPIKES 0). With has_den, a tensor without v or without g gets NaN ratio figures. */
int ht_pass(i64 L, const void *const *g, const int *gdt, const i64 *numel, const void *const *v, const int *vdt,
            const double *inv_bc, const double *eps, int has_den, double threshold, i64 S,
            const i64 *sample_index, double *stats, double *gs, double *rs, double *vs, int nthreads) {
    const double nan = NAN;
    i64 *owner, *first;
    i64 items = work_items(L, g, numel, &owner, &first);
    double *part = items >= 0 ? (double *)malloc((size_t)(items > 0 ? items : 1) * (NSTAT + 1) * sizeof(double))
                              : NULL;
    if (!part) { if (items >= 0) { free(owner); free(first); } return -1; }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && items > 1)
    for (i64 i = 0; i < items; i++) {
        i64 l = owner[i], s = first[i];
        i64 len = numel[l] - s < WORK ? numel[l] - s : WORK;
        const void *vl = has_den ? v[l] : NULL;
        pass_item(g[l], gdt[l], vl, vl ? vdt[l] : 0, s, len, vl ? inv_bc[l] : 1.0, vl ? eps[l] : 0.0, threshold,
                  part + i * (NSTAT + 1), part + i * (NSTAT + 1) + NSTAT);
    }
    double *nanr = (double *)calloc((size_t)(L > 0 ? L : 1), sizeof(double));
    if (!nanr) { free(owner); free(first); free(part); return -1; }
    memset(stats, 0, (size_t)L * NSTAT * sizeof(double));
    for (i64 i = 0; i < items; i++) {
        double *row = stats + owner[i] * NSTAT, *p = part + i * (NSTAT + 1);
        row[COUNT] += p[COUNT]; row[S1] += p[S1]; row[S2] += p[S2]; row[S3] += p[S3]; row[S4] += p[S4];
        row[NONFINITE] += p[NONFINITE]; row[RATIO_SPIKES] += p[RATIO_SPIKES];
        if (p[ABSMAX] > row[ABSMAX]) row[ABSMAX] = p[ABSMAX];
        if (p[RATIO_MAX] > row[RATIO_MAX]) row[RATIO_MAX] = p[RATIO_MAX];
        nanr[owner[i]] += p[NSTAT];
    }
    for (i64 l = 0; l < L; l++) {
        double *row = stats + l * NSTAT;
        int present = g[l] != NULL; /* an empty tensor is present, with no entries */
        int with_v = has_den && present && v[l] != NULL;
        if (!has_den) row[RATIO_MAX] = nan;
        else if (!with_v) { row[RATIO_MAX] = nan; row[RATIO_SPIKES] = nan; }
        else if (nanr[l] > 0) row[RATIO_MAX] = nan; /* a NaN denominator poisons the max, as torch's amax does */
        const i64 *idx = sample_index + l * S;
        double *grow = gs + l * S, *rrow = rs + l * S, *vrow = vs + l * S;
        double ib = with_v ? inv_bc[l] : 1.0, e = with_v ? eps[l] : 0.0;
        for (i64 s = 0; s < S; s++) {
            if (!present) { grow[s] = nan; rrow[s] = nan; vrow[s] = nan; continue; }
            if (idx[s] < 0 || idx[s] >= numel[l]) { /* no entry there (an empty tensor): as the reference */
                grow[s] = nan; vrow[s] = nan; rrow[s] = with_v ? 0.0 : nan;
                continue;
            }
            double x = load1(g[l], gdt[l], idx[s]);
            x = isfinite_d(x) ? x : 0.0;
            grow[s] = x;
            if (!with_v) { rrow[s] = nan; vrow[s] = nan; continue; }
            double vi = load1(v[l], vdt[l], idx[s]);
            vrow[s] = vi;
            rrow[s] = vi > 0 ? fabs(x) / (sqrt(vi * ib) + e) : 0.0;
        }
    }
    free(nanr);
    free(owner);
    free(first);
    free(part);
    return 0;
}

/* Each tensor's sum of squares in float64, out[L] (0 for an absent or empty tensor; Inf or NaN where the
 * tensor has such entries, as its torch norm would): the pre-clip norms in one read of each gradient, split
 * into work items across threads like the pass. */
int ht_sumsq(i64 L, const void *const *t, const int *dt, const i64 *numel, double *out, int nthreads) {
    i64 *owner, *first;
    i64 items = work_items(L, t, numel, &owner, &first);
    double *part = items >= 0 ? (double *)malloc((size_t)(items > 0 ? items : 1) * sizeof(double)) : NULL;
    if (!part) { if (items >= 0) { free(owner); free(first); } return -1; }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && items > 1)
    for (i64 i = 0; i < items; i++) {
        i64 l = owner[i], s = first[i];
        int n = (int)(numel[l] - s < WORK ? numel[l] - s : WORK);
        double acc = 0, xb[TILE];
        if (dt[l] == HT_F32) {
            const float *q = (const float *)t[l] + s;
#pragma omp simd reduction(+ : acc)
            for (int k = 0; k < n; k++) { double x = q[k]; acc += x * x; }
        } else {
            for (int off = 0; off < n; off += TILE) {
                int m = n - off < TILE ? n - off : TILE;
                load_f64(t[l], dt[l], s + off, m, xb);
#pragma omp simd reduction(+ : acc)
                for (int k = 0; k < m; k++) acc += xb[k] * xb[k];
            }
        }
        part[i] = acc;
    }
    for (i64 l = 0; l < L; l++) out[l] = 0.0;
    for (i64 i = 0; i < items; i++) out[owner[i]] += part[i];
    free(owner);
    free(first);
    free(part);
    return 0;
}

/* Each tensor's entries at its sampled coordinates: out (L, S) in float64, `fill` where a tensor is absent (and
 * NaN at an index outside the tensor, which the monitor's samples never are). */
int ht_gather(i64 L, const void *const *t, const int *dt, const i64 *numel, i64 S, const i64 *sample_index,
              double fill, double *out) {
    for (i64 l = 0; l < L; l++) {
        const i64 *idx = sample_index + l * S;
        double *row = out + l * S;
        if (t[l] == NULL || numel[l] <= 0) {
            for (i64 s = 0; s < S; s++) row[s] = fill;
            continue;
        }
        /* The entries are scattered over the tensor: each read is a cache and TLB miss. Prefetching the row's
         * entries first lets the misses overlap instead of waiting for each load in turn. */
        size_t width = dt[l] == HT_F64 ? 8 : dt[l] == HT_F32 ? 4 : 2;
        for (i64 s = 0; s < S; s++)
            if (idx[s] >= 0 && idx[s] < numel[l]) __builtin_prefetch((const char *)t[l] + (size_t)idx[s] * width);
        for (i64 s = 0; s < S; s++)
            row[s] = idx[s] >= 0 && idx[s] < numel[l] ? load1(t[l], dt[l], idx[s]) : NAN;
    }
    return 0;
}

/* |x| as float32 bits: for finite non-zero values they order like the magnitudes; 0 marks a missing entry. */
static inline uint32_t abs_key(double x) {
    float a = (float)fabs(x);
    uint32_t u;
    memcpy(&u, &a, 4);
    return (u >= 0x7f800000u) ? 0u : u; /* Inf and NaN are missing (bad data); so is 0 (an atom) */
}

static uint32_t key_at(const void *p, int dt, i64 i) {
    if (dt == HT_F32) {
        uint32_t u;
        memcpy(&u, (const float *)p + i, 4);
        u &= 0x7fffffffu;
        return u >= 0x7f800000u ? 0u : u;
    }
    return abs_key(load1(p, dt, i));
}

/* Descending radix sort of n keys (three 11-bit digits cover the 31 bits of a magnitude). */
static void sort_desc(uint32_t *keys, uint32_t *tmp, i64 n) {
    i64 count[2048];
    for (int shift = 0; shift < 33; shift += 11) {
        memset(count, 0, sizeof(count));
        for (i64 i = 0; i < n; i++) count[2047 - ((keys[i] >> shift) & 2047u)]++;
        i64 pos = 0;
        for (int b = 0; b < 2048; b++) { i64 c = count[b]; count[b] = pos; pos += c; }
        for (i64 i = 0; i < n; i++) tmp[count[2047 - ((keys[i] >> shift) & 2047u)]++] = keys[i];
        memcpy(keys, tmp, (size_t)n * sizeof(uint32_t));
    }
}

#define TOP_SMALL 65536 /* tensors up to this many entries are collected whole and sorted: one read */

/* The m[l] largest valid |x| of each tensor, descending, as float32 into out + offset[l] (zeros past the valid
 * count), and the valid count (finite, non-zero entries) into count[l]: an exact radix select. A tensor of up to
 * TOP_SMALL entries has its valid keys collected and sorted (one read). A larger one takes a histogram of the top
 * 16 bits of its keys (one read), then a second read that keeps every key of the bins above the boundary bin (all
 * in the top) and gathers the boundary bin's keys, which are sorted to fill the rest: two reads of the tensor, no
 * copy of it (what torch.topk does with a sort-sized workspace per tensor). */
int ht_top_abs(i64 L, const void *const *t, const int *dt, const i64 *numel, const i64 *m, const i64 *offset,
               float *out, i64 *count, int nthreads) {
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && L > 1)
    for (i64 l = 0; l < L; l++) {
        i64 want = m[l], n = numel[l];
        float *dst = out + offset[l];
        count[l] = 0;
        if (t[l] == NULL || n <= 0 || want <= 0) {
            if (want > 0) memset(dst, 0, (size_t)want * sizeof(float));
            continue;
        }
        const void *p = t[l];
        int d = dt[l];
        i64 got = 0;
        uint32_t *keys = NULL, *tmp = NULL;
        if (n <= TOP_SMALL) {
            keys = (uint32_t *)malloc((size_t)n * 2 * sizeof(uint32_t));
            if (!keys) { failed = 1; continue; }
            tmp = keys + n;
            for (i64 i = 0; i < n; i++) {
                uint32_t k = key_at(p, d, i);
                if (k) keys[got++] = k;
            }
            count[l] = got;
            sort_desc(keys, tmp, got);
        } else {
            i64 *hist = (i64 *)calloc(65536, sizeof(i64));
            if (!hist) { failed = 1; continue; }
            i64 zeros = 0;
            for (i64 i = 0; i < n; i++) {
                uint32_t k = key_at(p, d, i);
                if (k) hist[k >> 16]++;
                else zeros++;
            }
            i64 valid = n - zeros;
            count[l] = valid;
            i64 take = want < valid ? want : valid;
            /* b: the bin of the take-th largest key; `above` keys lie in the bins over it, all of them in the top */
            int b = 65535;
            i64 above = 0;
            while (b > 0 && above + hist[b] < take) above += hist[b--];
            i64 in_bin = hist[b];
            free(hist);
            i64 scratch = above > in_bin ? above : in_bin; /* sort_desc's buffer, for either sort */
            keys = (uint32_t *)malloc((size_t)(above + in_bin + scratch + 1) * sizeof(uint32_t));
            if (!keys) { failed = 1; continue; }
            uint32_t *bin = keys + above;
            tmp = bin + in_bin;
            i64 nbin = 0;
            for (i64 i = 0; i < n; i++) {
                uint32_t k = key_at(p, d, i);
                uint32_t hi = k >> 16;
                if (hi > (uint32_t)b) keys[got++] = k;
                else if (hi == (uint32_t)b && k) bin[nbin++] = k;
            }
            sort_desc(keys, tmp, got);
            sort_desc(bin, tmp, nbin); /* right after the keys above it: keys[0 .. got + nbin) is sorted */
            got += nbin;
        }
        for (i64 j = 0; j < got && j < want; j++) memcpy(dst + j, keys + j, 4);
        for (i64 j = got; j < want; j++) dst[j] = 0.0f;
        free(keys);
    }
    return failed ? -1 : 0;
}
