/*
 * prunerecipe._native: fused CPU kernels for float32 magnitude pruning.
 *
 * Optional. The package builds it when a C compiler is at hand and falls back to pure
 * PyTorch (prunerecipe/fastprune.py) when it is not; both give the same masks, the same
 * tie split, the same counts. Plain C (AVX2 and AVX-512 where the CPU has them) and
 * pthreads, or torch's own OpenMP pool when the process has one: no torch headers, so it
 * compiles in a second, and no OpenMP runtime of its own to clash with torch's.
 *
 * Keys: for a float32 w, (bits(w) & 0x7fffffff) read as an integer orders as |w| does
 * (NaN patterns above +inf, as torch.topk ranks NaN). Every function takes tensors as
 * (data pointer, entry count) pairs of contiguous float32 CPU memory; the caller keeps
 * the tensors alive. The GIL is released while the kernels run.
 *
 * scan(ptrs, sizes, threads, zero_below) -> (zeros, nonfinite)      one read pass
 * select_groups(ptrs, sizes, ends, ks, threads, zero_below[, lo, hi, cap, defer_above])
 *     -> (keys, belows, ties, zeros, nonfinite, splits): the k-th key of each group of
 *     consecutive tensors, all groups in one sample stage and one read pass; a group bigger
 *     than defer_above may come back pending, as the bin (blo, bhi, count) holding its key
 * select(ptrs, sizes, k, threads, zero_below[, lo, hi, cap]): the same for one group
 * fold(ptrs, sizes, cuts, quotas, splits, threads, zero_below) -> zeros after: one read/write pass
 * fold_pending(ptrs, sizes, ends, ks, blos, bhis, belows, inbins, threads, zero_below)
 *     -> (zeros after, keys): the fold of pending groups, finished in the same pass
 * simd([level]): the instruction set used (0 plain C, 1 AVX2, 2 AVX-512), for tests
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
#define PR_HAVE_MMAP 1
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
        if (s < 0 || (s > 0 && p == NULL) || s > ((int64_t)1 << 62) - total) {
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
#ifdef PR_HAVE_MMAP
    size_t total = bytes + 64;
    void *p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    *(size_t *)p = total;
    return (char *)p + 64;
#else
    return calloc(1, bytes); /* zero-filled, as fresh mapped pages are */
#endif
}

static void scratch_free(void *q) {
    if (!q) return;
#ifdef PR_HAVE_MMAP
    char *p = (char *)q - 64;
    munmap(p, *(size_t *)p);
#else
    free(q);
#endif
}

static int zero_below_ok(long long v) {
    if (v >= 0 && v <= (long long)KEY_MASK) return 1;
    PyErr_SetString(PyExc_ValueError, "zero_below must be in [0, 2**31): keys below it count as zeros");
    return 0;
}

/* Passes over the weights fetch 16 KB ahead of where they work, a line at a time as they go.
 * With work per entry (counting, packing candidates) the hardware prefetchers alone left a
 * read pass ~1.5x slower than a bare one (53 ms against 34 ms over 350M weights); fetched
 * ahead, it runs at the bare pass's speed. (A burst of a whole stretch at once was slower
 * still.) The address is made as an integer: prefetches never fault, and past a tensor's end
 * they only cost a wasted fetch. */
