/* Fused float32 TIES combine for splice.merge.methods._common (optional extension).
 *
 * combine(base, deltas, weights, majority_count, normalize, lam) -> None
 *   One pass over the entries, in place in base, with exactly the float32 operations of
 *   ties_combine_ (so the same bits, and mergekit's in float32):
 *     v_i = δ_i · w_i                         (w_i rounded to float32)
 *     S   = ((0 + v_1) + v_2) + …             majority "sum";  Σ sign(v_i) for "count"
 *     s   = +1 if S >= 0 else −1              (NaN: −1)
 *     a_i = max(v_i · s, 0)                   the agreeing magnitudes (NaN kept)
 *     m   = (0 + a_1) + a_2 + …;  d = Σ_{a_i > 0} w_i   (in order, from +0)
 *     r   = m · s;  normalize: r / (d if d != 0 else 1);  λ != 1: r · λ
 *     base = base + r
 *   base: writable C-contiguous float32 buffer; deltas: a sequence of n float32 buffers of
 *   the same length (read only); weights: n floats. Compiled with -ffp-contract=off so no
 *   multiply-add is fused (each operation rounds once, as torch's).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_MODELS 64

static void combine_block(float *base, const float **d, const float *w, int n, Py_ssize_t lo,
                          Py_ssize_t hi, int count, int normalize, float lam) {
    float v[MAX_MODELS];
    for (Py_ssize_t j = lo; j < hi; j++) {
        float vote = 0.0f;
        for (int i = 0; i < n; i++) {
            v[i] = d[i][j] * w[i];
            if (count)
                vote += (float)((v[i] > 0.0f) - (v[i] < 0.0f));
            else
                vote += v[i];
        }
        const float s = vote >= 0.0f ? 1.0f : -1.0f;
        float m = 0.0f, div = 0.0f;
        for (int i = 0; i < n; i++) {
            const float a = v[i] * s;
            if (a > 0.0f) {
                m += a;
                div += w[i];
            } else if (a != a) {
                m += a;
            }
        }
        float r = m * s;
        if (normalize) r = r / (div == 0.0f ? 1.0f : div);
        if (lam != 1.0f) r = r * lam;
        base[j] = base[j] + r;
    }
}

static PyObject *combine(PyObject *self, PyObject *args) {
    PyObject *base_obj, *deltas_obj, *weights_obj;
    int count, normalize;
    double lam;
    if (!PyArg_ParseTuple(args, "OOOppd", &base_obj, &deltas_obj, &weights_obj, &count,
                          &normalize, &lam))
        return NULL;
    PyObject *deltas = PySequence_Fast(deltas_obj, "deltas must be a sequence");
    if (deltas == NULL) return NULL;
    PyObject *weights = PySequence_Fast(weights_obj, "weights must be a sequence");
    if (weights == NULL) {
        Py_DECREF(deltas);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(deltas);
    Py_buffer base, views[MAX_MODELS];
    const float *d[MAX_MODELS];
    float w[MAX_MODELS];
    int got = 0, ok = 0;
    if (n < 1 || n > MAX_MODELS || PySequence_Fast_GET_SIZE(weights) != n) {
        PyErr_SetString(PyExc_ValueError, "combine: 1..64 deltas, one weight each");
        goto done_lists;
    }
    if (PyObject_GetBuffer(base_obj, &base, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        goto done_lists;
    for (; got < n; got++) {
        PyObject *item = PySequence_Fast_GET_ITEM(deltas, got);
        if (PyObject_GetBuffer(item, &views[got], PyBUF_C_CONTIGUOUS) < 0) goto done;
        if (views[got].len != base.len) {
            got++;
            PyErr_SetString(PyExc_ValueError, "combine: deltas and base differ in size");
            goto done;
        }
        d[got] = (const float *)views[got].buf;
        double wi = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(weights, got));
        if (wi == -1.0 && PyErr_Occurred()) {
            got++;
            goto done;
        }
        w[got] = (float)wi;
    }
    if (base.len % 4 != 0) {
        PyErr_SetString(PyExc_ValueError, "combine: float32 buffers expected");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS;
    combine_block((float *)base.buf, d, w, (int)n, 0, base.len / 4, count, normalize,
                  (float)lam);
    Py_END_ALLOW_THREADS;
    ok = 1;
done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    PyBuffer_Release(&base);
done_lists:
    Py_DECREF(deltas);
    Py_DECREF(weights);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* bfloat16 <-> float32, as torch's c10::BFloat16 (round to nearest even; NaN -> 0x7fc0). */
static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float rbf(float f) { return bf2f(f2bf(f)); } /* round to a bf16 value */

