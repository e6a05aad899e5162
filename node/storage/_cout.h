/* Shared by the storage sinks' C formatters (_vmlines.c, _pgcopy.c): a growing output
 * buffer, and a column of a batch read in columns (node.storage.source.Columns). */
#ifndef IOTNODE_STORAGE_COUT_H
#define IOTNODE_STORAGE_COUT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef struct {
    char *buf;
    size_t len, cap;
} Out;

static int out_grow(Out *o, size_t more) {
    size_t need = o->len + more;
    if (need <= o->cap) return 0;
    size_t cap = o->cap ? o->cap : 65536;
    while (cap < need) cap *= 2;
    char *buf = PyMem_Realloc(o->buf, cap);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->buf = buf;
    o->cap = cap;
    return 0;
}

static inline int out_put(Out *o, const char *s, size_t n) {
    if (o->len + n > o->cap && out_grow(o, n) < 0) return -1;
    memcpy(o->buf + o->len, s, n);
    o->len += n;
    return 0;
}

static inline int out_ch(Out *o, char c) {
    if (o->len + 1 > o->cap && out_grow(o, 1) < 0) return -1;
    o->buf[o->len++] = c;
    return 0;
}

static int out_ll(Out *o, long long v) {
    char tmp[24];
    char *w = tmp + sizeof tmp;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        *--w = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) *--w = '-';
    return out_put(o, w, (size_t)(tmp + sizeof tmp - w));
}

/* Column i of cols (a Columns tuple) as bytes of at least `need` bytes; else ValueError
 * naming `who` (the calling function) and the column. */
static const char *column(PyObject *cols, Py_ssize_t i, const char *who, const char *name, size_t need) {
    PyObject *b = PyTuple_GET_ITEM(cols, i);
    if (!PyBytes_CheckExact(b) || (size_t)PyBytes_GET_SIZE(b) < need) {
        PyErr_Format(PyExc_ValueError, "%s: column %s is not bytes of %zu bytes", who, name, need);
        return NULL;
    }
    return PyBytes_AS_STRING(b);
}

#endif
