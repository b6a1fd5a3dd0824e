/*
 * prunerecipe._native: fused CPU kernels for float32 magnitude pruning.
 *
 * Optional. The package builds it when a C compiler is at hand and falls back to pure
 * PyTorch (prunerecipe/fastprune.py) when it is not; both give the same masks, the same
 * tie split, the same counts. Plain C and pthreads: no torch headers, so it compiles in a
 * second, and no OpenMP runtime to clash with torch's.
 *
 * Keys: for a float32 w, (bits(w) & 0x7fffffff) read as an integer orders as |w| does
 * (NaN patterns above +inf, as torch.topk ranks NaN). Every function takes tensors as
 * (data pointer, entry count) pairs of contiguous float32 CPU memory; the caller keeps
 * the tensors alive. The GIL is released while the kernels run.
 *
 * scan(ptrs, sizes, threads, zero_below) -> (zeros, nonfinite)      one read pass
 * select(ptrs, sizes, k, threads, zero_below) -> (key, below, ties, zeros, nonfinite, splits): sample + one read pass
 * fold(ptrs, sizes, cuts, quotas, splits, threads, zero_below) -> zeros after: one read/write pass
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define HAVE_MMAP 1
#endif

#define KEY_MASK 0x7fffffffu
#define NONFINITE 0x7f800000u
#define MAX_THREADS 256
#define BLOCK 16 /* entries tested together; a block holding a candidate is revisited */

typedef struct {
    Py_ssize_t count;
    const uint32_t **ptr; /* float32 data as bits */
    int64_t *size;
    int64_t *start; /* start[i]: offset of piece i in the concatenation; start[count] = total */
} Pieces;

static void pieces_free(Pieces *p) {
    free(p->ptr);
    free(p->size);
    free(p->start);
    p->ptr = NULL;
    p->size = p->start = NULL;
}

static int pieces_parse(PyObject *ptrs, PyObject *sizes, Pieces *out) {
    memset(out, 0, sizeof(*out));
    PyObject *fp = PySequence_Fast(ptrs, "ptrs must be a sequence");
    if (!fp) return -1;
    PyObject *fs = PySequence_Fast(sizes, "sizes must be a sequence");
    if (!fs) {
        Py_DECREF(fp);
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fp);
    int ok = 0;
    if (n != PySequence_Fast_GET_SIZE(fs)) {
        PyErr_SetString(PyExc_ValueError, "ptrs and sizes differ in length");
        goto done;
    }
    out->count = n;
    out->ptr = malloc(sizeof(*out->ptr) * (size_t)(n + 1));
    out->size = malloc(sizeof(*out->size) * (size_t)(n + 1));
    out->start = malloc(sizeof(*out->start) * (size_t)(n + 1));
    if (!out->ptr || !out->size || !out->start) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        void *p = PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(fp, i));
        long long s = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fs, i));
        if (PyErr_Occurred()) goto done;
        if (s < 0 || (s > 0 && p == NULL)) {
            PyErr_SetString(PyExc_ValueError, "bad tensor pointer or size");
            goto done;
        }
        out->ptr[i] = (const uint32_t *)p;
        out->size[i] = s;
        out->start[i] = total;
        total += s;
    }
    out->start[n] = total;
    ok = 1;
done:
    Py_DECREF(fp);
    Py_DECREF(fs);
    if (!ok) pieces_free(out);
    return ok ? 0 : -1;
}

static Py_ssize_t piece_at(const Pieces *p, int64_t pos) { /* the piece holding global position pos */
    Py_ssize_t lo = 0, hi = p->count; /* start[lo] <= pos < start[hi] */
    while (hi - lo > 1) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (p->start[mid] <= pos) lo = mid;
        else hi = mid;
    }
    return lo;
}

/* Scratch of the select: mapped for the call and unmapped after, so its pages go back to the
 * system at once. From malloc, freed blocks can stay resident in the heap (glibc raises its
 * mmap threshold after a large free) and would sit under the masks built next. */
static void *scratch_alloc(size_t bytes) {
#ifdef HAVE_MMAP
    size_t total = bytes + 64;
    void *p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    *(size_t *)p = total;
    return (char *)p + 64;
#else
    return malloc(bytes);
#endif
}

static void scratch_free(void *q) {
    if (!q) return;
#ifdef HAVE_MMAP
    char *p = (char *)q - 64;
    munmap(p, *(size_t *)p);
#else
    free(q);
#endif
}

static int zero_below_ok(long long v) {
    if (v >= 0 && v <= (long long)KEY_MASK + 1) return 1;
    PyErr_SetString(PyExc_ValueError, "zero_below must be a key in [0, 2**31]");
    return 0;
}

/* ---- threads: each worker gets an equal share [a, b) of the concatenated entries ---- */

typedef void (*work_fn)(void *ctx, int tid, int64_t a, int64_t b);
typedef struct {
    work_fn fn;
    void *ctx;
    int tid;
    int64_t a, b;
} Job;

static void *job_main(void *arg) {
    Job *j = arg;
    j->fn(j->ctx, j->tid, j->a, j->b);
    return NULL;
}

static int clamp_threads(long threads, int64_t total) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    int64_t useful = total / (1 << 16) + 1; /* a thread per 64k entries at most */
    if (threads > useful) threads = (long)useful;
    return (int)threads;
}

/* torch's own OpenMP pool, when the process has one (GNU libgomp, or a runtime with its
 * GOMP_* entry points). After each parallel torch op its workers spin for a while (several
 * ms) waiting for more work; threads of our own would then share the cores with them and
 * run ~1.5x slower (measured: a fold pass 11-13 ms against 7.4 ms). Handing our work to that
 * pool is what torch's own parallel_for does. Looked up once, at the first parallel call. */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_fn)(void);
static gomp_parallel_fn gomp_parallel = NULL;
static omp_int_fn omp_thread_num = NULL, omp_team_size = NULL;
static int omp_looked_up = 0;

