/* Compiled top-k selection for splice.delta.argsort_select (optional extension).
 *
 * torch_sort_topk(values, k, mask) -> bool
 *   Sets mask[i] = 1 for the k positions that torch.argsort(values, descending=True)[:k]
 *   selects on the CPU, i.e. the first k positions of libstdc++'s std::sort (introsort)
 *   over (value, index) pairs with comp(a, b) = a.value > b.value. It follows introsort's
 *   own steps on the one path that holds position k: median of three moved to the front,
 *   unguarded Hoare partition; once the partition holding k has <= 16 entries, the final
 *   insertion sort (stable, never moving an entry past an equal one) decides, so those
 *   entries are ordered stably here. Returns False (mask untouched) where introsort would
 *   switch to heapsort (depth limit reached): the caller then sorts for real.
 *   values: C-contiguous float32 buffer (a NaN: False, mask untouched, the caller sorts
 *   for real); mask: writable byte buffer of the same length, zeroed by the caller;
 *   0 < k < n.
 *
 * torch_sort_trim(delta, k, itemsize[, work]) -> bool
 *   The same selection on |delta| (float32, itemsize 4, or bfloat16, itemsize 2), applied in
 *   place: every entry not selected becomes a zero with its sign (what delta * mask gives).
 *   False (delta untouched) on the depth limit, or when delta holds a NaN (checked while
 *   the pairs are built: torch's sort orders NaN its own way, the caller sorts for real).
 *
 * torch_sort_select_pairs(pairs, k, bits) -> bool
 *   The same selection on (value, index) pairs the caller built (n entries of a float32
 *   value and a uint32 flat index, 8 bytes each, e.g. filled a slice of a tensor at a time),
 *   scrambled in place; sets the bit of each selected index in bits (ceil(n / 8) bytes,
 *   zeroed by the caller; numpy.packbits order, most significant bit first). Peak: the
 *   pairs alone, no copy of the values. False (bits untouched) on the depth limit.
 *
 * fill_pairs(pairs, values, start) -> bool
 *   pairs[start + j] = (values[j], start + j) for the float32 values (m of them; the pairs
 *   buffer as for torch_sort_select_pairs, start + m <= n), in one pass. False when a value
 *   is NaN (the selection takes none; the pairs are then partly filled).
 *
 * All four release the GIL while they run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define THRESHOLD 16 /* libstdc++ _S_threshold */

typedef struct {
    float v;
    uint32_t i;
} pair32;

typedef struct {
    float v;
    int64_t i;
} pair64;

#define SWAP(T, a, b) \
    do {              \
        T t_ = (a);   \
        (a) = (b);    \
        (b) = t_;     \
    } while (0)

/* The first swaps of the Hoare partition, found in blocks of BLOCK entries without branches
 * (as BlockQuicksort): the scalar loop swaps the t-th entry <= pivot from the left with the
 * t-th entry >= pivot from the right for as long as they have not crossed. Left blocks are
 * scanned from the left end, right blocks from the right end, never overlapping, so every
 * pair found is a pair the scalar loop swaps, in the same order. When the unscanned middle
 * is too small for a block, lo and hi are set to the scalar loop's state after the last
 * pair and the scalar loop finishes (re-scanning the unpaired stops, which are unchanged). */
#define BLOCK 128
#define BLOCK_PHASE(PAIR)                                                                \
    {                                                                                    \
        Py_ssize_t lbuf[BLOCK], rbuf[BLOCK], ls = lo, rs = hi;                           \
        int ln = 0, li = 0, rn = 0, ri = 0;                                              \
        for (;;) {                                                                       \
            if (li == ln) {                                                              \
                if (rs - ls < BLOCK) break;                                              \
                ln = li = 0;                                                             \
                for (int t = 0; t < BLOCK; t++) {                                        \
                    lbuf[ln] = ls + t;                                                   \
                    ln += !(a[ls + t].v > pivot);                                        \
                }                                                                        \
                ls += BLOCK;                                                             \
            }                                                                            \
            if (ri == rn) {                                                              \
                if (rs - ls < BLOCK) break;                                              \
                rn = ri = 0;                                                             \
                for (int t = 0; t < BLOCK; t++) {                                        \
                    rbuf[rn] = rs - 1 - t;                                               \
                    rn += !(pivot > a[rs - 1 - t].v);                                    \
                }                                                                        \
                rs -= BLOCK;                                                             \
            }                                                                            \
            int m = ln - li < rn - ri ? ln - li : rn - ri;                               \
            for (int q = 0; q < m; q++) SWAP(PAIR, a[lbuf[li + q]], a[rbuf[ri + q]]);    \
            if (m > 0) {                                                                 \
                lo = lbuf[li + m - 1] + 1;                                               \
                hi = rbuf[ri + m - 1];                                                   \
            }                                                                            \
            li += m;                                                                     \
            ri += m;                                                                     \
        }                                                                                \
    }

