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
#include <stdlib.h>

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

static PyMethodDef methods[] = {
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
