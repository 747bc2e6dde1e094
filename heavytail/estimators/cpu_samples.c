/* heavytail's CPU kernels for the sample estimators: one call per step for everything the monitor follows on the
 * sampled coordinates (L tensors x S samples), and one after the optimizer's update.
 *
 * The torch code in heavytail/monitor.py (_stream_memory, _stream_shadow, _stream_noise, _stream_updates) and
 * heavytail/estimators/memory.py is the reference: on the CPU its ~250 small operations a step cost milliseconds of
 * dispatch for a few ten thousand entries, which these loops go through in microseconds. Every figure is computed
 * with the reference's operations in the reference's dtypes and order (float32 states, float64 arithmetic where the
 * reference promotes to it; no multiply-add is fused into an FMA in this file, the pragmas below), which makes
 * the states bitwise equal to the reference's. Two things differ at float64 rounding: the means and sums over S,
 * which torch adds pairwise, and the shadow ratios, whose square root torch's vectorised CPU code does not always
 * round correctly (this one does). tests/estimators/test_cpu_samples.py holds the two to that.
 */

/* Each multiply and add rounds on its own, as in torch's one-operation-at-a-time reference (the gradient pass in
 * cpu_kernels.c keeps its FMAs). */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

/* What ht_samples reads and updates; field for field the ctypes Structure in cpu_pass.py. Shapes: L tensors,
 * S samples, B shadow betas, W noise-ring slots. Row-major contiguous arrays. */
typedef struct {
    i64 L, S, B, W;
    const double *g;        /* (L, S) gradient samples; NaN where a tensor has no gradient */
    const double *valid;    /* (L,) 0/1: a gradient with every entry finite */
    int has_den;            /* the optimizer keeps a denominator (ratio, den and ratio_ok are read) */
    const double *ratio;    /* (L, S) r = |g| / (sqrt(v / bc) + eps) at the real denominator */
    const double *den;      /* (L, S) v at the sampled coordinates */
    const double *bc;       /* (L,) bias corrections: v_hat = v / bc */
    const double *ratio_ok; /* (L,) 0/1 */
    double threshold;       /* r^2 over it: a large-gradient event (and a spike) */
    float inflation2;       /* an episode ends at v_hat <= inflation2 * level */
    float *level[2], *age[2], *active[2]; /* denominator-memory states (L, S): real denominator, first shadow */
    double *memory_sum;     /* (2, L, 3): episodes started, ended, steps of the ended ones */
    float *events;          /* (2, L, S) out: 0/1, coordinates whose episode started this step */
    const double *betas;    /* (B,) shadow beta2s */
    const double *bias;     /* (B, L) 1 - beta^t, clamped at 1e-30 */
    float *shadow_v;        /* (B, L, S) */
    double *shadow_t, *shadow_sum; /* (B, L) */
    double *shadow_max;     /* (B, L, 2): ratio max, steps */
    float *noise_mean;      /* (L, S) EMA of g */
    double *noise_seen;     /* (L,) */
    float *ring;            /* (L, S, W) temporal deviations */
    uint8_t *ring_valid;    /* (L, W) bool */
    i64 slot;               /* the ring slot this step writes */
    float noise_beta;
    double q;               /* the ratio quantile to report (0.99) */
    double *quantile;       /* (L,) out */
    double shadow_warmup;   /* a shadow's figures count from its shadow_warmup-th gradient on (at least 1) */
} HtSamples;

/* torch.nan_to_num(x): NaN to 0, +-Inf to the largest finite value; selects only, so loops stay vectorised. */
static inline double nan_to_num(double x) {
    x = x == x ? x : 0.0;
    x = x > 1.7976931348623157e308 ? 1.7976931348623157e308 : x;
    return x < -1.7976931348623157e308 ? -1.7976931348623157e308 : x;
}