#if defined(__linux__) && !defined(PRUNERECIPE_NO_OPENMP_POOL)
#include <dlfcn.h>
static void omp_lookup(void) {
    void *p = dlsym(RTLD_DEFAULT, "GOMP_parallel"), *q = dlsym(RTLD_DEFAULT, "omp_get_thread_num");
    void *r = dlsym(RTLD_DEFAULT, "omp_get_num_threads");
    if (p && q && r) {
        memcpy(&gomp_parallel, &p, sizeof(p));
        memcpy(&omp_thread_num, &q, sizeof(q));
        memcpy(&omp_team_size, &r, sizeof(r));
    }
}
#else
static void omp_lookup(void) {}
#endif

static void omp_once(void) {
    if (!omp_looked_up) { /* a benign race: every thread that looks finds the same symbols */
        omp_lookup();
        omp_looked_up = 1;
    }
}

typedef struct {
    work_fn fn;
    void *ctx;
    int64_t total;
} TeamJob;

static void team_main(void *arg) {
    TeamJob *j = arg;
    int t = omp_thread_num(), n = omp_team_size(); /* the team may be smaller than asked for */
    j->fn(j->ctx, t, j->total * t / n, j->total * (t + 1) / n);
}

static int use_omp_pool = 1; /* tests turn it off to cover the pthreads path */

static void run_parallel(int threads, work_fn fn, void *ctx, int64_t total) {
    omp_once();
    if (threads > 1 && use_omp_pool && gomp_parallel) {
        TeamJob job = {fn, ctx, total};
        gomp_parallel(team_main, &job, (unsigned)threads, 0);
        return;
    }
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        jobs[t].fn = fn;
        jobs[t].ctx = ctx;
        jobs[t].tid = t;
        jobs[t].a = total * t / threads;
        jobs[t].b = total * (t + 1) / threads;
        started[t] = 0;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, job_main, &jobs[t]) == 0;
    for (int t = 1; t < threads; t++)
        if (!started[t]) job_main(&jobs[t]); /* no thread to be had: do its share here */
    job_main(&jobs[0]);
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(ids[t], NULL);
}

/* Runs the body with `piece`, `from`, `to` set for each piece's part of the global range [a, b)
 * (the body may `continue` to the next piece). */
#define FOR_SEGMENTS(P, A, B, ...)                                                 \
    do {                                                                           \
        int64_t pos_ = (A);                                                        \
        Py_ssize_t i_ = (pos_ < (B)) ? piece_at((P), pos_) : (P)->count;           \
        for (; pos_ < (B) && i_ < (P)->count; i_++) {                              \
            int64_t end_ = (P)->start[i_ + 1] < (B) ? (P)->start[i_ + 1] : (B);    \
            if (end_ <= pos_) continue;                                            \
            Py_ssize_t piece = i_;                                                 \
            int64_t from = pos_ - (P)->start[i_], to = end_ - (P)->start[i_];     \
            pos_ = end_;                                                           \
            __VA_ARGS__;                                                           \
        }                                                                          \
    } while (0)

/* ---- scan: zero and non-finite entries per piece ---- */

typedef struct {
    const Pieces *p;
    uint32_t zero_below; /* keys below this count as zero: 1, or the smallest normal under DAZ */
    int64_t *zeros, *nonfinite; /* [threads][count] */
} ScanCtx;

static void scan_work(void *arg, int tid, int64_t a, int64_t b) {
    ScanCtx *c = arg;
    int64_t *zeros = c->zeros + (size_t)tid * c->p->count, *bad = c->nonfinite + (size_t)tid * c->p->count;
    const int32_t zl = (int32_t)c->zero_below;
    FOR_SEGMENTS(c->p, a, b, {
        const int32_t *x = (const int32_t *)c->p->ptr[piece] + from;
        int64_t n = to - from, z = 0, f = 0;
        for (int64_t s = 0; s < n; s += 4096) {
            int64_t m = n - s < 4096 ? n - s : 4096;
            int32_t zc = 0, fc = 0;
            for (int64_t j = 0; j < m; j++) {
                int32_t key = x[s + j] & (int32_t)KEY_MASK;
                zc += key < zl;
                fc += key >= (int32_t)NONFINITE;
            }
            z += zc;
            f += fc;
        }
        zeros[piece] += z;
        bad[piece] += f;
    });
}

static PyObject *list_of_sums(const int64_t *per_thread, int threads, Py_ssize_t count) {
    PyObject *out = PyList_New(count);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t s = 0;
        for (int t = 0; t < threads; t++) s += per_thread[(size_t)t * count + i];
        PyObject *v = PyLong_FromLongLong(s);
        if (!v) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

static PyObject *py_scan(PyObject *self, PyObject *args) {
    PyObject *ptrs, *sizes;
    long threads;
    long long zero_below;
    if (!PyArg_ParseTuple(args, "OOlL", &ptrs, &sizes, &threads, &zero_below)) return NULL;
    if (!zero_below_ok(zero_below)) return NULL;
    Pieces p;
    if (pieces_parse(ptrs, sizes, &p) < 0) return NULL;
    int T = clamp_threads(threads, p.start[p.count]);
    ScanCtx c = {&p, (uint32_t)zero_below, calloc((size_t)T * (p.count + 1), sizeof(int64_t)),
                 calloc((size_t)T * (p.count + 1), sizeof(int64_t))};
    PyObject *result = NULL;
    if (!c.zeros || !c.nonfinite) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS run_parallel(T, scan_work, &c, p.start[p.count]);
    Py_END_ALLOW_THREADS
    PyObject *z = list_of_sums(c.zeros, T, p.count), *f = z ? list_of_sums(c.nonfinite, T, p.count) : NULL;
    if (z && f) result = PyTuple_Pack(2, z, f);
    Py_XDECREF(z);
    Py_XDECREF(f);
done:
    free(c.zeros);
    free(c.nonfinite);
    pieces_free(&p);
    return result;
}

/* ---- exact k-th smallest key of a small array (radix select, 16-bit digits from the top) ---- */

static uint32_t small_kth(uint32_t *a, int64_t n, int64_t rank) { /* nth_element on a (reordered) */
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        uint32_t x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi];
        uint32_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y)); /* median of 3 */
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) {
                uint32_t t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (rank <= j) hi = j;
        else if (rank >= i) lo = i;
        else return a[rank]; /* between the two halves: equal to the pivot */
    }
    return a[lo];
}