#define FETCH_AHEAD 16384
#define FETCH_READ(p) __builtin_prefetch((const void *)((uintptr_t)(p) + FETCH_AHEAD), 0)
#define FETCH_WRITE(p) __builtin_prefetch((const void *)((uintptr_t)(p) + FETCH_AHEAD), 1)
#define FETCH_1K(p, HOW)                                                      \
    do {                                                                      \
        for (int line_ = 0; line_ < 1024; line_ += 64) HOW((const char *)(p) + line_); \
    } while (0)

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
            for (int64_t h = 0; h < m; h += 256) {
                int64_t e = m - h < 256 ? m - h : 256;
                FETCH_1K(x + s + h, FETCH_READ);
                for (int64_t j = h; j < h + e; j++) {
                    int32_t key = x[s + j] & (int32_t)KEY_MASK;
                    zc += key < zl;
                    fc += key >= (int32_t)NONFINITE;
                }
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

static inline int64_t blocks_generic(const int32_t *x, int64_t n, int32_t lo, int32_t hi, int32_t zl, Counts *c, uint32_t *blk, uint32_t *msk) {
    int64_t nb = 0, below = 0, zeros = 0, bad = 0;
    for (int64_t j = 0; j < n; j += BLOCK) {
        int m = n - j < BLOCK ? (int)(n - j) : BLOCK;
        uint32_t bits = 0;
        FETCH_READ(x + j);
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
        FETCH_READ(x + j);
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

#ifdef HAVE_AVX2_PATH
#define HAVE_AVX512_PATH 1
static int use_avx512 = 0;

__attribute__((target("avx512f"))) static int64_t lanes_sum(__m512i v) { return (int64_t)_mm512_reduce_add_epi32(v); }

/* One stretch of the count pass in a single sweep, where AVX-512 is at hand: the counts as in
 * blocks_avx2, and the keys strictly inside (lo, hi) packed into out by a compress with no
 * branch and no second look (out needs room for 16 more than it gets). lo < hi. Returns how
 * many were written. */
__attribute__((target("avx512f,popcnt"))) static int64_t stretch_avx512(const int32_t *x, int64_t n, int32_t lo, int32_t hi, int32_t zl, Counts *c,
                                                                     uint32_t *out, int64_t *el, int64_t *eh) {
    const __m512i km = _mm512_set1_epi32((int32_t)KEY_MASK), vlo = _mm512_set1_epi32(lo), vhi = _mm512_set1_epi32(hi);
    const __m512i vzl = _mm512_set1_epi32(zl), vnf = _mm512_set1_epi32((int32_t)NONFINITE - 1), one = _mm512_set1_epi32(1);
    __m512i cb = _mm512_setzero_si512(), cz = cb, cf = cb, cl = cb, ch = cb; /* lanes: at most n / 16 each */
    int64_t w = 0, j = 0;
    for (; j + 16 <= n; j += 16) {
        FETCH_READ(x + j);
        __m512i k = _mm512_and_si512(_mm512_loadu_si512((const void *)(x + j)), km);
        __mmask16 lt = _mm512_cmplt_epi32_mask(k, vlo), gt = _mm512_cmpgt_epi32_mask(k, vhi);
        __mmask16 at_lo = _mm512_cmpeq_epi32_mask(k, vlo), at_hi = _mm512_cmpeq_epi32_mask(k, vhi);
        __mmask16 inside = (__mmask16)~(lt | gt | at_lo | at_hi);
        cb = _mm512_mask_add_epi32(cb, lt, cb, one);
        cz = _mm512_mask_add_epi32(cz, _mm512_cmplt_epi32_mask(k, vzl), cz, one);
        cf = _mm512_mask_add_epi32(cf, _mm512_cmpgt_epi32_mask(k, vnf), cf, one);
        cl = _mm512_mask_add_epi32(cl, at_lo, cl, one);
        ch = _mm512_mask_add_epi32(ch, at_hi, ch, one);
        _mm512_storeu_si512((void *)(out + w), _mm512_maskz_compress_epi32(inside, k));
        w += __builtin_popcount((unsigned)inside);
    }
    int64_t below = lanes_sum(cb), zeros = lanes_sum(cz), bad = lanes_sum(cf), nlo = lanes_sum(cl), nhi = lanes_sum(ch);
    for (; j < n; j++) { /* the last, partial block */
        int32_t key = x[j] & (int32_t)KEY_MASK;
        below += key < lo;
        zeros += key < zl;
        bad += key >= (int32_t)NONFINITE;
        nlo += key == lo;
        nhi += key == hi;
        out[w] = (uint32_t)key;
        w += (key > lo) & (key < hi);
    }
    c->below += below;
    c->zeros += zeros;
    c->nonfinite += bad;
    *el += nlo;
    *eh += nhi;
    return w;
}
#endif

#define CAND_SLACK (2 * BLOCK + 8) /* candidate buffers hold this many past the cap: whole blocks are written */
#define STRETCH 4096 /* entries per stretch: 16 KB, in L1 while its candidates are picked out */
#define HIST_BITS 12  /* a group's candidates are binned as they are found, in at most this many bins */
#define HIST_BINS (1 << HIST_BITS)

/* ---- select: the k-th smallest key of each group of pieces ----
 *
 * A group is a run of consecutive pieces with one k (a global cut: one group of all pieces;
 * per-tensor cuts: a group per piece). Every group is done in the same three stages, so one
 * call does all the cuts of a recipe:
 *   1. a bracket [lo, hi] per group from a sample (a small group is read whole: lo = hi = its
 *      exact k-th key);
 *   2. one read pass over everything: per piece, the keys below its group's lo, those equal to
 *      lo and to hi, zeros and non-finite entries; the keys strictly inside a bracket are kept
 *      (4 bytes each, about 1% of the entries) and binned;
 *   3. per group, the k-th key from those counts and the one bin holding it.
 * A group whose bracket missed (or whose kept keys overflowed) comes back unresolved; the
 * caller finds its cut the slow, exact way. */

#define SAMPLE_RUN 64 /* entries per sample block: 256 bytes, neighbours (mostly one page: one TLB miss) */
#define SAMPLE_EVERY 8192 /* a sample block per this many entries of a group, within: */
#define SAMPLE_BLOCKS_MIN 512
#define SAMPLE_BLOCKS_MAX 8192
#define SAMPLE_ALL 262144 /* a group up to this size is read whole */
#define SHARED_BLOCKS 4096 /* a group with this many sample blocks is sampled by all threads together */
#define SIGMAS 4.5 /* bracket half-width, in standard deviations of the sample's rank estimate */

typedef struct {
    Py_ssize_t first, last; /* its pieces */
    int64_t total, k;
    int64_t blocks;   /* sample blocks of SAMPLE_RUN entries; 0: the group is read whole */
    uint32_t lo, hi;  /* the bracket: keys in [lo, hi] are looked at closely */
    int shift;        /* candidates are binned by (key - lo) >> shift */
    int64_t bins, hist_at; /* that many bins, at this offset in each thread's histogram */
    int64_t expected; /* candidates expected */
    int defer;        /* keep no candidates: narrow the k-th key down to one bin only */
    /* the answer: found (key, and below_key entries below it), or pending (for a deferred
     * group: below_key entries below blo, inbin in [blo, bhi], the k-th among those) */
    int found, pending;
    uint32_t key, blo, bhi;
    int64_t below_key, inbin;
} Group;

static int64_t group_blocks(int64_t total) {
    if (total <= SAMPLE_ALL) return 0;
    int64_t b = total / SAMPLE_EVERY;
    return b < SAMPLE_BLOCKS_MIN ? SAMPLE_BLOCKS_MIN : (b > SAMPLE_BLOCKS_MAX ? SAMPLE_BLOCKS_MAX : b);
}

static int64_t sample_size(const Group *g) { return g->blocks ? g->blocks * SAMPLE_RUN : g->total; }

static uint32_t mix(uint64_t x) { /* splitmix64: a fixed jitter for sample positions (no RNG state touched) */
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return (uint32_t)(x ^ (x >> 31));
}

/* Where sample block blk of g starts, as an offset in the group: block blk lies in the
 * stretch [blk * total / blocks, (blk + 1) * total / blocks), at a fixed pseudo-random place;
 * the stretches cover the group, and each holds at least 4 blocks' worth of entries. */
static int64_t block_start(const Group *g, int64_t blk) {
    int64_t first = (int64_t)((double)blk * (double)g->total / (double)g->blocks);
    int64_t next = (int64_t)((double)(blk + 1) * (double)g->total / (double)g->blocks);
    if (next > g->total) next = g->total;
    if (first > next - SAMPLE_RUN) first = next - SAMPLE_RUN;
    return first + (int64_t)(mix((uint64_t)blk) % (uint64_t)(next - first - SAMPLE_RUN + 1));
}

/* Sample blocks [b0, b1) of g, into out + (blk - b0) * SAMPLE_RUN; or, for a group read whole
 * (b0 = 0, b1 = 1), all of it into out. */
static void sample_blocks(const Pieces *p, const Group *g, int64_t b0, int64_t b1, uint32_t *out) {
    const int64_t base = p->start[g->first];
    if (g->blocks == 0) {
        for (Py_ssize_t i = g->first; i < g->last; i++)
            for (int64_t j = 0; j < p->size[i]; j++) *out++ = p->ptr[i][j] & KEY_MASK;
        return;
    }
    if (b0 >= b1) return;
    Py_ssize_t i = piece_at(p, base + block_start(g, b0)), ahead = i;
    for (int64_t blk = b0; blk < b1; blk++) {
        if (blk + 8 < b1) { /* the block 8 ahead, fetched while this one is read */
            int64_t at = base + block_start(g, blk + 8);
            while (at >= p->start[ahead + 1]) ahead++;
            const uint32_t *x = p->ptr[ahead] + (at - p->start[ahead]);
            for (int line = 0; line < SAMPLE_RUN && at + line < p->start[ahead + 1]; line += 16) __builtin_prefetch(x + line);
        }
        int64_t pos = base + block_start(g, blk);
        while (pos >= p->start[i + 1]) i++;
        if (pos + SAMPLE_RUN <= p->start[i + 1]) { /* within one piece (nearly always) */
            const uint32_t *x = p->ptr[i] + (pos - p->start[i]);
            for (int j = 0; j < SAMPLE_RUN; j++) out[j] = x[j] & KEY_MASK;
        } else {
            Py_ssize_t h = i;
            for (int j = 0; j < SAMPLE_RUN; j++) {
                while (pos + j >= p->start[h + 1]) h++;
                out[j] = p->ptr[h][pos + j - p->start[h]] & KEY_MASK;
            }
        }
        out += SAMPLE_RUN;
    }
}

/* The key of the given rank (0-based) among n keys, whose top-16-bit histogram is top[]. */
static uint32_t rank_key(const uint32_t *keys, int64_t n, const uint32_t *top, int64_t rank, uint32_t *scratch, uint32_t *low) {
    uint32_t d = 0;
    while (rank >= (int64_t)top[d]) rank -= top[d++];
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) { /* the keys of bin d, without a branch */
        scratch[m] = keys[i];
        m += (keys[i] >> 16) == d;
    }
    if (m <= SMALL) return small_kth(scratch, m, rank);
    memset(low, 0, sizeof(uint32_t) << 16);
    for (int64_t i = 0; i < m; i++) low[scratch[i] & 0xffff]++;
    uint32_t e = 0;
    while (rank >= (int64_t)low[e]) rank -= low[e++];
    return (d << 16) | e;
}

/* The bracket of g from its sample: s keys (everything, for a group read whole); scratch has
 * room for s + 1 keys; top and low have 65536 bins each. */
static void bracket(Group *g, const uint32_t *sample, uint32_t *scratch, uint32_t *top, uint32_t *low) {
    const int64_t s = sample_size(g);
    memset(top, 0, sizeof(uint32_t) << 16);
    for (int64_t i = 0; i < s; i++) top[sample[i] >> 16]++;
    if (g->blocks == 0) { /* the whole group: its exact k-th key */
        g->lo = g->hi = rank_key(sample, s, top, g->k - 1, scratch, low);
        g->expected = 0;
        return;
    }
    double q = (double)g->k / (double)g->total;
    int64_t center = (int64_t)(q * (double)s);
    if (center >= s) center = s - 1;
    uint32_t guess = rank_key(sample, s, top, center, scratch, low);
    /* How far the estimate may be off. The sample is stratified (a block per stretch), so its
     * variance is the blocks' variance within their stretches: estimated from successive
     * differences of how many of each block's keys fall below the guess (neighbouring stretches
     * differ less than distant ones: layers of other scales are not counted as noise; rows of
     * alike values are). Never taken below the variance of as many independent keys. */
    double sum2 = 0;
    int prev = 0;
    for (int64_t blk = 0; blk < g->blocks; blk++) {
        int below_guess = 0;
        for (int j = 0; j < SAMPLE_RUN; j++) below_guess += sample[blk * SAMPLE_RUN + j] < guess;
        if (blk > 0) sum2 += (double)(below_guess - prev) * (double)(below_guess - prev);
        prev = below_guess;
    }
    double spread = sqrt((double)s * q * (1.0 - q)); /* in sample ranks */
    double stratified = g->blocks > 1 ? sqrt(sum2 / (2.0 * (double)(g->blocks - 1)) * (double)g->blocks) : 0;
    if (stratified > spread) spread = stratified;
    int64_t delta = (int64_t)(SIGMAS * spread) + SAMPLE_RUN;
    int64_t lo_rank = center - delta, hi_rank = center + delta;
    g->expected = (int64_t)((double)g->total * (double)(hi_rank - lo_rank) / (double)s);
    g->lo = lo_rank < 0 ? 0 : rank_key(sample, s, top, lo_rank, scratch, low);
    g->hi = hi_rank >= s ? KEY_MASK : rank_key(sample, s, top, hi_rank, scratch, low);
}

typedef struct {
    const Pieces *p;
    Group *groups;
    const Py_ssize_t *which; /* the groups this stage works on */
    uint32_t **sample, **scratch, **top, **low; /* [threads] */
} BracketCtx;

static void brackets_work(void *arg, int tid, int64_t a, int64_t b) { /* a group at a time, each on one thread */
    BracketCtx *c = arg;
    for (int64_t j = a; j < b; j++) {
        Group *g = c->groups + c->which[j];
        sample_blocks(c->p, g, 0, g->blocks ? g->blocks : 1, c->sample[tid]);
        bracket(g, c->sample[tid], c->scratch[tid], c->top[tid], c->low[tid]);
    }
}

typedef struct {
    const Pieces *p;
    const Group *g;
    uint32_t *out;
} SampleCtx;

static void sample_work(void *arg, int tid, int64_t a, int64_t b) { /* one group's blocks, shared out */
    SampleCtx *c = arg;
    (void)tid;
    sample_blocks(c->p, c->g, a, b, c->out + a * SAMPLE_RUN);
}

typedef struct {
    const Pieces *p;
    const Group *groups;
    const Py_ssize_t *group_of; /* [count]: each piece's group */
    uint32_t zero_below; /* keys below this count as zero */
    int64_t cap;         /* candidates each thread may keep */
    /* [threads][count]: */
    int64_t *below, *eq_lo, *eq_hi, *zeros, *nonfinite;
    int64_t *seg_begin, *seg_end; /* each piece's candidates in its thread's cand_key */
    int64_t *binned;              /* candidates binned (kept or not) */
    char *overflow;               /* candidates of the piece were dropped */
    uint32_t **cand_key; /* [threads][cap]: keys strictly inside their bracket */
    uint32_t **hist;     /* [threads][all groups' bins] */
} CountCtx;

/* stretch_scan without AVX2: a loop the compiler vectorizes (SSE2, NEON) counts and marks
 * the entries in [lo, hi] a byte each; then only words of marks with a mark set are looked
 * at (a few percent), entry by entry. (Per-block bit masks built by scalar code had made
 * this path 7-10x the floor.) */
static int64_t stretch_plain(const int32_t *x, int64_t m, int32_t lo, int32_t hi, int32_t zl, Counts *counts, uint32_t *out, int64_t room, int64_t *el,
                             int64_t *eh, int *over) {
    uint8_t hit[STRETCH + 8];
    int32_t below = 0, zeros = 0, bad = 0;
    for (int64_t h = 0; h < m; h += 256) {
        int64_t e = m - h < 256 ? m - h : 256;
        FETCH_1K(x + h, FETCH_READ);
        for (int64_t j = h; j < h + e; j++) {
            int32_t key = x[j] & (int32_t)KEY_MASK;
            below += key < lo;
            zeros += key < zl;
            bad += key >= (int32_t)NONFINITE;
            hit[j] = (uint8_t)((key >= lo) & (key <= hi));
        }
    }
    memset(hit + m, 0, 8);
    int64_t w = 0;
    for (int64_t j = 0; j < m; j += 8) {
        uint64_t word;
        memcpy(&word, hit + j, 8);
        if (!word) continue;
        for (int64_t q = j; q < j + 8 && q < m; q++) {
            if (!hit[q]) continue;
            int32_t key = x[q] & (int32_t)KEY_MASK;
            int is_lo = key == lo, is_hi = (key == hi) & !is_lo, inside = !(is_lo | is_hi); /* lo may equal hi */
            *el += is_lo;
            *eh += is_hi;
            if (w > room) { /* no room: dropped */
                *over |= inside;
                continue;
            }
            out[w] = (uint32_t)key;
            w += inside;
        }
    }
    counts->below += below;
    counts->zeros += zeros;
    counts->nonfinite += bad;
    return w;
}

/* One stretch of the count pass: adds the counts to `counts`, el and eh, and writes the keys
 * strictly inside (lo, hi) to out, returning how many. At most room + 1 are written (out has
 * CAND_SLACK more than room); past that, *over is set and counting goes on. */
static int64_t stretch_scan(const int32_t *x, int64_t m, int32_t lo, int32_t hi, int32_t zl, Counts *counts, uint32_t *out, int64_t room, int64_t *el,
                            int64_t *eh, int *over) {
#ifdef HAVE_AVX512_PATH
    if (use_avx512 && lo < hi && m <= room) return stretch_avx512(x, m, lo, hi, zl, counts, out, el, eh);
#endif
#ifdef HAVE_AVX2_PATH
    if (use_avx2) { /* 16-entry blocks tested with compares and a movemask; those holding a key in [lo, hi] revisited */
        uint32_t blk[STRETCH / BLOCK], msk[STRETCH / BLOCK];
        int64_t nb = blocks_avx2(x, m, lo, hi, zl, counts, blk, msk), first = 0, w = 0; /* first: the blocks still to look at */
        if (lo < hi && nb * BLOCK <= room + BLOCK) { /* writes stay within the slack */
            first = nb > 0 && blk[nb - 1] + BLOCK > m ? nb - 1 : nb; /* a partial last block: below */
            w = extract_avx2(x, blk, first, lo, hi, out, el, eh);
        }
        for (int64_t q = first; q < nb; q++) {
            const int32_t *y = x + blk[q];
            for (uint32_t bits = msk[q]; bits; bits &= bits - 1) { /* no branch on the key: lo, hi or between */
                int32_t key = y[__builtin_ctz(bits)] & (int32_t)KEY_MASK;
                int is_lo = key == lo, is_hi = (key == hi) & !is_lo; /* lo may equal hi */
                int inside = !(is_lo | is_hi);
                *el += is_lo;
                *eh += is_hi;
                if (w > room) { /* no room: dropped */
                    *over |= inside;
                    continue;
                }
                out[w] = (uint32_t)key;
                w += inside;
            }
        }
        return w;
    }
#endif
    return stretch_plain(x, m, lo, hi, zl, counts, out, room, el, eh, over);
}

static void count_work(void *arg, int tid, int64_t a, int64_t b) {
    CountCtx *c = arg;
    const Py_ssize_t np = c->p->count;
    const size_t row = (size_t)tid * np;
    uint32_t *ck = c->cand_key[tid];
    uint32_t local[STRETCH + CAND_SLACK]; /* a deferred group's candidates: binned, then dropped */
    const int32_t zl = (int32_t)c->zero_below;
    int64_t nc = 0;
    FOR_SEGMENTS(c->p, a, b, {
        const Group *g = c->groups + c->group_of[piece];
        const int32_t lo = (int32_t)g->lo, hi = (int32_t)g->hi;
        const int shift = g->shift, keep = !g->defer;
        uint32_t *hist = c->hist[tid] + g->hist_at;
        const int32_t *x = (const int32_t *)c->p->ptr[piece] + from;
        int64_t n = to - from, el = 0, eh = 0;
        int over = 0;
        Counts counts = {0, 0, 0};
        c->seg_begin[row + piece] = nc; /* a thread sees each piece in one stretch at most */
        for (int64_t s = 0; s < n; s += STRETCH) {
            int64_t m = n - s < STRETCH ? n - s : STRETCH;
            /* kept candidates: up to the cap (past it counting goes on, and the counts stay whole) */
            uint32_t *out = keep ? ck + nc : local;
            int64_t room = keep ? c->cap - nc : STRETCH;
            int64_t got = stretch_scan(x + s, m, lo, hi, zl, &counts, out, room, &el, &eh, &over);
            for (int64_t j = 0; j < got; j++) hist[(out[j] - (uint32_t)lo) >> shift]++;
            if (keep) nc += got;
            c->binned[row + piece] += got;
        }
        c->below[row + piece] += counts.below;
        c->zeros[row + piece] += counts.zeros;
        c->nonfinite[row + piece] += counts.nonfinite;
        c->eq_lo[row + piece] += el;
        c->eq_hi[row + piece] += eh;
        c->overflow[row + piece] |= (char)over;
        c->seg_end[row + piece] = nc;
    });
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

typedef struct {
    CountCtx *c;
    Group *groups;
    int threads; /* of the count pass */
    int64_t *ties, *split; /* [count] */
    uint32_t **low;        /* [threads of this stage]: 65536 bins each */
} ResolveCtx;

/* Sum over the count pass's threads of one per-piece counter, for g's pieces. */
static int64_t group_sum(const ResolveCtx *r, const int64_t *counter, const Group *g) {
    int64_t sum = 0;
    const Py_ssize_t np = r->c->p->count;
    for (int t = 0; t < r->threads; t++)
        for (Py_ssize_t i = g->first; i < g->last; i++) sum += counter[(size_t)t * np + i];
    return sum;
}

static void resolve_group(ResolveCtx *r, Group *g, uint32_t *low) {
    const CountCtx *c = r->c;
    const Py_ssize_t np = c->p->count;
    const int T = r->threads;
    const int64_t k = g->k;
    int64_t below = group_sum(r, c->below, g), eq_lo = group_sum(r, c->eq_lo, g), eq_hi = group_sum(r, c->eq_hi, g);
    int64_t ncand = 0; /* the candidates binned (for a kept group with an overflow, fewer than there were) */
    int overflow = 0;
    for (int t = 0; t < T; t++) {
        int64_t binned = 0; /* a thread's bins count in 32 bits: past that they wrapped (a deferred group) */
        for (Py_ssize_t i = g->first; i < g->last; i++) {
            overflow |= c->overflow[(size_t)t * np + i];
            binned += c->binned[(size_t)t * np + i];
        }
        overflow |= binned > (int64_t)UINT32_MAX;
        ncand += binned;
    }
    int64_t *ties = r->ties;
    g->found = 0;
    if (below >= k) {
        /* below the bracket: unresolved */
    } else if (below + eq_lo >= k) {
        g->found = 1;
        g->key = g->lo;
        g->below_key = below;
        for (Py_ssize_t i = g->first; i < g->last; i++)
            for (int t = 0; t < T; t++) ties[i] += c->eq_lo[(size_t)t * np + i];
    } else if (below + eq_lo + ncand >= k) {
        if (overflow) return;
        /* the bin of the candidates' histogram holding it, then that bin's keys */
        int64_t rank = k - below - eq_lo, before = 0, d = 0, in_bin = 0;
        for (;; d++) {
            in_bin = 0;
            for (int t = 0; t < T; t++) in_bin += c->hist[t][g->hist_at + d];
            if (before + in_bin >= rank) break;
            before += in_bin;
        }
        if (g->defer) { /* pending: the bin's keys are met again in the fold */
            uint32_t first = g->lo + ((uint32_t)d << g->shift), last = first + ((1u << g->shift) - 1);
            g->pending = 1;
            g->blo = first > g->lo ? first : g->lo + 1; /* keys equal to lo or hi are binned apart */
            g->bhi = last < g->hi ? last : g->hi - 1;
            g->below_key = below + eq_lo + before;
            g->inbin = in_bin;
            return;
        }
        uint32_t *keys = scratch_alloc(sizeof(uint32_t) * (size_t)(in_bin * 3 + 1));
        if (!keys) return; /* unresolved: the caller's exact path */
        uint32_t *bin_piece = keys + 2 * in_bin;
        int64_t w = 0;
        for (int t = 0; t < T; t++)
            for (Py_ssize_t i = g->first; i < g->last; i++)
                for (int64_t j = c->seg_begin[(size_t)t * np + i]; j < c->seg_end[(size_t)t * np + i]; j++)
                    if (((c->cand_key[t][j] - g->lo) >> g->shift) == (uint32_t)d) {
                        bin_piece[w] = (uint32_t)i;
                        keys[w++] = c->cand_key[t][j];
                    }
        g->found = 1;
        g->key = g->shift == 0 ? g->lo + (uint32_t)d : kth_key(keys, in_bin, rank - before - 1, keys + in_bin, low);
        g->below_key = below + eq_lo + before;
        for (int64_t j = 0; j < in_bin; j++) {
            if (keys[j] < g->key) g->below_key++;
            else if (keys[j] == g->key) ties[bin_piece[j]]++;
        }
        scratch_free(keys);
    } else if (!overflow && below + eq_lo + ncand + eq_hi >= k) {
        g->found = 1;
        g->key = g->hi;
        g->below_key = below + eq_lo + ncand;
        for (Py_ssize_t i = g->first; i < g->last; i++)
            for (int t = 0; t < T; t++) ties[i] += c->eq_hi[(size_t)t * np + i];
    }
    if (!g->found) return;
    /* Ties split by count, earliest first, piece by piece (the caller's quotas), and where each
     * piece's share ends, so a fold can prune <= key before that and < key after it, in
     * parallel. A piece whose ties are all taken ends at its end; at most one takes part of
     * its ties, and is searched for its share's last one. */
    int64_t left = k - g->below_key;
    for (Py_ssize_t i = g->first; i < g->last && left > 0; i++) {
        int64_t take = ties[i] < left ? ties[i] : left;
        left -= take;
        if (take > 0) r->split[i] = take == ties[i] ? c->p->size[i] - 1 : nth_tie((const int32_t *)c->p->ptr[i], c->p->size[i], (int32_t)g->key, take);
    }
}

static void resolve_work(void *arg, int tid, int64_t a, int64_t b) {
    ResolveCtx *r = arg;
    for (int64_t j = a; j < b; j++) resolve_group(r, r->groups + j, r->low[tid]);
}

static int stage_threads(long threads, int64_t jobs) { /* threads for a stage of `jobs` separate jobs */
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    return (int)(jobs < threads ? (jobs < 1 ? 1 : jobs) : threads);
}

typedef struct {
    long long lo, hi, cap; /* tests: a given bracket for every group, and a cap; -1: none */
    long long defer_above; /* groups of more entries than this keep no candidates; -1: none */
} Forced;

/* All three stages, with the GIL released. Fills the groups' answers and, per piece, ties at
 * its group's key, zeros, non-finite entries and splits (-1 for none). Returns 0, or -1 when
 * memory for scratch could not be had (nothing is answered then). */
static int select_groups_core(const Pieces *p, Group *groups, Py_ssize_t G, const Py_ssize_t *group_of, long threads, uint32_t zero_below,
                              Forced force, int64_t *ties, int64_t *zeros, int64_t *bad, int64_t *split) {
    const Py_ssize_t np = p->count;
    const int64_t total = p->start[np];
    const int T = clamp_threads(threads, total); /* of the count pass */
    const int TB = stage_threads(threads, G);    /* of the per-group stages */
    int rc = -1;
    Py_ssize_t *shared = malloc(sizeof(Py_ssize_t) * (size_t)(G + 1)), *alone = malloc(sizeof(Py_ssize_t) * (size_t)(G + 1));
    uint32_t *sample = NULL, *scratch = NULL;
    BracketCtx bc;
    memset(&bc, 0, sizeof(bc));
    CountCtx c;
    memset(&c, 0, sizeof(c));
    size_t per = (size_t)T * (size_t)(np + 1);
    c.below = calloc(per, sizeof(int64_t));
    c.eq_lo = calloc(per, sizeof(int64_t));
    c.eq_hi = calloc(per, sizeof(int64_t));
    c.zeros = calloc(per, sizeof(int64_t));
    c.nonfinite = calloc(per, sizeof(int64_t));
    c.seg_begin = calloc(per, sizeof(int64_t));
    c.seg_end = calloc(per, sizeof(int64_t));
    c.binned = calloc(per, sizeof(int64_t));
    c.overflow = calloc(per, 1);
    c.cand_key = calloc(T, sizeof(uint32_t *));
    c.hist = calloc(T, sizeof(uint32_t *));
    bc.sample = calloc(TB, sizeof(uint32_t *));
    bc.scratch = calloc(TB, sizeof(uint32_t *));
    bc.top = calloc(TB, sizeof(uint32_t *));
    bc.low = calloc(TB, sizeof(uint32_t *));
    if (!shared || !alone || !c.below || !c.eq_lo || !c.eq_hi || !c.zeros || !c.nonfinite || !c.seg_begin || !c.seg_end || !c.binned || !c.overflow ||
        !c.cand_key || !c.hist || !bc.sample || !bc.scratch || !bc.top || !bc.low)
        goto done;

    /* 1. Brackets: groups with many sample blocks are sampled by all threads together, one
     *    after another; the others a group at a time per thread. */
    Py_ssize_t nshared = 0, nalone = 0;
    int64_t alone_max = 1, shared_max = 1;
    for (Py_ssize_t j = 0; j < G; j++) {
        Group *g = groups + j;
        g->blocks = group_blocks(g->total);
        g->defer = force.defer_above >= 0 && g->total > force.defer_above;
        if (force.lo >= 0) continue;
        int64_t s = sample_size(g);
        if (g->blocks >= SHARED_BLOCKS && threads > 1) {
            shared[nshared++] = j;
            if (s > shared_max) shared_max = s;
        } else {
            alone[nalone++] = j;
            if (s > alone_max) alone_max = s;
        }
    }
    for (int t = 0; t < TB; t++) { /* untouched pages of these cost nothing */
        bc.sample[t] = scratch_alloc(sizeof(uint32_t) * (size_t)alone_max);
        bc.scratch[t] = scratch_alloc(sizeof(uint32_t) * (size_t)(alone_max + 1));
        bc.top[t] = malloc(sizeof(uint32_t) << 16);
        bc.low[t] = malloc(sizeof(uint32_t) << 16);
        if (!bc.sample[t] || !bc.scratch[t] || !bc.top[t] || !bc.low[t]) goto done;
    }
    bc.p = p;
    bc.groups = groups;
    if (nshared > 0) {
        sample = scratch_alloc(sizeof(uint32_t) * (size_t)shared_max);
        scratch = scratch_alloc(sizeof(uint32_t) * (size_t)(shared_max + 1));
        if (!sample || !scratch) goto done;
        for (Py_ssize_t j = 0; j < nshared; j++) {
            Group *g = groups + shared[j];
            SampleCtx sc = {p, g, sample};
            run_parallel(stage_threads(threads, g->blocks), sample_work, &sc, g->blocks); /* latency-bound reads: spread out */
            bracket(g, sample, scratch, bc.top[0], bc.low[0]);
        }
    }
    if (nalone > 0) {
        bc.which = alone;
        run_parallel(stage_threads(threads, nalone), brackets_work, &bc, nalone);
    }
    int64_t bins_total = 0, cap = 1 << 16;
    for (Py_ssize_t j = 0; j < G; j++) {
        Group *g = groups + j;
        if (force.lo >= 0) {
            g->lo = (uint32_t)force.lo;
            g->hi = (uint32_t)force.hi;
            g->expected = g->total;
        }
        /* bins: about 16 expected candidates each, at most HIST_BINS */
        g->bins = 1;
        while (g->bins < HIST_BINS && g->bins * 16 < g->expected) g->bins <<= 1;
        uint32_t span = g->hi - g->lo;
        g->shift = 0;
        while ((span >> g->shift) >= (uint32_t)g->bins) g->shift++;
        g->hist_at = bins_total;
        bins_total += g->bins;
        if (!g->defer) cap += 4 * g->expected;
    }
    /* 2. One pass: per piece, count below lo, at lo and at hi; keep the keys strictly between
     *    (up to a cap: past it only the counts go on); count zeros and non-finite entries. */
    if (force.cap >= 0) cap = force.cap;
    if (cap > total) cap = total;
    if (cap > INT32_MAX) cap = INT32_MAX; /* histogram counts are 32-bit */
    c.cap = cap;
    c.p = p;
    c.groups = groups;
    c.group_of = group_of;
    c.zero_below = zero_below;
    for (int t = 0; t < T; t++) {
        c.cand_key[t] = scratch_alloc(sizeof(uint32_t) * (size_t)(cap + CAND_SLACK));
        c.hist[t] = scratch_alloc(sizeof(uint32_t) * (size_t)bins_total); /* zero-filled */
        if (!c.cand_key[t] || !c.hist[t]) goto done;
    }
    run_parallel(T, count_work, &c, total);
    for (Py_ssize_t i = 0; i < np; i++)
        for (int t = 0; t < T; t++) {
            zeros[i] += c.zeros[(size_t)t * np + i];
            bad[i] += c.nonfinite[(size_t)t * np + i];
        }
    /* 3. Each group's k-th key; unresolved where it fell outside the bracket, or among more
     *    candidates than were kept, or no scratch was had (the caller's exact path then). */
    ResolveCtx r = {&c, groups, T, ties, split, bc.low};
    run_parallel(TB, resolve_work, &r, G);
    rc = 0;
done:
    for (int t = 0; c.cand_key && t < T; t++) scratch_free(c.cand_key[t]);
    for (int t = 0; c.hist && t < T; t++) scratch_free(c.hist[t]);
    for (int t = 0; bc.sample && t < TB; t++) {
        scratch_free(bc.sample[t]);
        scratch_free(bc.scratch[t]);
        free(bc.top[t]);
        free(bc.low[t]);
    }
    free(bc.sample);
    free(bc.scratch);
    free(bc.top);
    free(bc.low);
    free(c.cand_key);
    free(c.hist);
    free(c.below);
    free(c.eq_lo);
    free(c.eq_hi);
    free(c.zeros);
    free(c.nonfinite);
    free(c.seg_begin);
    free(c.seg_end);
    free(c.binned);
    free(c.overflow);
    scratch_free(sample);
    scratch_free(scratch);
    free(shared);
    free(alone);
    return rc;
}

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

/* Group j of G holds tensors [first, end): ends rise and the last is the tensor count. Marks
 * the group's tensors in group_of; else sets ValueError and returns -1. (select_groups and
 * fold_pending take groups alike.) */
static int take_group(long long end, Py_ssize_t first, Py_ssize_t j, Py_ssize_t G, Py_ssize_t np, Py_ssize_t *group_of) {
    if (end <= first || end > np || (j == G - 1 && end != np)) {
        PyErr_SetString(PyExc_ValueError, "group ends must rise, each group holding a tensor, and the last must be the tensor count");
        return -1;
    }
    for (Py_ssize_t i = first; i < end; i++) group_of[i] = j;
    return 0;
}

/* Shared by select and select_groups: parses, runs, and builds
 * (keys, belows, ties, zeros, nonfinite, splits); keys and belows per group (None where
 * unresolved), the rest per piece. */
static PyObject *select_common(PyObject *ptrs, PyObject *sizes, PyObject *ends, PyObject *ks, long threads, long long zero_below, Forced force) {
    if (!zero_below_ok(zero_below)) return NULL;
    if (force.lo >= 0 && !(force.hi >= force.lo && force.hi <= (long long)KEY_MASK)) force.lo = force.hi = -1;
    Pieces p;
    if (pieces_parse(ptrs, sizes, &p) < 0) return NULL;
    const Py_ssize_t np = p.count;
    PyObject *result = NULL, *fe = NULL, *fk = NULL;
    Group *groups = NULL;
    Py_ssize_t *group_of = malloc(sizeof(Py_ssize_t) * (size_t)(np + 1));
    int64_t *per_piece = calloc((size_t)4 * (np + 1), sizeof(int64_t)); /* ties, zeros, non-finite, splits */
    if (!group_of || !per_piece) {
        PyErr_NoMemory();
        goto done;
    }
    fe = PySequence_Fast(ends, "ends must be a sequence");
    fk = fe ? PySequence_Fast(ks, "ks must be a sequence") : NULL;
    if (!fk) goto done;
    const Py_ssize_t G = PySequence_Fast_GET_SIZE(fe);
    if (PySequence_Fast_GET_SIZE(fk) != G || G < 1) {
        PyErr_SetString(PyExc_ValueError, "ends and ks must have one entry per group, and there must be a group");
        goto done;
    }
    groups = calloc((size_t)G, sizeof(Group));
    if (!groups) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t first = 0;
    for (Py_ssize_t j = 0; j < G; j++) {
        long long end = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fe, j)), k = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fk, j));
        if (PyErr_Occurred() || take_group(end, first, j, G, np, group_of) < 0) goto done;
        Group *g = groups + j;
        g->first = first;
        g->last = (Py_ssize_t)end;
        g->total = p.start[end] - p.start[first];
        g->k = k;
        if (k < 1 || k > g->total) {
            PyErr_SetString(PyExc_ValueError, "k must be in [1, total entries] of its group");
            goto done;
        }
        first = (Py_ssize_t)end;
    }
    int64_t *ties = per_piece, *zeros = per_piece + (np + 1), *bad = per_piece + 2 * (np + 1), *split = per_piece + 3 * (np + 1);
    for (Py_ssize_t i = 0; i < np; i++) split[i] = -1;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = select_groups_core(&p, groups, G, group_of, threads, (uint32_t)zero_below, force, ties, zeros, bad, split);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject *keys = PyList_New(G), *belows = PyList_New(G);
    PyObject *t_list = int_list(ties, np), *z_list = int_list(zeros, np), *f_list = int_list(bad, np), *s_list = int_list(split, np);
    int ok = keys && belows && t_list && z_list && f_list && s_list;
    for (Py_ssize_t j = 0; ok && j < G; j++) {
        const Group *g = groups + j;
        PyObject *key = g->found ? PyLong_FromUnsignedLong(g->key)
                        : g->pending ? Py_BuildValue("(kkL)", (unsigned long)g->blo, (unsigned long)g->bhi, (long long)g->inbin)
                                     : (Py_INCREF(Py_None), Py_None);
        PyObject *below = g->found || g->pending ? PyLong_FromLongLong(g->below_key) : (Py_INCREF(Py_None), Py_None);
        if (!key || !below) ok = 0;
        if (key) PyList_SET_ITEM(keys, j, key);
        if (below) PyList_SET_ITEM(belows, j, below);
    }
    if (ok) result = PyTuple_Pack(6, keys, belows, t_list, z_list, f_list, s_list);
    Py_XDECREF(keys);
    Py_XDECREF(belows);
    Py_XDECREF(t_list);
    Py_XDECREF(z_list);
    Py_XDECREF(f_list);
    Py_XDECREF(s_list);