/* One body for 32- and 64-bit indices: a[0..n) holds (value, position) pairs in order;
 * afterwards a[0..k) holds the entries torch's sort puts first. Returns 1 when done, 0 on
 * the depth limit (heapsort). */
#define DEFINE_SELECT(NAME, PAIR)                                                       \
    static int NAME(PAIR *a, Py_ssize_t n, Py_ssize_t k) {                              \
        Py_ssize_t first = 0, last = n;                                                  \
        int depth = 0;                                                                   \
        for (Py_ssize_t m = n; m > 1; m >>= 1) depth++;                                  \
        depth *= 2; /* 2 * floor(log2 n) */                                              \
        while (last - first > THRESHOLD) {                                               \
            if (depth == 0) return 0;                                                    \
            depth--;                                                                     \
            /* __move_median_to_first(first, first + 1, mid, last - 1) */                \
            Py_ssize_t x = first + 1, y = first + (last - first) / 2, z = last - 1, med; \
            float vx = a[x].v, vy = a[y].v, vz = a[z].v;                                 \
            if (vx > vy) {                                                               \
                if (vy > vz) med = y;                                                    \
                else if (vx > vz) med = z;                                               \
                else med = x;                                                            \
            } else if (vx > vz) med = x;                                                 \
            else if (vy > vz) med = z;                                                   \
            else med = y;                                                                \
            SWAP(PAIR, a[first], a[med]);                                                \
            /* __unguarded_partition(first + 1, last, first) */                          \
            const float pivot = a[first].v;                                              \
            Py_ssize_t lo = first + 1, hi = last;                                        \
            BLOCK_PHASE(PAIR)                                                            \
            for (;;) {                                                                   \
                while (a[lo].v > pivot) lo++;                                            \
                hi--;                                                                    \
                while (pivot > a[hi].v) hi--;                                            \
                if (!(lo < hi)) break;                                                   \
                SWAP(PAIR, a[lo], a[hi]);                                                \
                lo++;                                                                    \
            }                                                                            \
            /* introsort sorts [lo, last) and [first, lo) separately: follow k's side */ \
            if (k == lo) return 1;                                                       \
            if (k > lo) first = lo;                                                      \
            else last = lo;                                                              \
        }                                                                                \
        /* the final insertion sort of [first, last): stable, by value descending */     \
        for (Py_ssize_t p = first + 1; p < last; p++) {                                  \
            PAIR cur = a[p];                                                             \
            Py_ssize_t q = p;                                                            \
            while (q > first && cur.v > a[q - 1].v) {                                    \
                a[q] = a[q - 1];                                                         \
                q--;                                                                     \
            }                                                                            \
            a[q] = cur;                                                                  \
        }                                                                                \
        return 1;                                                                        \
    }

DEFINE_SELECT(select32, pair32)
DEFINE_SELECT(select64, pair64)