static inline float nan_to_num_f(float x) {
    x = x == x ? x : 0.0f;
    x = x > 3.4028234663852886e38f ? 3.4028234663852886e38f : x;
    return x < -3.4028234663852886e38f ? -3.4028234663852886e38f : x;
}

static inline double maximum(double a, double b) { /* torch.maximum: NaN if either is NaN */
    return (isnan(a) || isnan(b)) ? NAN : (a > b ? a : b);
}

/* memory.update for one row: advance open episodes with this step's v_hat, end those back under inflation2 times
 * their pre-event level, open new ones at large ratios. valid is the row's validity (0/1). The sums are of
 * integers (float64, exact in any order), so the loop is vectorised with them as reductions. */
static void memory_row(i64 S, const double *ratio, const double *v_hat, float valid, float inflation2,
                       double threshold, float *level, float *age, float *active, float *events, double *sums) {
    double started = 0.0, ended = 0.0, ended_steps = 0.0;
#pragma omp simd reduction(+ : started, ended, ended_steps)
    for (i64 j = 0; j < S; j++) {
        double r = ratio[j], vh = v_hat[j];
        float ok = (r * 0 + vh * 0 == 0.0) ? valid : 0.0f;
        float ongoing = active[j] * ok;
        float a = age[j] + ongoing;
        float lv = level[j];
        float ending = ongoing * ((vh <= (double)(inflation2 * lv)) ? 1.0f : 0.0f);
        ended_steps += (double)(ending * a);
        float act = active[j] - ending;
        float large = (r * r > threshold ? 1.0f : 0.0f) * (vh > 0.0 ? 1.0f : 0.0f);
        float ev = ok * (1.0f - act) * large;
        float fresh = (float)((vh * 0 == 0.0) ? vh : 0.0); /* nan_to_num(v_hat, 0, 0, 0), then float32 */
        level[j] = ev == 1.0f ? fresh : lv;
        float reset = ev > ending ? ev : ending;
        age[j] = a * (1.0f - reset);
        active[j] = act + ev;
        events[j] = ev;
        started += (double)ev;
        ended += (double)ending;
    }
    sums[0] += started;
    sums[1] += ended;
    sums[2] += ended_steps;
}

static void swap(double *a, double *b) { double t = *a; *a = *b; *b = t; }

/* x[k] after x is ordered descending (NaN-free input); x is reordered so that x[0..k) >= x[k] >= x[k+1..n). */
static double select_desc(double *x, i64 n, i64 k) {
    i64 lo = 0, hi = n - 1;
    while (lo < hi) {
        i64 mid = lo + (hi - lo) / 2;
        if (x[mid] > x[lo]) swap(x + mid, x + lo);
        if (x[hi] > x[lo]) swap(x + hi, x + lo);
        if (x[mid] > x[hi]) swap(x + mid, x + hi); /* x[lo] >= x[hi] >= x[mid]: x[hi] is the pivot */
        double pivot = x[hi];
        i64 i = lo;
        for (i64 j = lo; j < hi; j++)
            if (x[j] > pivot) swap(x + i++, x + j);
        swap(x + i, x + hi);
        if (i == k) return x[k];
        if (i < k) lo = i + 1;
        else hi = i - 1;
    }
    return x[k];
}

#define FEW 32 /* up to this many order statistics are kept by insertion, in one pass without a copy */

/* The m largest of x (NaN as -Inf), descending, into top; m <= FEW. */
static void top_few(const double *x, i64 S, i64 m, double *top) {
    for (i64 i = 0; i < m; i++) top[i] = -INFINITY;
    for (i64 j = 0; j < S; j++) {
        double v = x[j];
        if (!(v > top[m - 1])) continue; /* almost every entry: one compare (NaN fails it too) */
        i64 i = m - 1;
        while (i > 0 && top[i - 1] < v) { top[i] = top[i - 1]; i--; }
        top[i] = v;
    }
}