done:
    Py_XDECREF(fe);
    Py_XDECREF(fk);
    free(groups);
    free(group_of);
    free(per_piece);
    pieces_free(&p);
    return result;
}

static PyObject *py_select_groups(PyObject *self, PyObject *args) {
    PyObject *ptrs, *sizes, *ends, *ks;
    long threads;
    long long zero_below;
    Forced force = {-1, -1, -1, -1};
    if (!PyArg_ParseTuple(args, "OOOOlL|LLLL", &ptrs, &sizes, &ends, &ks, &threads, &zero_below, &force.lo, &force.hi, &force.cap, &force.defer_above))
        return NULL;
    return select_common(ptrs, sizes, ends, ks, threads, zero_below, force);
}

static PyObject *py_select(PyObject *self, PyObject *args) {
    PyObject *ptrs, *sizes;
    long long k;
    long threads;
    long long zero_below;
    Forced force = {-1, -1, -1, -1};
    if (!PyArg_ParseTuple(args, "OOLlL|LLL", &ptrs, &sizes, &k, &threads, &zero_below, &force.lo, &force.hi, &force.cap)) return NULL;
    Py_ssize_t np = PySequence_Size(ptrs);
    if (np < 0) return NULL;
    if (np == 0) {
        PyErr_SetString(PyExc_ValueError, "k must be in [1, total entries]");
        return NULL;
    }
    PyObject *ends = Py_BuildValue("[n]", np), *ks = Py_BuildValue("[L]", k);
    PyObject *out = ends && ks ? select_common(ptrs, sizes, ends, ks, threads, zero_below, force) : NULL;
    Py_XDECREF(ends);
    Py_XDECREF(ks);
    if (!out) return NULL;
    /* (key, below, ties, zeros, nonfinite, splits); key, below, ties, splits None when unresolved */
    PyObject *key = PyList_GET_ITEM(PyTuple_GET_ITEM(out, 0), 0), *below = PyList_GET_ITEM(PyTuple_GET_ITEM(out, 1), 0);
    PyObject *result;
    if (key == Py_None)
        result = PyTuple_Pack(6, Py_None, Py_None, Py_None, PyTuple_GET_ITEM(out, 3), PyTuple_GET_ITEM(out, 4), Py_None);
    else
        result = PyTuple_Pack(6, key, below, PyTuple_GET_ITEM(out, 2), PyTuple_GET_ITEM(out, 3), PyTuple_GET_ITEM(out, 4), PyTuple_GET_ITEM(out, 5));
    Py_DECREF(out);
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
        for (int64_t h = 0; h < m; h += 256) {
            int64_t e = m - h < 256 ? m - h : 256;
            FETCH_1K(x + s + h, FETCH_WRITE);
            for (int64_t j = h; j < h + e; j++) {
                int32_t bits;
                memcpy(&bits, x + s + j, 4);
                float r = x[s + j] * (float)(((bits & (int32_t)KEY_MASK) >= c) & !all);
                x[s + j] = r;
                memcpy(&bits, &r, 4);
                zc += (bits & (int32_t)KEY_MASK) < zl;
            }
        }
        z += zc;
    }
    return z;
}

