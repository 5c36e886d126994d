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
 *   values: C-contiguous float32 buffer without NaN (the caller checks); mask: writable
 *   byte buffer of the same length, zeroed by the caller; 0 < k < n.
 *
 * Both functions release the GIL while they run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

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

/* One body for 32- and 64-bit indices. Returns 1 when done, 0 on the depth limit. */
#define DEFINE_SELECT(NAME, PAIR)                                                       \
    static int NAME(const float *src, Py_ssize_t n, Py_ssize_t k, uint8_t *mask) {      \
        PAIR *a = (PAIR *)malloc(sizeof(PAIR) * (size_t)n);                              \
        if (a == NULL) return -1;                                                        \
        for (Py_ssize_t j = 0; j < n; j++) {                                             \
            a[j].v = src[j];                                                             \
            a[j].i = (uint64_t)j;                                                        \
        }                                                                                \
        Py_ssize_t first = 0, last = n;                                                  \
        int depth = 0;                                                                   \
        for (Py_ssize_t m = n; m > 1; m >>= 1) depth++;                                  \
        depth *= 2; /* 2 * floor(log2 n) */                                              \
        while (last - first > THRESHOLD) {                                               \
            if (depth == 0) {                                                            \
                free(a);                                                                 \
                return 0;                                                                \
            }                                                                            \
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
            for (;;) {                                                                   \
                while (a[lo].v > pivot) lo++;                                            \
                hi--;                                                                    \
                while (pivot > a[hi].v) hi--;                                            \
                if (!(lo < hi)) break;                                                   \
                SWAP(PAIR, a[lo], a[hi]);                                                \
                lo++;                                                                    \
            }                                                                            \
            /* introsort sorts [lo, last) and [first, lo) separately: follow k's side */ \
            if (k == lo) {                                                               \
                first = last = lo;                                                       \
                break;                                                                   \
            }                                                                            \
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
        for (Py_ssize_t p = 0; p < k; p++) mask[a[p].i] = 1;                             \
        free(a);                                                                         \
        return 1;                                                                        \
    }

DEFINE_SELECT(select32, pair32)
DEFINE_SELECT(select64, pair64)

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
    if (n <= (Py_ssize_t)UINT32_MAX)
        rc = select32((const float *)values.buf, n, k, (uint8_t *)mask.buf);
    else
        rc = select64((const float *)values.buf, n, k, (uint8_t *)mask.buf);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&values);
    PyBuffer_Release(&mask);
    if (rc < 0) return PyErr_NoMemory();
    return PyBool_FromLong(rc);
}

static PyMethodDef methods[] = {
    {"torch_sort_topk", torch_sort_topk, METH_VARARGS,
     "torch_sort_topk(values, k, mask) -> bool: mark torch.argsort(values, descending=True)"
     "[:k] in mask without sorting; False where introsort would switch to heapsort."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_introselect", "Compiled top-k selections (see the C source).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__introselect(void) { return PyModule_Create(&module); }
