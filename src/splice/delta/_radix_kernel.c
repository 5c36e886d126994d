/* Radix selection of magnitudes, compiled (optional extension), for splice.delta.topk and
 * splice.merge.sparsify: the histograms that find the k-th largest |delta| over one tensor
 * or a whole model (splice.engine.topk), and the keep rule that applies such a threshold.
 * Non-negative float32 values are ranked by their int32 bit patterns, which are monotonic
 * in the value.
 *
 * radix_histogram(mag, hist, bucket) -> bool
 *   The radix selection's histograms of non-negative float32 values (their int32 bits are
 *   monotonic in the value), added into hist (65536 int64 counts): bucket < 0, by the high
 *   16 bits of every value; else by the low 16 bits of the values whose high 16 bits are
 *   bucket. One pass, no copy. False when a value is NaN (the counts are then partial).
 *
 * apply_keep_rule(delta, itemsize, threshold, quota) -> bool
 *   A whole-model keep rule, in place on a float32 (itemsize 4) or bfloat16 (2) delta: an
 *   entry with |delta| > threshold stays, the first quota entries (flat order) with |delta|
 *   == threshold stay, every other becomes a zero with its sign (delta * mask). threshold:
 *   the float32 bits of a non-negative value. False, delta untouched, when an entry is not
 *   finite (delta * 0 is NaN there: the caller's torch path gives that).
 *
 * Both release the GIL while they run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static PyObject *radix_histogram(PyObject *self, PyObject *args) {
    PyObject *mag_obj, *hist_obj;
    long long bucket;
    if (!PyArg_ParseTuple(args, "OOL", &mag_obj, &hist_obj, &bucket)) return NULL;
    Py_buffer mag, hist;
    if (PyObject_GetBuffer(mag_obj, &mag, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(hist_obj, &hist, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&mag);
        return NULL;
    }
    if (mag.len % 4 != 0 || hist.len != 65536 * (Py_ssize_t)sizeof(int64_t) || bucket > 65535) {
        PyBuffer_Release(&mag);
        PyBuffer_Release(&hist);
        PyErr_SetString(PyExc_ValueError, "radix_histogram: float32 values, 65536 int64 "
                                          "counts, bucket < 65536");
        return NULL;
    }
    const Py_ssize_t n = mag.len / 4;
    uint32_t nan = 0;
    Py_BEGIN_ALLOW_THREADS;
    const uint32_t *u = (const uint32_t *)mag.buf;
    int64_t *h = (int64_t *)hist.buf;
    if (bucket < 0) {
        for (Py_ssize_t j = 0; j < n; j++) {
            nan |= (u[j] & 0x7fffffffu) > 0x7f800000u;
            h[u[j] >> 16]++;
        }
    } else {
        const uint32_t b = (uint32_t)bucket;
        for (Py_ssize_t j = 0; j < n; j++) {
            nan |= (u[j] & 0x7fffffffu) > 0x7f800000u;
            if ((u[j] >> 16) == b) h[u[j] & 0xffffu]++; /* few match: a predictable branch */
        }
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&mag);
    PyBuffer_Release(&hist);
    return PyBool_FromLong(!nan);
}

/* |x| as the bits of a float32 (monotonic in the value for non-negative x). */
static inline uint32_t abs_bits32(uint32_t u) { return u & 0x7fffffffu; }
static inline uint32_t abs_bits16(uint16_t u) { return (uint32_t)(u & 0x7fffu) << 16; }

static PyObject *apply_keep_rule(PyObject *self, PyObject *args) {
    PyObject *delta_obj;
    int itemsize;
    unsigned long threshold;
    Py_ssize_t quota;
    if (!PyArg_ParseTuple(args, "Oikn", &delta_obj, &itemsize, &threshold, &quota)) return NULL;
    Py_buffer delta;
    if (PyObject_GetBuffer(delta_obj, &delta, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        return NULL;
    if ((itemsize != 4 && itemsize != 2) || delta.len % itemsize != 0 || quota < 0 ||
        threshold > 0x7f800000ul) {
        PyBuffer_Release(&delta);
        PyErr_SetString(PyExc_ValueError, "apply_keep_rule: float32 / bfloat16, a threshold "
                                          "of 0 to +inf, quota >= 0");
        return NULL;
    }
    const Py_ssize_t n = delta.len / itemsize;
    const uint32_t t = (uint32_t)threshold;
    uint32_t bad = 0;
    /* Two vectorizable passes, then a third only when this tensor has more entries equal
     * to the threshold than its quota (rare but for 16-bit-born values): keep |x| >= t
     * while counting the ties, then zero the ties after the first quota, in flat order. */
    Py_BEGIN_ALLOW_THREADS;
    if (itemsize == 4) {
        uint32_t *d = (uint32_t *)delta.buf;
        for (Py_ssize_t j = 0; j < n; j++) bad |= abs_bits32(d[j]) >= 0x7f800000u;
        if (!bad) {
            Py_ssize_t ties = 0;
            for (Py_ssize_t j = 0; j < n; j++) {
                const uint32_t a = abs_bits32(d[j]);
                ties += a == t;
                d[j] &= 0x80000000u | (0u - (uint32_t)(a >= t));
            }
            for (Py_ssize_t j = 0, seen = 0; ties > quota && j < n; j++)
                if (abs_bits32(d[j]) == t && seen++ >= quota) d[j] &= 0x80000000u;
        }
    } else {
        uint16_t *d = (uint16_t *)delta.buf;
        for (Py_ssize_t j = 0; j < n; j++) bad |= abs_bits16(d[j]) >= 0x7f800000u;
        if (!bad) {
            Py_ssize_t ties = 0;
            for (Py_ssize_t j = 0; j < n; j++) {
                const uint32_t a = abs_bits16(d[j]);
                ties += a == t;
                d[j] &= (uint16_t)(0x8000u | (0u - (uint32_t)(a >= t)));
            }
            for (Py_ssize_t j = 0, seen = 0; ties > quota && j < n; j++)
                if (abs_bits16(d[j]) == t && seen++ >= quota) d[j] &= 0x8000u;
        }
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&delta);
    return PyBool_FromLong(!bad);
}

static PyMethodDef methods[] = {
    {"apply_keep_rule", apply_keep_rule, METH_VARARGS,
     "apply_keep_rule(delta, itemsize, threshold, quota) -> bool: keep |delta| > threshold "
     "(float32 bits) and the first quota entries equal to it, zero the others with their "
     "sign, in place; False (untouched) when delta has a non-finite entry."},
    {"radix_histogram", radix_histogram, METH_VARARGS,
     "radix_histogram(mag, hist, bucket) -> bool: add the counts of the float32 values' high "
     "16 bits (bucket < 0), or of the low 16 bits of those whose high 16 bits are bucket, "
     "into hist (65536 int64); False when a value is NaN."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_radix_kernel", "Radix selection of magnitudes (see the C source).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__radix_kernel(void) { return PyModule_Create(&module); }