/* The same, for a pending cut: keys below cut pruned, and the keys in [cut, cut + width]
 * (kept, for now) counted into *in_bin. */
static inline __attribute__((always_inline)) int64_t fold_bin_body(float *x, int64_t n, uint32_t cut, uint32_t width, int32_t zl, int64_t *in_bin) {
    const int32_t c = (int32_t)cut, h = (int32_t)(cut + width); /* cut <= cut + width < 2^31 */
    int64_t z = 0, seen = 0;
    for (int64_t s = 0; s < n; s += 4096) {
        int64_t m = n - s < 4096 ? n - s : 4096;
        int32_t zc = 0, bc = 0;
        for (int64_t q = 0; q < m; q += 256) {
            int64_t e = m - q < 256 ? m - q : 256;
            FETCH_1K(x + s + q, FETCH_WRITE);
            for (int64_t j = q; j < q + e; j++) {
                int32_t bits;
                memcpy(&bits, x + s + j, 4);
                int32_t key = bits & (int32_t)KEY_MASK, keep = key >= c;
                float r = x[s + j] * (float)keep;
                bc += keep & (key <= h);
                x[s + j] = r;
                memcpy(&bits, &r, 4);
                zc += (bits & (int32_t)KEY_MASK) < zl;
            }
        }
        z += zc;
        seen += bc;
    }
    *in_bin += seen;
    return z;
}