/* |x| as float32 of entry j of a float32 (itemsize 4) or bfloat16 (itemsize 2) buffer. */
static inline float magnitude_at(const void *buf, int itemsize, Py_ssize_t j) {
    if (itemsize == 4) return fabsf(((const float *)buf)[j]);
    uint32_t bits = (uint32_t)(((const uint16_t *)buf)[j] & 0x7fffu) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Mark in keep[] (n bytes, zeroed) the k entries torch.argsort(|x|, descending=True)[:k]
 * selects; the (value, index) pairs go into work (8n bytes, n <= UINT32_MAX) when given,
 * else into a fresh allocation. Returns 1, 0 on the depth limit or a NaN in x (keep[]
 * untouched), -1 out of memory. */
static int mark_torch_sort(const void *buf, int itemsize, Py_ssize_t n, Py_ssize_t k,
                           uint8_t *keep, void *work) {
    int rc;
    if (n <= (Py_ssize_t)UINT32_MAX) {
        pair32 *a = work != NULL ? (pair32 *)work : (pair32 *)malloc(sizeof(pair32) * (size_t)n);
        if (a == NULL) return -1;
        int nan = 0;
        for (Py_ssize_t j = 0; j < n; j++) {
            a[j].v = magnitude_at(buf, itemsize, j);
            a[j].i = (uint32_t)j;
            nan |= a[j].v != a[j].v;
        }
        rc = nan ? 0 : select32(a, n, k);
        if (rc == 1)
            for (Py_ssize_t p = 0; p < k; p++) keep[a[p].i] = 1;
        if (work == NULL) free(a);
    } else {
        pair64 *a = (pair64 *)malloc(sizeof(pair64) * (size_t)n);
        if (a == NULL) return -1;
        int nan = 0;
        for (Py_ssize_t j = 0; j < n; j++) {
            a[j].v = magnitude_at(buf, itemsize, j);
            a[j].i = (int64_t)j;
            nan |= a[j].v != a[j].v;
        }
        rc = nan ? 0 : select64(a, n, k);
        if (rc == 1)
            for (Py_ssize_t p = 0; p < k; p++) keep[a[p].i] = 1;
        free(a);
    }
    return rc;
}

static PyObject *torch_sort_topk(PyObject *self, PyObject *args) {
    PyObject *values_obj, *mask_obj;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "OnO", &values_obj, &k, &mask_obj)) return NULL;
    Py_buffer values, mask;
    if (PyObject_GetBuffer(values_obj, &values, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(mask_obj, &mask, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&values);
        return NULL;
    }
    Py_ssize_t n = values.len / 4;
    int rc;
    if (values.len % 4 != 0 || mask.len != n || k <= 0 || k >= n) {
        PyBuffer_Release(&values);
        PyBuffer_Release(&mask);
        PyErr_SetString(PyExc_ValueError, "torch_sort_topk: need n float32 values, n mask "
                                          "bytes and 0 < k < n");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS;
    rc = mark_torch_sort(values.buf, 4, n, k, (uint8_t *)mask.buf, NULL);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&values);
    PyBuffer_Release(&mask);
    if (rc < 0) return PyErr_NoMemory();
    return PyBool_FromLong(rc);
}

static PyObject *torch_sort_trim(PyObject *self, PyObject *args) {
    PyObject *delta_obj, *work_obj = Py_None;
    Py_ssize_t k;
    int itemsize;
    if (!PyArg_ParseTuple(args, "Oni|O", &delta_obj, &k, &itemsize, &work_obj)) return NULL;
    Py_buffer delta, work;
    work.buf = NULL;
    if (PyObject_GetBuffer(delta_obj, &delta, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        return NULL;
    if (work_obj != Py_None &&
        PyObject_GetBuffer(work_obj, &work, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&delta);
        return NULL;
    }
    Py_ssize_t n = delta.len / (itemsize > 0 ? itemsize : 1);
    if ((itemsize != 4 && itemsize != 2) || delta.len % itemsize != 0 || k <= 0 || k >= n ||
        (work.buf != NULL &&
         (n > (Py_ssize_t)UINT32_MAX || work.len < (Py_ssize_t)(sizeof(pair32) + 1) * n))) {
        PyBuffer_Release(&delta);
        if (work.buf != NULL) PyBuffer_Release(&work);
        PyErr_SetString(PyExc_ValueError, "torch_sort_trim: float32 / bfloat16, 0 < k < n, "
                                          "work (if given) of 9n bytes, n < 2^32");
        return NULL;
    }
    int rc = -1;
    Py_BEGIN_ALLOW_THREADS;
    /* the pairs, then the n keep bytes, in the caller's work buffer when given */
    uint8_t *keep = work.buf != NULL ? (uint8_t *)work.buf + sizeof(pair32) * (size_t)n
                                     : (uint8_t *)calloc((size_t)n, 1);
    if (work.buf != NULL) memset(keep, 0, (size_t)n);
    if (keep != NULL) {
        rc = mark_torch_sort(delta.buf, itemsize, n, k, keep, work.buf);
        /* δ · 0 for an entry not kept: a zero with δ's sign. Branch-free (keep is 0 or 1, in
         * random order: a branch mispredicts up to half the time, ~10 ns an entry at density
         * 0.5), so the loop vectorizes. */
        if (rc == 1 && itemsize == 4) {
            uint32_t *bits = (uint32_t *)delta.buf;
            for (Py_ssize_t j = 0; j < n; j++) bits[j] &= 0x80000000u | (0u - (uint32_t)keep[j]);
        } else if (rc == 1) {
            uint16_t *bits = (uint16_t *)delta.buf;
            for (Py_ssize_t j = 0; j < n; j++)
                bits[j] &= (uint16_t)(0x8000u | (0u - (uint32_t)keep[j]));
        }
        if (work.buf == NULL) free(keep);
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&delta);
    if (work.buf != NULL) PyBuffer_Release(&work);
    if (rc < 0) return PyErr_NoMemory();
    return PyBool_FromLong(rc);
}

static PyObject *torch_sort_select_pairs(PyObject *self, PyObject *args) {
    PyObject *pairs_obj, *bits_obj;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "OnO", &pairs_obj, &k, &bits_obj)) return NULL;
    Py_buffer pairs, bits;
    if (PyObject_GetBuffer(pairs_obj, &pairs, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(bits_obj, &bits, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&pairs);
        return NULL;
    }
    Py_ssize_t n = pairs.len / (Py_ssize_t)sizeof(pair32);
    if (pairs.len % (Py_ssize_t)sizeof(pair32) != 0 || bits.len != (n + 7) / 8 || k <= 0 ||
        k >= n || n > (Py_ssize_t)UINT32_MAX) {
        PyBuffer_Release(&pairs);
        PyBuffer_Release(&bits);
        PyErr_SetString(PyExc_ValueError, "torch_sort_select_pairs: need n 8-byte (float32, "
                                          "uint32) pairs, ceil(n/8) bytes and 0 < k < n");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    pair32 *a = (pair32 *)pairs.buf;
    uint8_t *out = (uint8_t *)bits.buf;
    rc = select32(a, n, k);
    if (rc == 1)
        for (Py_ssize_t p = 0; p < k; p++) out[a[p].i >> 3] |= (uint8_t)(0x80u >> (a[p].i & 7u));
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&pairs);
    PyBuffer_Release(&bits);
    return PyBool_FromLong(rc);
}

static PyObject *fill_pairs(PyObject *self, PyObject *args) {
    PyObject *pairs_obj, *values_obj;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "OOn", &pairs_obj, &values_obj, &start)) return NULL;
    Py_buffer pairs, values;
    if (PyObject_GetBuffer(pairs_obj, &pairs, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(values_obj, &values, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&pairs);
        return NULL;
    }
    Py_ssize_t n = pairs.len / (Py_ssize_t)sizeof(pair32), m = values.len / 4;
    if (pairs.len % (Py_ssize_t)sizeof(pair32) != 0 || values.len % 4 != 0 || start < 0 ||
        start > n - m || n > (Py_ssize_t)UINT32_MAX) {
        PyBuffer_Release(&pairs);
        PyBuffer_Release(&values);
        PyErr_SetString(PyExc_ValueError, "fill_pairs: need n 8-byte pairs, m float32 values, "
                                          "0 <= start <= n - m and n < 2^32");
        return NULL;
    }
    int nan = 0;
    Py_BEGIN_ALLOW_THREADS;
    pair32 *a = (pair32 *)pairs.buf + start;
    const float *v = (const float *)values.buf;
    for (Py_ssize_t j = 0; j < m; j++) {
        a[j].v = v[j];
        a[j].i = (uint32_t)(start + j);
        nan |= v[j] != v[j];
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&pairs);
    PyBuffer_Release(&values);
    return PyBool_FromLong(!nan);
}

