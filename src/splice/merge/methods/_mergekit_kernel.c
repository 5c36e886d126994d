/* The mergekit dialect's float32 elementwise steps, fused (optional extension), for
 * splice.merge.methods._mergekit_precision: Model Stock (`model_stock_in_dtype`) and SLERP
 * (`slerp_float32`). The whole-tensor reductions between the steps (norms, dots, in
 * torch's thread order) stay with torch.
 *
 * average_offsets(average, base, inputs) -> None
 *   One pass over the entries, with exactly the float32 operations of torch's
 *     average = θ_1 + θ_2;  average += θ_i (i = 3..n);  average /= n;  θ_i -= θ_0
 *   (so the same bits): average is written, each input is overwritten by its task vector.
 *
 * interpolate(average, base, t, one_minus_t, row) -> None
 *   average = average · t + base · (1 − t), as torch's average.mul_(t).add_(base.mul_(1 − t))
 *   (base is overwritten by base · (1 − t)); t and 1 − t are float32 buffers of one value
 *   each (row = 0), or one per row of ``row`` entries (mergekit's filter_wise).
 *
 * slerp_product(out, a, b, norm_a, norm_b) -> None
 *   out = (a / |a|) · (b / |b|), as torch's div(a, |a|).mul_(div(b, |b|)) (the product
 *   whose sum is SLERP's dot).
 *
 * slerp_mix(out, a, b, coef_a, coef_b) -> None
 *   out = a · coef_a + b · coef_b, as torch's mul(a, coef_a).add_(mul(b, coef_b)).
 *
 * All buffers are C-contiguous float32 of the same length (t: 1 or len / row entries); out
 * may be a or b.
 * Compiled with -ffp-contract=off: no multiply-add is fused, each operation rounds once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_MODELS 64
#define CHUNK 512

#include "_vector_clones.h"

VECTOR_CLONES
static void average_offsets_block(float *average, const float *base, float **x, int n,
                                  Py_ssize_t len) {
    const float count = (float)n;
    for (Py_ssize_t lo = 0; lo < len; lo += CHUNK) {
        const int c = (int)(len - lo < CHUNK ? len - lo : CHUNK);
        float *a = average + lo;
        const float *b = base + lo;
        const float *x0 = x[0] + lo, *x1 = x[1] + lo;
        for (int j = 0; j < c; j++) a[j] = x0[j] + x1[j];
        for (int i = 2; i < n; i++) {
            const float *xi = x[i] + lo;
            for (int j = 0; j < c; j++) a[j] = a[j] + xi[j];
        }
        for (int j = 0; j < c; j++) a[j] = a[j] / count;
        for (int i = 0; i < n; i++) {
            float *xi = x[i] + lo;
            for (int j = 0; j < c; j++) xi[j] = xi[j] - b[j];
        }
    }
}

VECTOR_CLONES
static void interpolate_block(float *average, float *base, float t, float omt, Py_ssize_t len) {
    for (Py_ssize_t j = 0; j < len; j++) {
        const float kept = base[j] * omt;
        base[j] = kept;
        average[j] = average[j] * t + kept;
    }
}

VECTOR_CLONES
static void slerp_product_block(float *out, const float *a, const float *b, float na, float nb,
                                Py_ssize_t len) {
    for (Py_ssize_t j = 0; j < len; j++) out[j] = (a[j] / na) * (b[j] / nb);
}

VECTOR_CLONES
static void slerp_mix_block(float *out, const float *a, const float *b, float ca, float cb,
                            Py_ssize_t len) {
    for (Py_ssize_t j = 0; j < len; j++) out[j] = a[j] * ca + b[j] * cb;
}

typedef struct {
    Py_buffer views[MAX_MODELS + 2];
    int got;
} Held;

static void release(Held *h) {
    for (int i = 0; i < h->got; i++) PyBuffer_Release(&h->views[i]);
}

/* Give back what ``h`` holds: None when ``ok``, else NULL with the Python error set. */
static PyObject *finish(Held *h, int ok) {
    release(h);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* Take a C-contiguous float32 buffer (writable when asked) of ``len`` bytes (-1: any). */
static float *take(Held *h, PyObject *obj, int writable, Py_ssize_t len, const char *name) {
    Py_buffer *v = &h->views[h->got];
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return NULL;
    h->got++;
    if ((len >= 0 && v->len != len) || v->len % 4 != 0) {
        PyErr_Format(PyExc_ValueError, "%s: float32 buffers of one length expected", name);
        return NULL;
    }
    return (float *)v->buf;
}

static PyObject *average_offsets(PyObject *self, PyObject *args) {
    PyObject *average_obj, *base_obj, *inputs_obj, *inputs;
    float *x[MAX_MODELS];
    Held held = {.got = 0};
    if (!PyArg_ParseTuple(args, "OOO", &average_obj, &base_obj, &inputs_obj)) return NULL;
    inputs = PySequence_Fast(inputs_obj, "inputs must be a sequence");
    if (inputs == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(inputs);
    float *average = NULL, *base = NULL;
    if (n < 2 || n > MAX_MODELS) {
        PyErr_SetString(PyExc_ValueError, "average_offsets: 2..64 inputs");
        goto fail;
    }
    average = take(&held, average_obj, 1, -1, "average_offsets");
    if (average == NULL) goto fail;
    Py_ssize_t bytes = held.views[0].len;
    base = take(&held, base_obj, 0, bytes, "average_offsets");
    if (base == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        x[i] = take(&held, PySequence_Fast_GET_ITEM(inputs, i), 1, bytes, "average_offsets");
        if (x[i] == NULL) goto fail;
    }
    Py_BEGIN_ALLOW_THREADS;
    average_offsets_block(average, base, x, (int)n, bytes / 4);
    Py_END_ALLOW_THREADS;
    Py_DECREF(inputs);
    return finish(&held, 1);
fail:
    Py_DECREF(inputs);
    return finish(&held, 0);
}

static PyObject *interpolate(PyObject *self, PyObject *args) {
    PyObject *average_obj, *base_obj, *t_obj, *omt_obj;
    Py_ssize_t row;
    Held held = {.got = 0};
    if (!PyArg_ParseTuple(args, "OOOOn", &average_obj, &base_obj, &t_obj, &omt_obj, &row))
        return NULL;
    float *average = take(&held, average_obj, 1, -1, "interpolate");
    if (average == NULL) goto fail;
    Py_ssize_t len = held.views[0].len / 4;
    float *base = take(&held, base_obj, 1, len * 4, "interpolate");
    if (base == NULL) goto fail;
    Py_ssize_t rows = row > 0 ? len / row : 1;
    if (row < 0 || (row > 0 && len % row != 0)) {
        PyErr_SetString(PyExc_ValueError, "interpolate: row must divide the length");
        goto fail;
    }
    float *t = take(&held, t_obj, 0, rows * 4, "interpolate");
    if (t == NULL) goto fail;
    float *omt = take(&held, omt_obj, 0, rows * 4, "interpolate");
    if (omt == NULL) goto fail;
    Py_ssize_t step = row > 0 ? row : len;
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t r = 0; r < rows; r++)
        interpolate_block(average + r * step, base + r * step, t[r], omt[r], step);
    Py_END_ALLOW_THREADS;
    return finish(&held, 1);
fail:
    return finish(&held, 0);
}

/* out, a, b: float32 buffers of one length; two float scalars; the block function. */
static PyObject *pairwise(PyObject *args, const char *name,
                          void (*block)(float *, const float *, const float *, float, float,
                                        Py_ssize_t)) {
    PyObject *out_obj, *a_obj, *b_obj;
    double x, y;
    Held held = {.got = 0};
    if (!PyArg_ParseTuple(args, "OOOdd", &out_obj, &a_obj, &b_obj, &x, &y)) return NULL;
    float *out = take(&held, out_obj, 1, -1, name);
    if (out == NULL) goto fail;
    Py_ssize_t bytes = held.views[0].len;
    const float *a = take(&held, a_obj, 0, bytes, name);
    if (a == NULL) goto fail;
    const float *b = take(&held, b_obj, 0, bytes, name);
    if (b == NULL) goto fail;
    Py_BEGIN_ALLOW_THREADS;
    block(out, a, b, (float)x, (float)y, bytes / 4);
    Py_END_ALLOW_THREADS;
    return finish(&held, 1);
fail:
    return finish(&held, 0);
}

static PyObject *slerp_product(PyObject *self, PyObject *args) {
    return pairwise(args, "slerp_product", slerp_product_block);
}

static PyObject *slerp_mix(PyObject *self, PyObject *args) {
    return pairwise(args, "slerp_mix", slerp_mix_block);
}

static PyMethodDef methods[] = {
    {"slerp_product", slerp_product, METH_VARARGS,
     "slerp_product(out, a, b, norm_a, norm_b): out = (a / norm_a) * (b / norm_b), float32."},
    {"slerp_mix", slerp_mix, METH_VARARGS,
     "slerp_mix(out, a, b, coef_a, coef_b): out = a * coef_a + b * coef_b, float32."},
    {"average_offsets", average_offsets, METH_VARARGS,
     "average_offsets(average, base, inputs): average = mean of the inputs, each input -= "
     "base; float32, in torch's order of operations."},
    {"interpolate", interpolate, METH_VARARGS,
     "interpolate(average, base, t, one_minus_t, row): average = average*t + base*(1-t), "
     "base overwritten by base*(1-t); float32, per row when row > 0."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_mergekit_kernel",
    "The mergekit dialect's float32 elementwise steps (see the C source).", -1, methods,
};

PyMODINIT_FUNC PyInit__mergekit_kernel(void) { return PyModule_Create(&module); }