static int64_t fold_range_generic(float *x, int64_t n, uint32_t cut, int32_t zl) { return fold_range_body(x, n, cut, zl); }
static int64_t fold_bin_generic(float *x, int64_t n, uint32_t cut, uint32_t width, int32_t zl, int64_t *in_bin) {
    return fold_bin_body(x, n, cut, width, zl, in_bin);
}
#ifdef HAVE_AVX2_PATH
__attribute__((target("avx2"))) static int64_t fold_range_avx2(float *x, int64_t n, uint32_t cut, int32_t zl) {
    return fold_range_body(x, n, cut, zl);
}
__attribute__((target("avx2"))) static int64_t fold_bin_avx2(float *x, int64_t n, uint32_t cut, uint32_t width, int32_t zl, int64_t *in_bin) {
    return fold_bin_body(x, n, cut, width, zl, in_bin);
}
#endif

static int64_t fold_range(float *x, int64_t n, uint32_t cut, int32_t zl) {
#ifdef HAVE_AVX2_PATH
    if (use_avx2) return fold_range_avx2(x, n, cut, zl);
#endif
    return fold_range_generic(x, n, cut, zl);
}

static int64_t fold_bin(float *x, int64_t n, uint32_t cut, uint32_t width, int32_t zl, int64_t *in_bin) {
#ifdef HAVE_AVX2_PATH
    if (use_avx2) return fold_bin_avx2(x, n, cut, width, zl, in_bin);
#endif
    return fold_bin_generic(x, n, cut, width, zl, in_bin);
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

/* A fold raises MemoryError only before it writes (the caller may then take another path);
 * failing to build its answer after the weights were written is told apart. */
static void written_but_lost(void) {
    PyErr_Clear();
    PyErr_SetString(PyExc_RuntimeError, "the weights were masked, but there was no memory left to report their zero counts");
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
    if (!result) written_but_lost();
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

/* ---- fold_pending: the fold of groups whose k-th key is known only to within one bin ----
 *
 * For a group left pending by select_groups (below: entries under blo; inbin: entries in
 * [blo, bhi]; the k-th smallest among those): one read/write pass prunes every key below blo
 * and notes each entry in [blo, bhi] (a few per group: 16 B each, room reserved before the
 * first write, so nothing can fail halfway); then, per group, the k-th key is found among the
 * noted ones, and those below it are pruned, with its ties pruned earliest first. The result
 * is what a fold at the exact cut would leave, bit for bit. */

typedef struct {
    uint32_t key;
    uint32_t piece;
    int64_t pos;
} Noted;

typedef struct {
    const Pieces *p;
    const Py_ssize_t *group_of;
    const uint32_t *blo, *bhi; /* [groups] */
    uint32_t zero_below;
    int64_t *zeros;  /* [threads][count] */
    Noted **noted;   /* [threads][room] */
    int64_t *nnoted; /* [threads] */
    int64_t room;
} PendingCtx;

static void pending_work(void *arg, int tid, int64_t a, int64_t b) {
    PendingCtx *c = arg;
    int64_t *zeros = c->zeros + (size_t)tid * c->p->count;
    Noted *noted = c->noted[tid];
    int64_t n_noted = 0;
    const int32_t zl = (int32_t)c->zero_below;
    FOR_SEGMENTS(c->p, a, b, {
        const Py_ssize_t g = c->group_of[piece];
        const uint32_t lo = c->blo[g], width = c->bhi[g] - c->blo[g];
        float *x = (float *)c->p->ptr[piece];
        for (int64_t s = from; s < to; s += STRETCH) {
            int64_t m = to - s < STRETCH ? to - s : STRETCH, in_bin = 0;
            zeros[piece] += fold_bin(x + s, m, lo, width, zl, &in_bin); /* keys in the bin stay, for now */
            const uint32_t *y = (const uint32_t *)(x + s);
            for (int64_t j = 0; in_bin > 0 && j < m; j++) { /* rare: noted while the stretch is in cache */
                uint32_t key = y[j] & KEY_MASK;
                if (key - lo <= width) {
                    in_bin--;
                    if (n_noted < c->room) noted[n_noted++] = (Noted){key, (uint32_t)piece, s + j};
                }
            }
        }
    });
    c->nnoted[tid] = n_noted;
}

static PyObject *py_fold_pending(PyObject *self, PyObject *args) {
    PyObject *ptrs, *sizes, *ends, *ks, *blos, *bhis, *belows, *inbins;
    long threads;
    long long zero_below;
    if (!PyArg_ParseTuple(args, "OOOOOOOOlL", &ptrs, &sizes, &ends, &ks, &blos, &bhis, &belows, &inbins, &threads, &zero_below)) return NULL;
    if (!zero_below_ok(zero_below)) return NULL;
    Pieces p;
    if (pieces_parse(ptrs, sizes, &p) < 0) return NULL;
    const Py_ssize_t np = p.count;
    PyObject *result = NULL, *seq[6] = {NULL, NULL, NULL, NULL, NULL, NULL};
    PyObject *const given[6] = {ends, ks, blos, bhis, belows, inbins};
    int T = clamp_threads(threads, p.start[np]);
    Py_ssize_t G = 0;
    Py_ssize_t *group_of = malloc(sizeof(Py_ssize_t) * (size_t)(np + 1));
    int64_t *k = NULL, *below = NULL;
    uint32_t *blo = NULL, *bhi = NULL, *key = NULL, *sorted = NULL, *hist = NULL;
    Noted *merged = NULL;
    PendingCtx c;
    memset(&c, 0, sizeof(c));
    c.zeros = calloc((size_t)T * (np + 1), sizeof(int64_t));
    c.noted = calloc(T, sizeof(Noted *));
    c.nnoted = calloc(T, sizeof(int64_t));
    if (!group_of || !c.zeros || !c.noted || !c.nnoted) {
        PyErr_NoMemory();
        goto done;
    }
    for (int i = 0; i < 6; i++)
        if (!(seq[i] = PySequence_Fast(given[i], "ends, ks, blos, bhis, belows and inbins must be sequences"))) goto done;
    G = PySequence_Fast_GET_SIZE(seq[0]);
    for (int i = 1; i < 6; i++)
        if (PySequence_Fast_GET_SIZE(seq[i]) != G) G = -1;
    if (G < 1) {
        PyErr_SetString(PyExc_ValueError, "ends, ks, blos, bhis, belows and inbins must have one entry per group, and there must be a group");
        goto done;
    }
    k = malloc(sizeof(int64_t) * (size_t)G);
    below = malloc(sizeof(int64_t) * (size_t)G);
    blo = malloc(sizeof(uint32_t) * (size_t)G);
    bhi = malloc(sizeof(uint32_t) * (size_t)G);
    key = malloc(sizeof(uint32_t) * (size_t)G);
    if (!k || !below || !blo || !bhi || !key) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t room = 0, first = 0;
    for (Py_ssize_t j = 0; j < G; j++) {
        long long end = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq[0], j));
        k[j] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq[1], j));
        long long lo = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq[2], j)), hi = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq[3], j));
        below[j] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq[4], j));
        long long inbin = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq[5], j));
        if (PyErr_Occurred() || take_group(end, (Py_ssize_t)first, j, G, np, group_of) < 0) goto done;
        int64_t total = p.start[end] - p.start[first];
        if (lo < 1 || hi < lo || hi > (long long)KEY_MASK || below[j] < 0 || k[j] <= below[j] || k[j] > total || inbin < k[j] - below[j] ||
            inbin > total - below[j]) {
            PyErr_SetString(PyExc_ValueError, "bad group: 1 <= blo <= bhi < 2**31, below < k <= below + inbin <= entries");
            goto done;
        }
        blo[j] = (uint32_t)lo;
        bhi[j] = (uint32_t)hi;
        room += inbin;
        first = end;
    }
    /* Room for the entries the select counted in the bins; all of it is had before the first
     * write. (Should the weights have changed since, the pass notes no more than this, and
     * prunes what it noted.) */
    c.room = room;
    for (int t = 0; t < T; t++) {
        c.noted[t] = scratch_alloc(sizeof(Noted) * (size_t)(room + 1));
        if (!c.noted[t]) {
            PyErr_NoMemory();
            goto done;
        }
    }
    merged = scratch_alloc(sizeof(Noted) * (size_t)(room + 1));
    sorted = scratch_alloc(sizeof(uint32_t) * (size_t)(room + 1) * 2);
    hist = malloc(sizeof(uint32_t) << 16);
    if (!merged || !sorted || !hist) {
        PyErr_NoMemory();
        goto done;
    }
    c.p = &p;
    c.group_of = group_of;
    c.blo = blo;
    c.bhi = bhi;
    c.zero_below = (uint32_t)zero_below;
    Py_BEGIN_ALLOW_THREADS run_parallel(T, pending_work, &c, p.start[np]);
    /* The noted entries in order: threads hold ascending stretches, so by piece, hence by group. */
    int64_t n_all = 0;
    for (int t = 0; t < T; t++)
        for (int64_t q = 0; q < c.nnoted[t] && n_all < room; q++) merged[n_all++] = c.noted[t][q];
    /* Per group: the k-th key among its noted entries; those below it pruned, and its ties
     * earliest first as far as the count asks. */
    int64_t at = 0;
    for (Py_ssize_t j = 0; j < G; j++) {
        int64_t from = at;
        while (at < n_all && group_of[merged[at].piece] == j) at++;
        int64_t n = at - from;
        for (int64_t q = 0; q < n; q++) sorted[q] = merged[from + q].key;
        int64_t rank = k[j] - below[j]; /* 1-based, among the noted */
        if (rank > n) rank = n; /* only if the weights changed since the select */
        key[j] = n > 0 ? kth_key(sorted, n, rank - 1, sorted + n, hist) : blo[j];
        int64_t lt = 0;
        for (int64_t q = 0; q < n; q++) lt += sorted[q] < key[j];
        int64_t ties = rank - lt; /* equal to the key, to be pruned: the earliest */
        for (int64_t q = from; q < at; q++) {
            const Noted *e = merged + q;
            if (e->key > key[j] || (e->key == key[j] && ties-- <= 0)) continue;
            float *x = (float *)p.ptr[e->piece] + e->pos;
            *x = *x * 0.0f; /* as torch's w * mask: -0.0 for a negative entry */
            /* a zero now where zero_below > 0; counted as one before if its key was below it */
            c.zeros[e->piece] += (int64_t)(zero_below > 0) - (int64_t)(e->key < (uint32_t)zero_below);
        }
    }
    Py_END_ALLOW_THREADS
    PyObject *z = list_of_sums(c.zeros, T, np), *keys = PyList_New(G);
    for (Py_ssize_t j = 0; keys && j < G; j++) {
        PyObject *v = PyLong_FromUnsignedLong(key[j]);
        if (!v) {
            Py_CLEAR(keys);
            break;
        }
        PyList_SET_ITEM(keys, j, v);
    }
    if (z && keys) result = PyTuple_Pack(2, z, keys);
    Py_XDECREF(z);
    Py_XDECREF(keys);
    if (!result) written_but_lost();