/* monitor._upper_quantile for one row: torch.nanquantile(x, q) with linear interpolation, NaN ignored. */
static double upper_quantile(const double *x, i64 S, double q, double *scratch) {
    i64 n = 0;
    for (i64 j = 0; j < S; j++) n += x[j] == x[j];
    if (n == 0) return NAN;
    i64 k = (i64)floor((1.0 - q) * (double)(S - 1)) + 2;
    if (k > S) k = S;
    double rank = (double)(n - 1) * (1.0 - q);
    i64 lo = (i64)floor(rank), hi;
    if (lo > k - 1) lo = k - 1;
    hi = lo + 1 > k - 1 ? k - 1 : lo + 1;
    double frac = rank - (double)lo, a, b;
    if (hi < FEW) {
        double top[FEW];
        top_few(x, S, hi + 1, top);
        a = top[lo];
        b = top[hi];
    } else {
        for (i64 j = 0; j < S; j++) scratch[j] = x[j] == x[j] ? x[j] : -INFINITY;
        a = select_desc(scratch, S, lo);
        b = a;
        if (hi > lo) { /* the largest of what is below position lo */
            b = scratch[lo + 1];
            for (i64 j = lo + 2; j < S; j++) b = scratch[j] > b ? scratch[j] : b;
        }
    }
    return frac == 0.0 ? a : a + (b - a) * frac;
}

/* One step of the sample estimators: the real denominator's memory episodes and ratio quantile, the shadow
 * denominators with their ratio figures and memory episodes, the temporal-noise EMA and ring. Returns -1 (before
 * touching any state) when its scratch memory cannot be had. */
int ht_samples(const HtSamples *a) {
    const i64 L = a->L, S = a->S, B = a->B, W = a->W;
    double *scratch = (double *)malloc((size_t)(3 * S) * sizeof(double));
    if (!scratch) return -1;
    double *r0 = scratch, *vh0 = scratch + S, *tmp = scratch + 2 * S;
    const double threshold = a->threshold;
    for (i64 l = 0; l < L; l++) {
        const double *g = a->g + l * S;
        const double valid = a->valid[l];
        if (a->has_den) {
            const double *den = a->den + l * S;
            const double bc = a->bc[l];
            for (i64 j = 0; j < S; j++) vh0[j] = den[j] / bc;
            memory_row(S, a->ratio + l * S, vh0, (float)a->ratio_ok[l], a->inflation2, threshold,
                       a->level[0] + l * S, a->age[0] + l * S, a->active[0] + l * S, a->events + l * S,
                       a->memory_sum + l * 3);
            a->quantile[l] = upper_quantile(a->ratio + l * S, S, a->q, tmp);
        } else {
            a->quantile[l] = NAN;
        }
        /* Shadow denominators: r against v_{t-1}, then v updated with g_t where the tensor had a gradient. */
        for (i64 b = 0; b < B; b++) {
            const i64 bl = b * L + l;
            float *v = a->shadow_v + bl * S;
            const double beta = a->betas[b], one_minus = 1.0 - beta, bias = a->bias[bl];
            const int ok = valid != 0.0 && a->shadow_t[bl] >= a->shadow_warmup, update = valid != 0.0;
            double over = 0.0, nans = 0.0, rmax = -INFINITY;
#pragma omp simd reduction(+ : over, nans) reduction(max : rmax)
            for (i64 j = 0; j < S; j++) {
                double gj = nan_to_num(g[j]), vj = (double)v[j];
                double vh = vj / bias;
                double r = fabs(gj) / (sqrt(vh) + 1e-8) * (v[j] > 0.0f ? 1.0 : 0.0);
                over += r * r > threshold ? 1.0 : 0.0;
                nans += r != r ? 1.0 : 0.0;
                rmax = r > rmax ? r : rmax;
                r0[j] = r; /* the first shadow's, for its memory episodes below */
                vh0[j] = vh;
                float fresh = (float)(beta * vj + one_minus * (gj * gj));
                v[j] = update ? fresh : v[j];
            }
            if (nans > 0.0) rmax = NAN; /* torch's amax: NaN if any entry is */
            a->shadow_sum[bl] += ok ? over / (double)S : 0.0;
            a->shadow_max[bl * 2] = maximum(a->shadow_max[bl * 2], ok ? rmax : 0.0);
            a->shadow_max[bl * 2 + 1] += ok;
            if (b == 0)
                memory_row(S, r0, vh0, (float)ok, a->inflation2, threshold, a->level[1] + l * S,
                           a->age[1] + l * S, a->active[1] + l * S, a->events + (L + l) * S,
                           a->memory_sum + (L + l) * 3);
            a->shadow_t[bl] += valid;
        }
        /* Temporal noise: the deviation from the EMA into the ring (once the EMA has a value), then the EMA. */
        float *mean = a->noise_mean + l * S, *ring = a->ring + l * S * W;
        const int seen = a->noise_seen[l] > 0.0, update = valid != 0.0;
        const float push = (update && seen) ? 1.0f : 0.0f;
        const i64 slot = a->slot % W;
        const float beta = seen ? a->noise_beta : 0.0f, one_minus = 1.0f - beta;
        for (i64 j = 0; j < S; j++) {
            float m = mean[j];
            ring[j * W + slot] = nan_to_num_f((float)(g[j] - (double)m)) * push;
            float fresh = (float)((double)(beta * m) + (double)one_minus * nan_to_num(g[j]));
            mean[j] = update ? fresh : m;
        }
        a->ring_valid[l * W + slot] = push != 0.0f;
        a->noise_seen[l] += valid;
    }
    free(scratch);
    return 0;
}