static PyMethodDef methods[] = {
    {"fill_pairs", fill_pairs, METH_VARARGS,
     "fill_pairs(pairs, values, start) -> bool: pairs[start + j] = (values[j], start + j) "
     "for float32 values, in one pass; False when a value is NaN."},
    {"torch_sort_select_pairs", torch_sort_select_pairs, METH_VARARGS,
     "torch_sort_select_pairs(pairs, k, bits) -> bool: set the packed bits of the indices "
     "torch.argsort(values, descending=True)[:k] selects, from caller-built (float32 value, "
     "uint32 index) pairs (scrambled); False where introsort would use heapsort."},
    {"torch_sort_trim", torch_sort_trim, METH_VARARGS,
     "torch_sort_trim(delta, k, itemsize[, work]) -> bool: zero (keeping the sign) all "
     "entries of a float32 / bfloat16 buffer but the k that torch.argsort(|delta|, "
     "descending=True)[:k] selects, in place; False (delta untouched) where introsort would "
     "use heapsort or delta holds a NaN. work: a writable buffer of 9n bytes for the "
     "scratch (else allocated)."},
    {"torch_sort_topk", torch_sort_topk, METH_VARARGS,
     "torch_sort_topk(values, k, mask) -> bool: mark torch.argsort(values, descending=True)"
     "[:k] in mask without sorting; False where introsort would switch to heapsort or a "
     "value is NaN."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_introselect", "Compiled top-k selections (see the C source).", -1,
    methods,
};

/* API_VERSION 2: torch_sort_trim takes the optional work buffer (1, or no constant: it
   allocates its own); 3: torch_sort_trim and torch_sort_topk check for NaN themselves
   (False, nothing changed), and fill_pairs exists. Python checks the number, not the docstring. */
PyMODINIT_FUNC PyInit__introselect(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "API_VERSION", 3) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