done:
    for (int i = 0; i < 6; i++) Py_XDECREF(seq[i]);
    for (int t = 0; c.noted && t < T; t++) scratch_free(c.noted[t]);
    free(c.noted);
    free(c.nnoted);
    free(c.zeros);
    free(group_of);
    free(k);
    free(below);
    free(blo);
    free(bhi);
    free(key);
    scratch_free(merged);
    scratch_free(sorted);
    free(hist);
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

static int simd_best = 0; /* what this CPU has: 0 plain C, 1 AVX2, 2 AVX-512 */

static PyObject *py_simd(PyObject *self, PyObject *args) { /* tests: cover each code path on one machine */
    int level = -1;
    if (!PyArg_ParseTuple(args, "|i", &level)) return NULL;
#ifdef HAVE_AVX2_PATH
    int was = use_avx512 ? 2 : use_avx2;
    if (level >= 0) {
        if (level > simd_best) level = simd_best;
        use_avx2 = level >= 1;
        use_avx512 = level >= 2;
    }
#else
    int was = 0;
    (void)simd_best;
#endif
    return Py_BuildValue("(ii)", was, simd_best);
}

static PyMethodDef methods[] = {
    {"simd", py_simd, METH_VARARGS, "simd([level]) -> (level before, best level): 0 plain C, 1 AVX2, 2 AVX-512; sets the level used, at most the best"},
    {"use_openmp_pool", py_use_openmp_pool, METH_VARARGS,
     "use_openmp_pool(on) -> (was on, pool found): run parallel work in torch's OpenMP pool when found, else own threads"},
    {"scan", py_scan, METH_VARARGS, "scan(ptrs, sizes, threads, zero_below) -> (zeros, nonfinite) per tensor"},
    {"select", py_select, METH_VARARGS,
     "select(ptrs, sizes, k, threads, zero_below) -> (key, entries below key, ties at key, zeros, non-finite, splits), all "
     "but the first two per tensor; splits: where a tensor's share of the ties (earliest first) ends, at or after its "
     "last tie taken and before the first left, or -1 for none; key, below, ties and splits are None when the k-th key was not pinned down (take the slow path)"},
    {"select_groups", py_select_groups, METH_VARARGS,
     "select_groups(ptrs, sizes, ends, ks, threads, zero_below) -> (keys, belows, ties, zeros, non-finite, splits): select for "
     "each group of consecutive tensors (group j ends before tensor ends[j]) its ks[j]-th smallest key; keys and belows per "
     "group, None where the group is unresolved (take the slow path for it); the rest per tensor"},
    {"fold", py_fold, METH_VARARGS, "fold(ptrs, sizes, cuts, quotas, splits, threads, zero_below) -> zeros after per tensor"},
    {"fold_pending", py_fold_pending, METH_VARARGS,
     "fold_pending(ptrs, sizes, ends, ks, blos, bhis, belows, inbins, threads, zero_below) -> (zeros after per tensor, key per group): "
     "the fold of groups select_groups left pending (the k-th key among the inbin entries in [blo, bhi], below entries under blo)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "Fused float32 kernels for prunerecipe.fastprune.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") != 0;
    use_avx512 = use_avx2 && __builtin_cpu_supports("avx512f") != 0 && __builtin_cpu_supports("popcnt") != 0;
    simd_best = use_avx512 ? 2 : use_avx2;
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