/* mergekit's generalized task arithmetic in bfloat16, one entry at a time (see gta_bf16). */
static void gta_bf16_block(uint16_t *base, const uint16_t **d, const float *w, int n,
                           Py_ssize_t len, int consensus, int normalize, float lam,
                           float weight_sum) {
    float v[MAX_MODELS];
    for (Py_ssize_t j = 0; j < len; j++) {
        for (int i = 0; i < n; i++) v[i] = rbf(bf2f(d[i][j]) * w[i]);
        float mixed = 0.0f, div = 0.0f;
        if (consensus) {
            float votes = 0.0f;
            for (int i = 0; i < n; i++)
                votes += consensus == 1 ? v[i] : (float)((v[i] > 0.0f) - (v[i] < 0.0f));
            votes = rbf(votes);
            const float s = votes >= 0.0f ? 1.0f : -1.0f;
            for (int i = 0; i < n; i++) {
                const float sg = (float)((v[i] > 0.0f) - (v[i] < 0.0f));
                if (sg == s) {
                    mixed += v[i];
                    div += w[i];
                } else {
                    mixed += v[i] * 0.0f; /* v · false: a signed zero (NaN stays NaN) */
                }
            }
            div = rbf(div);
            if (div == 0.0f) div = 1.0f;
        } else {
            for (int i = 0; i < n; i++) mixed += v[i];
            div = weight_sum;
        }
        mixed = rbf(mixed);
        if (normalize) mixed = rbf(mixed / div);
        if (lam != 1.0f) mixed = rbf(mixed * lam);
        base[j] = f2bf(bf2f(base[j]) + mixed);
    }
}

static PyObject *gta_bf16(PyObject *self, PyObject *args) {
    PyObject *base_obj, *deltas_obj, *weights_obj;
    int consensus, normalize;
    double lam;
    if (!PyArg_ParseTuple(args, "OOOipd", &base_obj, &deltas_obj, &weights_obj, &consensus,
                          &normalize, &lam))
        return NULL;
    PyObject *deltas = PySequence_Fast(deltas_obj, "deltas must be a sequence");
    if (deltas == NULL) return NULL;
    PyObject *weights = PySequence_Fast(weights_obj, "weights must be a sequence");
    if (weights == NULL) {
        Py_DECREF(deltas);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(deltas);
    Py_buffer base, views[MAX_MODELS];
    const uint16_t *d[MAX_MODELS];
    float w[MAX_MODELS];
    int got = 0, ok = 0;
    if (n < 1 || n > MAX_MODELS || PySequence_Fast_GET_SIZE(weights) != n || consensus < 0 ||
        consensus > 2) {
        PyErr_SetString(PyExc_ValueError, "gta_bf16: 1..64 deltas, one weight each");
        goto done_lists;
    }
    if (PyObject_GetBuffer(base_obj, &base, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        goto done_lists;
    float weight_sum = 0.0f;
    for (; got < n; got++) {
        PyObject *item = PySequence_Fast_GET_ITEM(deltas, got);
        if (PyObject_GetBuffer(item, &views[got], PyBUF_C_CONTIGUOUS) < 0) goto done;
        if (views[got].len != base.len) {
            got++;
            PyErr_SetString(PyExc_ValueError, "gta_bf16: deltas and base differ in size");
            goto done;
        }
        d[got] = (const uint16_t *)views[got].buf;
        double wi = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(weights, got));
        if (wi == -1.0 && PyErr_Occurred()) {
            got++;
            goto done;
        }
        w[got] = (float)wi;
        weight_sum += w[got];
    }
    weight_sum = rbf(weight_sum);
    if (fabsf(weight_sum) < 1e-8f) weight_sum = 1.0f;
    if (base.len % 2 != 0) {
        PyErr_SetString(PyExc_ValueError, "gta_bf16: bfloat16 buffers expected");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS;
    gta_bf16_block((uint16_t *)base.buf, d, w, (int)n, base.len / 2, consensus, normalize,
                   (float)lam, weight_sum);
    Py_END_ALLOW_THREADS;
    ok = 1;
done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    PyBuffer_Release(&base);
done_lists:
    Py_DECREF(deltas);
    Py_DECREF(weights);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gta_bf16", gta_bf16, METH_VARARGS,
     "gta_bf16(base, deltas, weights, consensus, normalize, lam): mergekit's generalized "
     "task arithmetic in bfloat16 (consensus 0 none, 1 sum, 2 count), in place in base."},
    {"combine", combine, METH_VARARGS,
     "combine(base, deltas, weights, majority_count, normalize, lam): fused float32 TIES "
     "sign election and disjoint merge, in place in base."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ties_kernel", "Fused float32 TIES combine (see the C source).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__ties_kernel(void) { return PyModule_Create(&module); }