#define SMALL 4096 /* up to this many keys, a quickselect beats clearing a 64k-bin histogram */

static uint32_t kth_key(const uint32_t *keys, int64_t n, int64_t rank /* 0-based */, uint32_t *scratch, uint32_t *hist) {
    /* The top 16 bits by histogram, then the survivors (copied to scratch, which has room for
     * n keys) by histogram or, when few, by quickselect. */
    if (n <= SMALL) {
        memcpy(scratch, keys, sizeof(uint32_t) * (size_t)n);
        return small_kth(scratch, n, rank);
    }
    memset(hist, 0, sizeof(uint32_t) << 16);
    for (int64_t i = 0; i < n; i++) hist[keys[i] >> 16]++;
    uint32_t d = 0;
    while (rank >= (int64_t)hist[d]) rank -= hist[d++];
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++)
        if ((keys[i] >> 16) == d) scratch[m++] = keys[i];
    if (m <= SMALL) return small_kth(scratch, m, rank);
    memset(hist, 0, sizeof(uint32_t) << 16);
    for (int64_t i = 0; i < m; i++) hist[scratch[i] & 0xffff]++;
    uint32_t e = 0;
    while (rank >= (int64_t)hist[e]) rank -= hist[e++];
    return (d << 16) | e;
}

/* One stretch of the count pass. Adds to `c` the keys below lo, the zeros and the non-finite
 * entries; returns how many 16-entry blocks hold a key in [lo, hi], each recorded as its
 * offset in blk[] and a bit per entry in msk[]. No branch depends on the data: candidates
 * are rare, and are looked at afterwards, while the stretch is still in cache. */
typedef struct {
    int64_t below, zeros, nonfinite;
} Counts;

static int64_t blocks_generic(const int32_t *x, int64_t n, int32_t lo, int32_t hi, int32_t zl, Counts *c, uint32_t *blk, uint32_t *msk) {
    int64_t nb = 0, below = 0, zeros = 0, bad = 0;
    for (int64_t j = 0; j < n; j += BLOCK) {
        int m = n - j < BLOCK ? (int)(n - j) : BLOCK;
        uint32_t bits = 0;
        for (int q = 0; q < m; q++) {
            int32_t key = x[j + q] & (int32_t)KEY_MASK;
            below += key < lo;
            zeros += key < zl;
            bad += key >= (int32_t)NONFINITE;
            bits |= (uint32_t)((key >= lo) & (key <= hi)) << q;
        }
        blk[nb] = (uint32_t)j;
        msk[nb] = bits;
        nb += bits != 0;
    }
    c->below += below;
    c->zeros += zeros;
    c->nonfinite += bad;
    return nb;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
static int use_avx2 = 0;

__attribute__((target("avx2"))) static int64_t blocks_avx2(const int32_t *x, int64_t n, int32_t lo, int32_t hi, int32_t zl, Counts *c, uint32_t *blk, uint32_t *msk) {
    const __m256i km = _mm256_set1_epi32((int32_t)KEY_MASK), vlo = _mm256_set1_epi32(lo), vhi = _mm256_set1_epi32(hi);
    const __m256i vzl = _mm256_set1_epi32(zl), vnf = _mm256_set1_epi32((int32_t)NONFINITE - 1);
    __m256i cb = _mm256_setzero_si256(), cz = cb, cf = cb; /* lanes count down (compares give -1) */
    int64_t nb = 0, j = 0;
    for (; j + BLOCK <= n; j += BLOCK) {
        __m256i k0 = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + j)), km);
        __m256i k1 = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + j + 8)), km);
        __m256i l0 = _mm256_cmpgt_epi32(vlo, k0), l1 = _mm256_cmpgt_epi32(vlo, k1);
        cb = _mm256_add_epi32(cb, _mm256_add_epi32(l0, l1));
        cz = _mm256_add_epi32(cz, _mm256_add_epi32(_mm256_cmpgt_epi32(vzl, k0), _mm256_cmpgt_epi32(vzl, k1)));
        cf = _mm256_add_epi32(cf, _mm256_add_epi32(_mm256_cmpgt_epi32(k0, vnf), _mm256_cmpgt_epi32(k1, vnf)));
        __m256i o0 = _mm256_or_si256(l0, _mm256_cmpgt_epi32(k0, vhi)), o1 = _mm256_or_si256(l1, _mm256_cmpgt_epi32(k1, vhi));
        uint32_t out = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(o0)) | ((uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(o1)) << 8);
        blk[nb] = (uint32_t)j;
        msk[nb] = out ^ 0xffffu;
        nb += out != 0xffffu;
    }
    int32_t lanes[3][8];
    _mm256_storeu_si256((__m256i *)lanes[0], cb);
    _mm256_storeu_si256((__m256i *)lanes[1], cz);
    _mm256_storeu_si256((__m256i *)lanes[2], cf);
    for (int q = 0; q < 8; q++) {
        c->below -= lanes[0][q];
        c->zeros -= lanes[1][q];
        c->nonfinite -= lanes[2][q];
    }
    if (j < n) { /* the last, partial block */
        int64_t more = blocks_generic(x + j, n - j, lo, hi, zl, c, blk + nb, msk + nb);
        if (more) blk[nb] += (uint32_t)j;
        nb += more;
    }
    return nb;
}
#endif

#ifdef HAVE_AVX2_PATH
static uint32_t compress_lut[256][8]; /* lane mask -> the indices of its set lanes, first */

static void compress_lut_init(void) {
    for (int m = 0; m < 256; m++) {
        int w = 0;
        for (int lane = 0; lane < 8; lane++)
            if (m & (1 << lane)) compress_lut[m][w++] = (uint32_t)lane;
        while (w < 8) compress_lut[m][w++] = 0;
    }
}

/* The candidates of the recorded blocks of one stretch, without a branch on the data: keys
 * strictly inside (lo, hi) are packed into out with a permute (out needs room for BLOCK
 * more than it gets), keys equal to lo or hi are counted. Returns how many were written. */
