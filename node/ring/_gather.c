/* node.ring._gather: hands a list of bytes to the ring's C helper without copying
 * them into one buffer first.
 *
 * Ring.append_batch used to spend more time in Python (b"".join of the payloads and an
 * array of their lengths: ~2.7 us per 64 records) than the C append itself.  Here one
 * C pass with the GIL held reads each bytes object's pointer and size, takes a
 * reference to each (another thread may replace the list's items while the GIL is
 * released), then calls iotring_append_iov (node.ring._chelper, passed in as a
 * function pointer) with the GIL released, like any other cffi call.
 *
 * append_list(fn, ctx, payloads, first_pos) -> int
 *   fn, ctx, first_pos: addresses (int) of iotring_append_iov, the iotring_ctx and a
 *   uint64_t out slot.  payloads: a list or tuple.  Returns what iotring_append_iov
 *   returns, or:
 *     NOT_BYTES - i   item i is not exactly bytes (or payloads is not a list/tuple):
 *                     nothing appended, the caller takes its general path;
 *     TOO_LARGE - i   item i is 4 GiB or more: nothing appended.
 * No Python object is created or kept besides the returned int.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define TOO_LARGE (-((int64_t)1 << 40))
#define NOT_BYTES (-((int64_t)1 << 42))
#define STACK_ITEMS 256

typedef int64_t (*append_iov_fn)(const void *ctx, const char *const *bufs, const uint32_t *lens, uint32_t n,
                                 uint64_t *first_pos);

static PyObject *append_list(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "append_list expected 4 arguments, got %zd", nargs);
        return NULL;
    }
    void *fn = PyLong_AsVoidPtr(args[0]);
    void *ctx = PyLong_AsVoidPtr(args[1]);
    void *out = PyLong_AsVoidPtr(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (fn == NULL || ctx == NULL || out == NULL) {
        PyErr_SetString(PyExc_ValueError, "append_list: fn, ctx and first_pos must be non-null addresses");
        return NULL;
    }
    PyObject *seq = args[2];
    if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) return PyLong_FromLongLong(NOT_BYTES);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n <= 0) return PyLong_FromLong(0);
    if (n > (Py_ssize_t)UINT32_MAX) n = (Py_ssize_t)UINT32_MAX;  /* a prefix, as when the ring is full */

    PyObject *stack_items[STACK_ITEMS];
    const char *stack_bufs[STACK_ITEMS];
    uint32_t stack_lens[STACK_ITEMS];
    PyObject **items = stack_items;
    const char **bufs = stack_bufs;
    uint32_t *lens = stack_lens;
    void *heap = NULL;
    if (n > STACK_ITEMS) {
        heap = PyMem_Malloc((size_t)n * (sizeof(PyObject *) + sizeof(char *) + sizeof(uint32_t)));
        if (heap == NULL) return PyErr_NoMemory();
        items = (PyObject **)heap;
        bufs = (const char **)(items + n);
        lens = (uint32_t *)(bufs + n);
    }

    /* The list cannot change while the GIL is held: check every item first. */
    PyObject **src = PySequence_Fast_ITEMS(seq);
    int64_t rc = 0;
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        PyObject *item = src[i];
        if (!PyBytes_CheckExact(item)) { rc = NOT_BYTES - (int64_t)i; break; }
        Py_ssize_t len = PyBytes_GET_SIZE(item);
        if ((uint64_t)len > UINT32_MAX) { rc = TOO_LARGE - (int64_t)i; break; }
        items[i] = item;
        bufs[i] = PyBytes_AS_STRING(item);
        lens[i] = (uint32_t)len;
    }
    if (rc == 0) {
        for (i = 0; i < n; i++) Py_INCREF(items[i]);
        Py_BEGIN_ALLOW_THREADS
        rc = ((append_iov_fn)fn)(ctx, bufs, lens, (uint32_t)n, (uint64_t *)out);
        Py_END_ALLOW_THREADS
        for (i = 0; i < n; i++) Py_DECREF(items[i]);
    }
    PyMem_Free(heap);
    return PyLong_FromLongLong(rc);
}

static PyMethodDef methods[] = {
    {"append_list", (PyCFunction)(void (*)(void))append_list, METH_FASTCALL,
     "append_list(fn, ctx, payloads, first_pos) -> int: iotring_append_iov over a list of bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "node.ring._gather",
    "Hands a list of bytes to the ring's C helper without joining them (see _gather.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__gather(void) { return PyModule_Create(&module); }