/* After the optimizer's update, per tensor: the RMS of the update over the RMS of the gradient, and at the
 * coordinates where a denominator-memory episode started, the sum of |update| / |g| and their count.
 * before/after: parameter samples (L, S); grad: gradient samples; events[f]: (L, S) 0/1 of the real denominator
 * (f = 0) and the first shadow (f = 1), NULL when absent; upd (L, ucols) accumulators, col = {rms_ratio,
 * rms_steps, event_ratio_adam, events_adam, event_ratio_shadow, events_shadow}. */
int ht_updates(i64 L, i64 S, const double *before, const double *after, const double *grad, const double *valid,
               const float *const *events, double *upd, i64 ucols, const i64 *col) {
    for (i64 l = 0; l < L; l++) {
        const double *p0 = before + l * S, *p1 = after + l * S, *gl = grad + l * S;
        double *u = upd + l * ucols;
        double gg = 0.0, dd = 0.0;
        for (i64 j = 0; j < S; j++) {
            double d = fabs(p1[j] - p0[j]), g = fabs(gl[j]);
            gg += g * g;
            dd += d * d;
        }
        double g_rms = sqrt(gg / (double)S), ratio = sqrt(dd / (double)S) / g_rms;
        int ok = valid[l] != 0.0 && g_rms > 0.0 && isfinite(ratio);
        u[col[0]] += ok ? ratio : 0.0;
        u[col[1]] += ok;
        for (int f = 0; f < 2; f++) {
            if (!events[f]) continue;
            const float *ev = events[f] + l * S;
            double hits = 0.0, sum = 0.0;
            for (i64 j = 0; j < S; j++) {
                double d = fabs(p1[j] - p0[j]), g = fabs(gl[j]);
                double usable = (g > 0.0 && d * 0 == 0.0) ? 1.0 : 0.0;
                double hit = (double)ev[j] * usable;
                double rj = (isfinite(d) ? d : 0.0) / (g > 1e-30 ? g : 1e-30); /* nan_to_num(d) / clamp_min(g) */
                sum += hit * rj;
                hits += hit;
            }
            u[col[2 + 2 * f]] += sum;
            u[col[3 + 2 * f]] += hits;
        }
    }
    return 0;
}