__attribute__((target("avx2"))) static int64_t extract_avx2(const int32_t *x, const uint32_t *blk, int64_t nb, int32_t lo, int32_t hi,
                                                            uint32_t *out, int64_t *el, int64_t *eh) {
    const __m256i km = _mm256_set1_epi32((int32_t)KEY_MASK), vlo = _mm256_set1_epi32(lo), vhi = _mm256_set1_epi32(hi);
    int64_t w = 0, nlo = 0, nhi = 0;
    for (int64_t q = 0; q < nb; q++) {
        for (int half = 0; half < BLOCK; half += 8) {
            __m256i k = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + blk[q] + half)), km);
            __m256i inside = _mm256_and_si256(_mm256_cmpgt_epi32(k, vlo), _mm256_cmpgt_epi32(vhi, k));
            uint32_t m = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(inside));
            nlo += __builtin_popcount((uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, vlo))));
            nhi += __builtin_popcount((uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, vhi))));
            __m256i packed = _mm256_permutevar8x32_epi32(k, _mm256_loadu_si256((const __m256i *)compress_lut[m]));
            _mm256_storeu_si256((__m256i *)(out + w), packed);
            w += __builtin_popcount(m);
        }
    }
    *el += nlo;
    *eh += nhi;
    return w;
}
#endif

#define CAND_SLACK (2 * BLOCK + 8) /* candidate buffers hold this many past the cap: whole blocks are written */
#define STRETCH 4096 /* entries per stretch: 16 KB, in L1 while its candidates are picked out */
#define HIST_BITS 12  /* candidates are binned as they are found, in a histogram that stays in L1 */
#define HIST_BINS (1 << HIST_BITS)

typedef struct {
    const Pieces *p;
    uint32_t lo, hi;     /* the bracket: keys in [lo, hi] are looked at closely */
    uint32_t zero_below; /* keys below this count as zero */
    int64_t cap;         /* candidates each thread may keep */
    int64_t *below;      /* [threads] */
    int64_t *eq_lo;      /* [threads][count] */
    int64_t *eq_hi;      /* [threads][count] */
    int64_t *zeros;      /* [threads][count] */
    int64_t *nonfinite;  /* [threads][count] */
    uint32_t **cand_key; /* [threads][cap]: keys strictly inside (lo, hi) */
    int64_t *seg_begin, *seg_end; /* [threads][count]: each piece's candidates in its thread's cand_key */
    uint32_t **hist;  /* [threads][HIST_BINS]: candidates by (key - lo) >> shift */
    int shift;
    int64_t *ncand;   /* [threads] */
    int *overflow;    /* [threads] */
} CountCtx;

static void count_work(void *arg, int tid, int64_t a, int64_t b) {
    CountCtx *c = arg;
    const Py_ssize_t np = c->p->count;
    int64_t *eql = c->eq_lo + (size_t)tid * np, *eqh = c->eq_hi + (size_t)tid * np;
    int64_t *zeros = c->zeros + (size_t)tid * np, *bad = c->nonfinite + (size_t)tid * np;
    uint32_t *ck = c->cand_key[tid], *hist = c->hist[tid];
    int64_t *seg_begin = c->seg_begin + (size_t)tid * np, *seg_end = c->seg_end + (size_t)tid * np;
    uint32_t blk[STRETCH / BLOCK], msk[STRETCH / BLOCK];
    const int shift = c->shift;
    int64_t nc = 0, below = 0;
    const int32_t lo = (int32_t)c->lo, hi = (int32_t)c->hi, zl = (int32_t)c->zero_below;
    int over = 0;
    FOR_SEGMENTS(c->p, a, b, {
        const int32_t *x = (const int32_t *)c->p->ptr[piece] + from;
        int64_t n = to - from, el = 0, eh = 0;
        Counts counts = {0, 0, 0};
        seg_begin[piece] = nc; /* a thread sees each piece in one stretch at most */
        for (int64_t s = 0; s < n; s += STRETCH) {
            int64_t m = n - s < STRETCH ? n - s : STRETCH, nb;
#ifdef HAVE_AVX2_PATH
            if (use_avx2) nb = blocks_avx2(x + s, m, lo, hi, zl, &counts, blk, msk);
            else
#endif
                nb = blocks_generic(x + s, m, lo, hi, zl, &counts, blk, msk);
            int64_t first = 0; /* the recorded blocks still to look at */
#ifdef HAVE_AVX2_PATH
            if (use_avx2 && lo < hi && nc + nb * BLOCK <= c->cap + BLOCK) { /* writes stay within the slack */
                int64_t full = nb > 0 && blk[nb - 1] + BLOCK > m ? nb - 1 : nb; /* a partial last block: below */
                int64_t got = extract_avx2(x + s, blk, full, lo, hi, ck + nc, &el, &eh);
                for (int64_t j = nc; j < nc + got; j++) hist[(ck[j] - (uint32_t)lo) >> shift]++;
                nc += got;
                first = full;
            }
#endif
            for (int64_t q = first; q < nb; q++) {
                uint32_t bits = msk[q];
                const int32_t *y = x + s + blk[q];
                if (nc > c->cap) { /* past the cap: counting goes on, the counts stay whole */
                    over = 1;
                    for (; bits; bits &= bits - 1) {
                        int32_t key = y[__builtin_ctz(bits)] & (int32_t)KEY_MASK;
                        el += key == lo;
                        eh += (key == hi) & (key != lo);
                    }
                    continue;
                }
                for (; bits; bits &= bits - 1) { /* no branch on the key: lo, hi or between */
                    int32_t key = y[__builtin_ctz(bits)] & (int32_t)KEY_MASK;
                    int is_lo = key == lo, is_hi = (key == hi) & !is_lo, inside = !(is_lo | is_hi); /* lo may equal hi */
                    el += is_lo;
                    eh += is_hi;
                    ck[nc] = (uint32_t)key; /* 4 bytes a candidate: fresh pages are dear (page faults) */
                    hist[(uint32_t)(key - lo) >> shift] += (uint32_t)inside; /* in range for any key in [lo, hi] */
                    nc += inside;
                }
            }
        }
        below += counts.below;
        zeros[piece] += counts.zeros;
        bad[piece] += counts.nonfinite;
        eql[piece] += el;
        eqh[piece] += eh;
        seg_end[piece] = nc;
    });
    c->below[tid] = below;
    c->ncand[tid] = nc;
    c->overflow[tid] = over | (nc > c->cap);
}

static uint32_t mix(uint64_t x) { /* splitmix64: a fixed jitter for sample positions (no RNG state touched) */
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return (uint32_t)(x ^ (x >> 31));
}

typedef struct {
    const Pieces *p;
    const int64_t *at;        /* [SAMPLE_BLOCKS]: where each run starts in the concatenation */
    const Py_ssize_t *piece;  /* [SAMPLE_BLOCKS]: the piece holding that start */
    uint32_t *out;
} SampleCtx;

#define SAMPLE_RUN 16 /* contiguous entries per sample block: one cache line */

static void sample_work(void *arg, int tid, int64_t a, int64_t b) {
    SampleCtx *c = arg;
    (void)tid;
    for (int64_t blk = a; blk < b; blk++) {
        if (blk + 16 < b) { /* the runs ahead, fetched while this one is read */
            Py_ssize_t ahead = c->piece[blk + 16];
            __builtin_prefetch(c->p->ptr[ahead] + (c->at[blk + 16] - c->p->start[ahead]));
        }
        Py_ssize_t i = c->piece[blk];
        uint32_t *w = c->out + blk * SAMPLE_RUN;
        for (int64_t pos = c->at[blk]; pos < c->at[blk] + SAMPLE_RUN; pos++) {
            while (pos >= c->p->start[i + 1]) i++;
            *w++ = c->p->ptr[i][pos - c->p->start[i]] & KEY_MASK;
        }
    }
}

/* Position of the nth (1-based) entry of x with this key, or -1. Counted 256 at a time, with
 * no early exit inside, so the compiler can vectorize; only the block holding it is walked. */
static int64_t nth_tie(const int32_t *x, int64_t n, int32_t key, int64_t nth) {
    int64_t seen = 0;
    for (int64_t j = 0; j < n; j += 256) {
        int64_t m = n - j < 256 ? n - j : 256;
        int32_t count = 0;
        for (int64_t q = 0; q < m; q++) count += (x[j + q] & (int32_t)KEY_MASK) == key;
        if (seen + count >= nth)
            for (int64_t q = 0; q < m; q++)
                if ((x[j + q] & (int32_t)KEY_MASK) == key && ++seen == nth) return j + q;
        seen += count;
    }
    return -1;
}

#define SAMPLE_BLOCKS 16384 /* at most: one per 1024 entries, at least 4096 */
#define SAMPLE_BLOCKS_MIN 4096
#define SAMPLE (SAMPLE_BLOCKS * SAMPLE_RUN)

static PyObject *int_list(const int64_t *values, Py_ssize_t count) {
    PyObject *out = PyList_New(count);
    for (Py_ssize_t i = 0; out && i < count; i++) {
        PyObject *v = PyLong_FromLongLong(values[i]);
        if (!v) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

static PyObject *py_select(PyObject *self, PyObject *args) {
    PyObject *ptrs, *sizes;
    long long k;
    long threads;
    long long zero_below;
    long long force_lo = -1, force_hi = -1, force_cap = -1; /* tests: a given bracket and cap */
    if (!PyArg_ParseTuple(args, "OOLlL|LLL", &ptrs, &sizes, &k, &threads, &zero_below, &force_lo, &force_hi, &force_cap)) return NULL;
    if (!zero_below_ok(zero_below)) return NULL;
    Pieces p;
    if (pieces_parse(ptrs, sizes, &p) < 0) return NULL;
    const int64_t total = p.start[p.count];
    if (k < 1 || k > total) {
        pieces_free(&p);
        PyErr_SetString(PyExc_ValueError, "k must be in [1, total entries]");
        return NULL;
    }
    int T = clamp_threads(threads, total);
    const Py_ssize_t np = p.count;
    PyObject *result = NULL;
    /* Sampling costs a cache miss a block: smaller selects take fewer blocks (a wider bracket,
     * so more candidates, but fewer misses; per-layer selects on 4M entries gain ~0.7 ms). */
    int64_t blocks = total / 1024 < SAMPLE_BLOCKS_MIN ? SAMPLE_BLOCKS_MIN : (total / 1024 > SAMPLE_BLOCKS ? SAMPLE_BLOCKS : total / 1024);
    int64_t s = total <= SAMPLE ? total : blocks * SAMPLE_RUN;
    uint32_t *sample = malloc(sizeof(uint32_t) * (size_t)s * 2); /* the sample, then select scratch: at most 2 MB, from the heap (reused, no page faults) */
    uint32_t *hist = malloc(sizeof(uint32_t) << 16); /* small, reused: from the heap */
    int64_t *sample_at = malloc(sizeof(int64_t) * SAMPLE_BLOCKS);
    Py_ssize_t *sample_piece = malloc(sizeof(Py_ssize_t) * SAMPLE_BLOCKS);
    CountCtx c;
    memset(&c, 0, sizeof(c));
    c.p = &p;
    c.zero_below = (uint32_t)zero_below;
    c.below = calloc(T, sizeof(int64_t));
    c.ncand = calloc(T, sizeof(int64_t));
    c.overflow = calloc(T, sizeof(int));
    c.eq_lo = calloc((size_t)T * (np + 1), sizeof(int64_t));
    c.eq_hi = calloc((size_t)T * (np + 1), sizeof(int64_t));
    c.zeros = calloc((size_t)T * (np + 1), sizeof(int64_t));
    c.nonfinite = calloc((size_t)T * (np + 1), sizeof(int64_t));
    c.cand_key = calloc(T, sizeof(uint32_t *));
    c.seg_begin = calloc((size_t)T * (np + 1), sizeof(int64_t));
    c.seg_end = calloc((size_t)T * (np + 1), sizeof(int64_t));
    c.hist = calloc(T, sizeof(uint32_t *));
    int64_t *per_piece = calloc((size_t)4 * (np + 1), sizeof(int64_t)); /* ties, zeros, non-finite, splits */
    uint32_t *all_keys = NULL;
    if (!sample || !hist || !sample_at || !sample_piece || !c.below || !c.ncand || !c.overflow || !c.eq_lo || !c.eq_hi || !c.zeros || !c.nonfinite || !c.cand_key ||
        !c.seg_begin || !c.seg_end || !c.hist || !per_piece) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t *ties = per_piece, *zeros = per_piece + (np + 1), *bad = per_piece + 2 * (np + 1), *split = per_piece + 3 * (np + 1);
    for (Py_ssize_t i = 0; i < np; i++) split[i] = -1;
    int found = 0, no_memory = 0;
    uint32_t key = 0;
    int64_t below_key = 0;
    Py_BEGIN_ALLOW_THREADS
    /* 1. A sample: everything when small; else one cache line of entries from each of
     *    `blocks` equal stretches of the concatenation, at a fixed pseudo-random place. */
    if (s == total) {
        int64_t w = 0;
        for (Py_ssize_t i = 0; i < np; i++)
            for (int64_t j = 0; j < p.size[i]; j++) sample[w++] = p.ptr[i][j] & KEY_MASK;
    } else {
        Py_ssize_t i = 0;
        for (int64_t blk = 0; blk < blocks; blk++) { /* where each run starts, walking the pieces */
            /* stretch blk is [blk * total / B, (blk + 1) * total / B): together they cover everything */
            int64_t first = (int64_t)((double)blk * (double)total / blocks), next = (int64_t)((double)(blk + 1) * (double)total / blocks);
            if (next > total) next = total;
            if (first > next - SAMPLE_RUN) first = next - SAMPLE_RUN;
            int64_t pos = first + (int64_t)(mix((uint64_t)blk) % (uint64_t)(next - first - SAMPLE_RUN + 1));
            while (pos >= p.start[i + 1]) i++;
            sample_at[blk] = pos;
            sample_piece[blk] = i;
        }
        SampleCtx sc = {&p, sample_at, sample_piece, sample};
        run_parallel(T, sample_work, &sc, blocks); /* the reads: latency-bound, so spread over the threads */
    }
    /* 2. A bracket [lo, hi] that holds the k-th smallest key but for a vanishing chance: the
     *    sample's order statistics 4.5 standard deviations (and a slack for runs) either side. */
    int64_t lo_rank, hi_rank, expected;
    if (s == total) {
        lo_rank = hi_rank = k - 1;
    } else {
        double q = (double)k / (double)total;
        int64_t center = (int64_t)(q * (double)s);
        if (center >= s) center = s - 1;
        /* The sample comes in runs of SAMPLE_RUN neighbours, which may be alike (rows with their
         * own scale, runs of equal values): the spread of the estimate is measured from the runs
         * themselves (how many of each fall below the estimate), never taken below the iid one. */
        uint32_t guess = kth_key(sample, s, center, sample + s, hist);
        double sum = 0, sum2 = 0;
        for (int64_t blk = 0; blk < blocks; blk++) {
            int below_guess = 0;
            for (int j = 0; j < SAMPLE_RUN; j++) below_guess += sample[blk * SAMPLE_RUN + j] < guess;
            sum += below_guess;
            sum2 += (double)below_guess * below_guess;
        }
        double mean = sum / blocks, var = sum2 / blocks - mean * mean;
        double spread = sqrt((double)s * q * (1.0 - q)); /* in sample ranks */
        double clustered = sqrt(var > 0 ? var * blocks : 0);
        if (clustered > spread) spread = clustered;
        int64_t delta = (int64_t)(4.5 * spread) + 4 * SAMPLE_RUN;
        lo_rank = center - delta;
        hi_rank = center + delta;
    }
    expected = s == total ? 0 : (int64_t)((double)total * (double)(hi_rank - lo_rank) / (double)s);
    c.lo = lo_rank < 0 ? 0 : kth_key(sample, s, lo_rank, sample + s, hist);
    c.hi = hi_rank >= s ? KEY_MASK : kth_key(sample, s, hi_rank, sample + s, hist);
    if (force_lo >= 0 && force_hi >= force_lo && force_hi <= (long long)KEY_MASK) {
        c.lo = (uint32_t)force_lo;
        c.hi = (uint32_t)force_hi;
        expected = total;
    }
    /* 3. One pass: count below lo, count lo and hi per piece, keep the keys strictly between
     *    (up to a cap: past it only the counts go on); count zeros and non-finite entries. */
    c.cap = 4 * expected + (1 << 16);
    if (force_cap >= 0) c.cap = force_cap;
    if (c.cap > total) c.cap = total;
    if (c.cap > INT32_MAX) c.cap = INT32_MAX; /* histogram counts are 32-bit */
    uint32_t span = c.hi - c.lo;
    while ((span >> c.shift) >= HIST_BINS) c.shift++;
    for (int t = 0; t < T && !no_memory; t++) { /* untouched pages of these cost no memory */
        c.cand_key[t] = scratch_alloc(sizeof(uint32_t) * (size_t)(c.cap + CAND_SLACK));
        c.hist[t] = calloc(HIST_BINS, sizeof(uint32_t));
        no_memory = !c.cand_key[t] || !c.hist[t];
    }
    if (!no_memory) {
        run_parallel(T, count_work, &c, total);
        int overflow = 0;
        int64_t below = 0, eq_lo = 0, eq_hi = 0, ncand = 0;
        for (int t = 0; t < T; t++) {
            overflow |= c.overflow[t];
            below += c.below[t];
            ncand += c.ncand[t];
            for (Py_ssize_t i = 0; i < np; i++) {
                eq_lo += c.eq_lo[(size_t)t * np + i];
                eq_hi += c.eq_hi[(size_t)t * np + i];
                zeros[i] += c.zeros[(size_t)t * np + i];
                bad[i] += c.nonfinite[(size_t)t * np + i];
            }
        }
        /* 4. Where the k-th key fell; found stays 0 if outside the bracket (the caller then
         *    takes the pure-torch path) or among more candidates than were kept. */
        if (below >= k) {
        } else if (below + eq_lo >= k) {
            found = 1;
            key = c.lo;
            below_key = below;
            for (int t = 0; t < T; t++)
                for (Py_ssize_t i = 0; i < np; i++) ties[i] += c.eq_lo[(size_t)t * np + i];
        } else if (below + eq_lo + ncand >= k) {
            /* the bucket of the candidates' histogram holding it, then that bucket's keys */
            int64_t rank = k - below - eq_lo, before = 0, d = 0, in_bucket = 0;
            for (;; d++) {
                in_bucket = 0;
                for (int t = 0; t < T; t++) in_bucket += c.hist[t][d];
                if (before + in_bucket >= rank) break;
                before += in_bucket;
            }
            if (!overflow && (all_keys = scratch_alloc(sizeof(uint32_t) * (size_t)in_bucket * 3)) != NULL) {
                uint32_t *bucket_piece = all_keys + 2 * in_bucket;
                int64_t w = 0;
                for (int t = 0; t < T; t++)
                    for (Py_ssize_t i = 0; i < np; i++)
                        for (int64_t j = c.seg_begin[(size_t)t * np + i]; j < c.seg_end[(size_t)t * np + i]; j++)
                            if (((c.cand_key[t][j] - c.lo) >> c.shift) == (uint32_t)d) {
                                bucket_piece[w] = (uint32_t)i;
                                all_keys[w++] = c.cand_key[t][j];
                            }
                found = 1;
                key = c.shift == 0 ? c.lo + (uint32_t)d : kth_key(all_keys, in_bucket, rank - before - 1, all_keys + in_bucket, hist);
                below_key = below + eq_lo + before;
                for (int64_t j = 0; j < in_bucket; j++) {
                    if (all_keys[j] < key) below_key++;
                    else if (all_keys[j] == key) ties[bucket_piece[j]]++;
                }
            }
        } else if (!overflow && below + eq_lo + ncand + eq_hi >= k) {
            found = 1;
            key = c.hi;
            below_key = below + eq_lo + ncand;
            for (int t = 0; t < T; t++)
                for (Py_ssize_t i = 0; i < np; i++) ties[i] += c.eq_hi[(size_t)t * np + i];
        }
    }
    if (found) {
        /* Ties split by count, earliest first, tensor by tensor (the caller's quotas), and where
         * each tensor's share ends, so a fold can prune <= key before that and < key after it,
         * in parallel. A tensor whose ties are all taken ends at its end; at most one takes
         * part of its ties, and is searched for its share's last one. */
        int64_t left = k - below_key;
        for (Py_ssize_t i = 0; i < np && left > 0; i++) {
            int64_t take = ties[i] < left ? ties[i] : left;
            left -= take;
            if (take > 0) split[i] = take == ties[i] ? p.size[i] - 1 : nth_tie((const int32_t *)p.ptr[i], p.size[i], (int32_t)key, take);
        }
    }
    Py_END_ALLOW_THREADS
    if (no_memory) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject *t_list = int_list(ties, np), *z_list = int_list(zeros, np), *f_list = int_list(bad, np), *s_list = int_list(split, np);
    if (t_list && z_list && f_list && s_list) {
        if (found) result = Py_BuildValue("(kLOOOO)", (unsigned long)key, (long long)below_key, t_list, z_list, f_list, s_list);
        else result = Py_BuildValue("(OOOOOO)", Py_None, Py_None, Py_None, z_list, f_list, Py_None);
    }
    Py_XDECREF(s_list);
    Py_XDECREF(t_list);
    Py_XDECREF(z_list);
    Py_XDECREF(f_list);
done:
    for (int t = 0; c.cand_key && t < T; t++) scratch_free(c.cand_key[t]);
    free(c.seg_begin);
    free(c.seg_end);
    for (int t = 0; c.hist && t < T; t++) free(c.hist[t]);
    free(c.hist);
    free(c.cand_key);
    free(c.below);
    free(c.ncand);
    free(c.overflow);
    free(c.eq_lo);
    free(c.eq_hi);
    free(c.zeros);
    free(c.nonfinite);
    free(per_piece);
    scratch_free(all_keys);
    free(sample);
    free(hist);
    free(sample_at);
    free(sample_piece);
    pieces_free(&p);
    return result;
}

/* ---- fold: w *= (key >= cut); ties at the cut pruned earliest first, up to a quota ---- */

/* x[0:n] *= (key >= cut), as torch's w * mask (so -0.0, and subnormals under flush-to-zero,
 * come out as torch makes them); cut may be 2^31, above every key. Returns the zeros after. */
static inline __attribute__((always_inline)) int64_t fold_range_body(float *x, int64_t n, uint32_t cut, int32_t zl) {
    const int32_t c = cut > KEY_MASK ? (int32_t)KEY_MASK : (int32_t)cut, all = cut > KEY_MASK;
    int64_t z = 0;
    for (int64_t s = 0; s < n; s += 4096) {
        int64_t m = n - s < 4096 ? n - s : 4096;
        int32_t zc = 0;
        for (int64_t j = 0; j < m; j++) {
            int32_t bits;
            memcpy(&bits, x + s + j, 4);
            float r = x[s + j] * (float)(((bits & (int32_t)KEY_MASK) >= c) & !all);
            x[s + j] = r;
            memcpy(&bits, &r, 4);
            zc += (bits & (int32_t)KEY_MASK) < zl;
        }
        z += zc;
    }
    return z;
}

static int64_t fold_range_generic(float *x, int64_t n, uint32_t cut, int32_t zl) { return fold_range_body(x, n, cut, zl); }
#ifdef HAVE_AVX2_PATH
__attribute__((target("avx2"))) static int64_t fold_range_avx2(float *x, int64_t n, uint32_t cut, int32_t zl) {
    return fold_range_body(x, n, cut, zl);
}
#endif

static int64_t fold_range(float *x, int64_t n, uint32_t cut, int32_t zl) {
#ifdef HAVE_AVX2_PATH
    if (use_avx2) return fold_range_avx2(x, n, cut, zl);
#endif
    return fold_range_generic(x, n, cut, zl);
}

typedef struct {
    const Pieces *p;
    const uint32_t *cut;   /* [count] */
    const int64_t *quota;  /* [count]: ties at the cut to prune; 0 for a plain cut */
    const int64_t *split;  /* [count]: where the quota ends (the last tie it takes), or -1: unknown */
    uint32_t zero_below;
    int64_t *zeros;        /* [threads][count] */
} FoldCtx;

static void fold_work(void *arg, int tid, int64_t a, int64_t b) {
    FoldCtx *c = arg;
    int64_t *zeros = c->zeros + (size_t)tid * c->p->count;
    const int32_t zl = (int32_t)c->zero_below;
    FOR_SEGMENTS(c->p, a, b, {
        float *x = (float *)c->p->ptr[piece];
        uint32_t cut = c->cut[piece];
        if (c->quota[piece] > 0) {
            int64_t split = c->split[piece];
            if (split < 0) continue; /* ties to count off in order: done afterwards, by one thread */
            /* up to the last tie taken, ties are pruned too (cut + 1); after it, a plain cut */
            int64_t mid = split + 1 < from ? from : (split + 1 > to ? to : split + 1);
            zeros[piece] += fold_range(x + from, mid - from, cut + 1, zl);
            from = mid;
        }
        zeros[piece] += fold_range(x + from, to - from, cut, zl);
    });
}

static PyObject *py_fold(PyObject *self, PyObject *args) {
    PyObject *ptrs, *sizes, *cuts, *quotas, *splits;
    long threads;
    long long zero_below;
    if (!PyArg_ParseTuple(args, "OOOOOlL", &ptrs, &sizes, &cuts, &quotas, &splits, &threads, &zero_below)) return NULL;
    if (!zero_below_ok(zero_below)) return NULL;
    Pieces p;
    if (pieces_parse(ptrs, sizes, &p) < 0) return NULL;
    const Py_ssize_t np = p.count;
    PyObject *result = NULL, *fc = NULL, *fq = NULL, *fs = NULL;
    uint32_t *cut = malloc(sizeof(uint32_t) * (size_t)(np + 1));
    int64_t *quota = malloc(sizeof(int64_t) * (size_t)(np + 1));
    int64_t *split = malloc(sizeof(int64_t) * (size_t)(np + 1));
    int T = clamp_threads(threads, p.start[np]);
    FoldCtx c = {&p, cut, quota, split, (uint32_t)zero_below, calloc((size_t)T * (np + 1), sizeof(int64_t))};
    if (!cut || !quota || !split || !c.zeros) {
        PyErr_NoMemory();
        goto done;
    }
    fc = PySequence_Fast(cuts, "cuts must be a sequence");
    fq = fc ? PySequence_Fast(quotas, "quotas must be a sequence") : NULL;
    fs = fq ? PySequence_Fast(splits, "splits must be a sequence") : NULL;
    if (!fs) goto done;
    if (PySequence_Fast_GET_SIZE(fc) != np || PySequence_Fast_GET_SIZE(fq) != np || PySequence_Fast_GET_SIZE(fs) != np) {
        PyErr_SetString(PyExc_ValueError, "cuts, quotas and splits must have one entry per tensor");
        goto done;
    }
    for (Py_ssize_t i = 0; i < np; i++) {
        long long wide = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fc, i));
        quota[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fq, i));
        split[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fs, i));
        if (PyErr_Occurred()) goto done;
        cut[i] = (uint32_t)wide;
        if (wide < 0 || wide > (long long)KEY_MASK + 1 || quota[i] < 0 || (quota[i] > 0 && cut[i] > KEY_MASK) || split[i] >= p.size[i]) {
            PyErr_SetString(PyExc_ValueError, "bad cut or quota");
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS run_parallel(T, fold_work, &c, p.start[np]);
    for (Py_ssize_t i = 0; i < np; i++) { /* ties to count off in order, where the split is not known */
        if (quota[i] <= 0 || split[i] >= 0) continue;
        float *x = (float *)p.ptr[i];
        int64_t left = quota[i], z = 0;
        for (int64_t j = 0; j < p.size[i]; j++) {
            uint32_t bits;
            memcpy(&bits, x + j, 4);
            uint32_t kk = bits & KEY_MASK;
            int keep = kk > cut[i] || (kk == cut[i] && left-- <= 0);
            float r = x[j] * (float)keep;
            x[j] = r;
            memcpy(&bits, &r, 4);
            z += (bits & KEY_MASK) < zero_below;
        }
        c.zeros[i] += z;
    }
    Py_END_ALLOW_THREADS
    result = list_of_sums(c.zeros, T, np);
done:
    Py_XDECREF(fc);
    Py_XDECREF(fq);
    Py_XDECREF(fs);
    free(cut);
    free(quota);
    free(split);
    free(c.zeros);
    pieces_free(&p);
    return result;
}

static PyObject *py_use_openmp_pool(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    int was = use_omp_pool;
    use_omp_pool = on;
    omp_once();
    return Py_BuildValue("(OO)", was ? Py_True : Py_False, gomp_parallel ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"use_openmp_pool", py_use_openmp_pool, METH_VARARGS,
     "use_openmp_pool(on) -> (was on, pool found): run parallel work in torch's OpenMP pool when found, else own threads"},
    {"scan", py_scan, METH_VARARGS, "scan(ptrs, sizes, threads, zero_below) -> (zeros, nonfinite) per tensor"},
    {"select", py_select, METH_VARARGS,
     "select(ptrs, sizes, k, threads, zero_below) -> (key, entries below key, ties at key, zeros, non-finite, splits), all "
     "but the first two per tensor; splits: where a tensor's share of the ties (earliest first) ends, at or after its "
     "last tie taken and before the first left, or -1 for none; key, below, ties and splits are None when the k-th key was not pinned down (take the slow path)"},
    {"fold", py_fold, METH_VARARGS, "fold(ptrs, sizes, cuts, quotas, splits, threads, zero_below) -> zeros after per tensor"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "Fused float32 kernels for prunerecipe.fastprune.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") != 0;
    compress_lut_init();
#endif
    PyObject *m = PyModule_Create(&module);
#ifdef HAVE_AVX2_PATH
    if (m && PyModule_AddIntConstant(m, "AVX2", use_avx2) < 0) Py_CLEAR(m);
#else
    if (m && PyModule_AddIntConstant(m, "AVX2", 0) < 0) Py_CLEAR(m);
#endif
    return m;
}
