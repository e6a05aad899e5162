/* node.storage._storeread: the SQLite store's rows read in columns through SQLite's C API.
 *
 * A sink reading the store through Python's sqlite3 pays for six Python objects and a
 * tuple per row (fetchall: ~1 us a row, ~2 us under load); the VictoriaMetrics and lake
 * sinks then take those objects apart again.  This module steps the same SELECT in C,
 * with the GIL released, and hands back the batch as flat buffers that Arrow
 * (pa.Array.from_buffers) and the C line formatter (_vmlines.format_columns) read as
 * they are:
 *
 *   load(library, error) -> None
 *       dlopen() the SQLite library *that Python's sqlite3 module uses* (its path, from
 *       /proc/self/maps: node.storage.source) and look up the functions used here.  The
 *       same library matters: two copies of SQLite in one process do not see each other's
 *       POSIX locks, and closing one copy's file descriptor would drop the other's locks.
 *       No build dependency on SQLite's headers: the few declarations used are below
 *       (SQLite's C API is stable).  ``error`` is the exception class raised for SQLite
 *       errors (sqlite3.OperationalError).
 *
 *   Reader(path)             the store opened read-write without create (like the Python
 *                            side's mode=rw: a WAL reader needs the -shm), query_only,
 *                            busy_timeout 5000 ms.
 *   Reader.read(after, limit) -> None | (count, rowid, device_index, devices, counts,
 *                                        seq, ts, ts_valid, ts_nulls, received_at,
 *                                        data_offsets, data)
 *       rowid, seq:      count int64 (native order)
 *       device_index:    count int32, index into devices
 *       devices, counts: each device once (str, in first-seen order) and its rows
 *       ts:              count float64 (0.0 where NULL), ts_valid its validity bitmap
 *                        (Arrow's: bit i, least significant first, set = not NULL),
 *                        ts_nulls the number of NULLs
 *       received_at:     count float64
 *       data_offsets:    count + 1 int32 into data (the rows' JSON text, UTF-8, as stored;
 *                        the caller validates it: bytes.decode() once per batch)
 *       A batch stops short of ``limit`` rather than let data pass 1 GiB (int32 offsets).
 *       A row whose columns are not of the store's types (contract 5: device_id TEXT,
 *       seq INTEGER, ts REAL or NULL, received_at REAL, data TEXT) raises ValueError
 *       naming it: the caller reads that batch through Python's sqlite3 instead.
 *   Reader.close()
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

/* SQLite's C API, the part used here (https://sqlite.org/c3ref/intro.html) */
typedef struct sqlite3 sqlite3;
typedef struct sqlite3_stmt sqlite3_stmt;
#define SQLITE_OK 0
#define SQLITE_ROW 100
#define SQLITE_DONE 101
#define SQLITE_INTEGER 1
#define SQLITE_FLOAT 2
#define SQLITE_TEXT 3
#define SQLITE_NULL 5
#define SQLITE_OPEN_READWRITE 0x00000002

static struct {
    int (*open_v2)(const char *, sqlite3 **, int, const char *);
    int (*close_v2)(sqlite3 *);
    int (*busy_timeout)(sqlite3 *, int);
    int (*exec)(sqlite3 *, const char *, void *, void *, char **);
    int (*prepare_v2)(sqlite3 *, const char *, int, sqlite3_stmt **, const char **);
    int (*bind_int64)(sqlite3_stmt *, int, long long);
    int (*step)(sqlite3_stmt *);
    int (*reset)(sqlite3_stmt *);
    int (*finalize)(sqlite3_stmt *);
    int (*column_type)(sqlite3_stmt *, int);
    long long (*column_int64)(sqlite3_stmt *, int);
    double (*column_double)(sqlite3_stmt *, int);
    const unsigned char *(*column_text)(sqlite3_stmt *, int);
    int (*column_bytes)(sqlite3_stmt *, int);
    const char *(*errmsg)(sqlite3 *);
    const char *(*errstr)(int);
} api;
static void *library = NULL;
static PyObject *sqlite_error = NULL; /* sqlite3.OperationalError, from load() */

static const char READ_SQL[] =
    "SELECT rowid, device_id, seq, ts, received_at, data FROM messages WHERE rowid > ?1 ORDER BY rowid LIMIT ?2";
#define DATA_MAX (1u << 30)
static const char *const COLUMN[] = {"rowid", "device_id", "seq", "ts", "received_at", "data"};

static PyObject *load(PyObject *self, PyObject *args) {
    (void)self;
    const char *path;
    PyObject *error;
    if (!PyArg_ParseTuple(args, "sO:load", &path, &error)) return NULL;
    if (!PyType_Check(error) || !PyType_IsSubtype((PyTypeObject *)error, (PyTypeObject *)PyExc_Exception)) {
        PyErr_SetString(PyExc_TypeError, "load: error must be an exception class");
        return NULL;
    }
    if (library != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "load: the SQLite library is loaded already");
        return NULL;
    }
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        const char *why = dlerror();
        PyErr_Format(PyExc_OSError, "cannot load the SQLite library %s: %s", path, why ? why : "?");
        return NULL;
    }
    struct {
        const char *name;
        void **slot;
    } want[] = {
        {"sqlite3_open_v2", (void **)&api.open_v2},         {"sqlite3_close_v2", (void **)&api.close_v2},
        {"sqlite3_busy_timeout", (void **)&api.busy_timeout}, {"sqlite3_exec", (void **)&api.exec},
        {"sqlite3_prepare_v2", (void **)&api.prepare_v2},   {"sqlite3_bind_int64", (void **)&api.bind_int64},
        {"sqlite3_step", (void **)&api.step},               {"sqlite3_reset", (void **)&api.reset},
        {"sqlite3_finalize", (void **)&api.finalize},       {"sqlite3_column_type", (void **)&api.column_type},
        {"sqlite3_column_int64", (void **)&api.column_int64}, {"sqlite3_column_double", (void **)&api.column_double},
        {"sqlite3_column_text", (void **)&api.column_text}, {"sqlite3_column_bytes", (void **)&api.column_bytes},
        {"sqlite3_errmsg", (void **)&api.errmsg},           {"sqlite3_errstr", (void **)&api.errstr},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        *want[i].slot = dlsym(lib, want[i].name);
        if (*want[i].slot == NULL) {
            memset(&api, 0, sizeof api);
            dlclose(lib);
            PyErr_Format(PyExc_OSError, "the SQLite library %s has no %s", path, want[i].name);
            return NULL;
        }
    }
    library = lib;
    Py_INCREF(error);
    sqlite_error = error;
    Py_RETURN_NONE;
}

/* ---- growable buffers (malloc: filled with the GIL released) ---- */

typedef struct {
    char *p;
    size_t len, cap;
} Buf;

static int buf_put(Buf *b, const void *src, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        char *p = realloc(b->p, cap);
        if (p == NULL) return -1;
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, src, n);
    b->len += n;
    return 0;
}

static PyObject *buf_bytes(Buf *b) { return PyBytes_FromStringAndSize(b->p ? b->p : "", (Py_ssize_t)b->len); }

/* ---- the batch's devices: an open-addressing table of their ids ---- */

typedef struct {
    uint64_t hash;
    uint32_t off, len; /* in Devices.names */
    int32_t index;     /* first-seen order; -1: empty slot */
} Slot;

typedef struct {
    Slot *slots;
    size_t mask, used;
    Buf names;  /* the ids, one after another */
    Buf order;  /* Slot index per device, in first-seen order (uint32) */
    Buf counts; /* rows per device (int64) */
} Devices;

static uint64_t fnv1a(const unsigned char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ull;
    return h;
}

static int devices_grow(Devices *d) {
    size_t cap = d->slots ? (d->mask + 1) * 2 : 256;
    Slot *slots = malloc(cap * sizeof(Slot));
    if (slots == NULL) return -1;
    for (size_t i = 0; i < cap; i++) slots[i].index = -1;
    uint32_t *order = (uint32_t *)d->order.p;
    for (size_t k = 0; k < d->used; k++) {
        Slot s = d->slots[order[k]];
        size_t j = s.hash & (cap - 1);
        while (slots[j].index >= 0) j = (j + 1) & (cap - 1);
        slots[j] = s;
        order[k] = (uint32_t)j;
    }
    free(d->slots);
    d->slots = slots;
    d->mask = cap - 1;
    return 0;
}

/* The index of device id s (added when new); -1: out of memory. */
static int32_t devices_index(Devices *d, const unsigned char *s, size_t n) {
    if (d->slots == NULL || (d->used + 1) * 2 > d->mask + 1) {
        if (devices_grow(d)) return -1;
    }
    uint64_t h = fnv1a(s, n);
    size_t j = h & d->mask;
    for (;;) {
        Slot *slot = &d->slots[j];
        if (slot->index < 0) break;
        if (slot->hash == h && slot->len == n && memcmp(d->names.p + slot->off, s, n) == 0) {
            ((int64_t *)d->counts.p)[slot->index]++;
            return slot->index;
        }
        j = (j + 1) & d->mask;
    }
    Slot *slot = &d->slots[j];
    int64_t one = 1;
    uint32_t where = (uint32_t)j;
    if (n > UINT32_MAX || d->names.len + n > UINT32_MAX) return -1;
    slot->hash = h;
    slot->off = (uint32_t)d->names.len;
    slot->len = (uint32_t)n;
    if (buf_put(&d->names, s, n) || buf_put(&d->order, &where, sizeof where) ||
        buf_put(&d->counts, &one, sizeof one))
        return -1;
    slot->index = (int32_t)d->used++;
    return slot->index;
}

/* ---- Reader ---- */

typedef struct {
    PyObject_HEAD sqlite3 *db;
    sqlite3_stmt *stmt;
    int busy; /* a read() is running (the GIL is released meanwhile) */
} Reader;

static int sqlite_fail(sqlite3 *db, const char *what, int rc) {
    PyErr_Format(sqlite_error, "%s: %s", what, db ? api.errmsg(db) : api.errstr(rc));
    return -1;
}

static void reader_close_handles(Reader *r) {
    if (r->stmt) api.finalize(r->stmt);
    if (r->db) api.close_v2(r->db);
    r->stmt = NULL;
    r->db = NULL;
}

static int reader_init(Reader *r, PyObject *args, PyObject *kwds) {
    PyObject *path_obj;
    static char *kwlist[] = {"path", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&:Reader", kwlist, PyUnicode_FSConverter, &path_obj))
        return -1;
    if (library == NULL) {
        Py_DECREF(path_obj);
        PyErr_SetString(PyExc_RuntimeError, "Reader: load() the SQLite library first");
        return -1;
    }
    reader_close_handles(r);
    const char *path = PyBytes_AS_STRING(path_obj);
    int rc = api.open_v2(path, &r->db, SQLITE_OPEN_READWRITE, NULL);
    if (rc != SQLITE_OK) {
        sqlite_fail(r->db, path, rc);
        goto fail;
    }
    api.busy_timeout(r->db, 5000);
    rc = api.exec(r->db, "PRAGMA query_only=1", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        sqlite_fail(r->db, path, rc);
        goto fail;
    }
    rc = api.prepare_v2(r->db, READ_SQL, -1, &r->stmt, NULL);
    if (rc != SQLITE_OK) {
        sqlite_fail(r->db, path, rc);
        goto fail;
    }
    Py_DECREF(path_obj);
    return 0;
fail:
    reader_close_handles(r);
    Py_DECREF(path_obj);
    return -1;
}

static void reader_dealloc(Reader *r) {
    reader_close_handles(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

typedef struct {
    Buf rowid, index, seq, ts, valid, at, offsets, data;
    Devices dev;
    size_t count, nulls;
    int rc;              /* SQLite's result when stepping failed */
    int oom;             /* out of memory */
    long long bad_rowid; /* a row with unexpected column types */
    int bad_column, bad_type;
} Scan;

static void scan_free(Scan *s) {
    Buf *bufs[] = {&s->rowid, &s->index, &s->seq, &s->ts, &s->valid, &s->at, &s->offsets, &s->data,
                   &s->dev.names, &s->dev.order, &s->dev.counts};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]->p);
    free(s->dev.slots);
}

/* Step the statement to its end (GIL released): fill s; stop early before data passes DATA_MAX. */
static void scan(sqlite3_stmt *st, Scan *s) {
    int32_t zero = 0;
    if (buf_put(&s->offsets, &zero, sizeof zero)) goto oom;
    for (;;) {
        int rc = api.step(st);
        if (rc == SQLITE_DONE) return;
        if (rc != SQLITE_ROW) {
            s->rc = rc;
            return;
        }
        static const int want[6] = {SQLITE_INTEGER, SQLITE_TEXT, SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_FLOAT, SQLITE_TEXT};
        for (int c = 0; c < 6; c++) {
            int t = api.column_type(st, c);
            if (t != want[c] && !(c == 3 && t == SQLITE_NULL)) {
                s->bad_rowid = api.column_int64(st, 0);
                s->bad_column = c;
                s->bad_type = t;
                return;
            }
        }
        const unsigned char *text = api.column_text(st, 5);
        size_t tlen = (size_t)api.column_bytes(st, 5);
        if (text == NULL) goto oom;
        if (s->data.len + tlen > DATA_MAX) {
            if (s->count == 0) { /* one row over 1 GiB: not a store row */
                s->bad_rowid = api.column_int64(st, 0);
                s->bad_column = 5;
                s->bad_type = -1;
            }
            return;
        }
        const unsigned char *dev = api.column_text(st, 1);
        size_t dlen = (size_t)api.column_bytes(st, 1);
        if (dev == NULL) goto oom;
        int32_t index = devices_index(&s->dev, dev, dlen);
        if (index < 0) goto oom;
        /* column_text(5) before column_text(1) could have been invalidated by no later call:
           column_text only converts the column it is given, and these are TEXT already */
        long long rowid = api.column_int64(st, 0), seq = api.column_int64(st, 2);
        double at = api.column_double(st, 4), ts = 0.0;
        int has_ts = api.column_type(st, 3) != SQLITE_NULL;
        if (has_ts) ts = api.column_double(st, 3);
        size_t i = s->count;
        if (i % 8 == 0) {
            unsigned char byte = 0;
            if (buf_put(&s->valid, &byte, 1)) goto oom;
        }
        if (has_ts)
            ((unsigned char *)s->valid.p)[i / 8] |= (unsigned char)(1u << (i % 8));
        else
            s->nulls++;
        int32_t end = (int32_t)(s->data.len + tlen);
        if (buf_put(&s->rowid, &rowid, sizeof rowid) || buf_put(&s->index, &index, sizeof index) ||
            buf_put(&s->seq, &seq, sizeof seq) || buf_put(&s->ts, &ts, sizeof ts) ||
            buf_put(&s->at, &at, sizeof at) || buf_put(&s->data, text, tlen) || buf_put(&s->offsets, &end, sizeof end))
            goto oom;
        s->count++;
    }
oom:
    s->oom = 1;
}

static const char *type_name(int t) {
    switch (t) {
    case SQLITE_INTEGER: return "INTEGER";
    case SQLITE_FLOAT: return "REAL";
    case SQLITE_TEXT: return "TEXT";
    case 4: return "BLOB";
    case SQLITE_NULL: return "NULL";
    default: return "over 1 GiB";
    }
}

static PyObject *reader_read(Reader *r, PyObject *const *args, Py_ssize_t nargs) {
    long long after, limit;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "read expected 2 arguments (after, limit), got %zd", nargs);
        return NULL;
    }
    after = PyLong_AsLongLong(args[0]);
    if (after == -1 && PyErr_Occurred()) return NULL;
    limit = PyLong_AsLongLong(args[1]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    if (limit < 1 || limit > 1000000) {
        PyErr_Format(PyExc_ValueError, "read: limit must be 1..1000000, got %lld", limit);
        return NULL;
    }
    if (r->stmt == NULL) {
        PyErr_SetString(PyExc_ValueError, "read: the Reader is closed");
        return NULL;
    }
    if (r->busy) {
        PyErr_SetString(PyExc_RuntimeError, "read: the Reader is in use by another thread");
        return NULL;
    }
    Scan s;
    memset(&s, 0, sizeof s);
    s.bad_column = -1;
    sqlite3_stmt *st = r->stmt;
    r->busy = 1;
    Py_BEGIN_ALLOW_THREADS;
    if (api.bind_int64(st, 1, after) == SQLITE_OK && api.bind_int64(st, 2, limit) == SQLITE_OK)
        scan(st, &s);
    else
        s.rc = -1;
    api.reset(st); /* ends the read transaction: the store's checkpoints are not held back */
    Py_END_ALLOW_THREADS;
    r->busy = 0;
    PyObject *result = NULL;
    if (s.oom) {
        PyErr_NoMemory();
        goto done;
    }
    if (s.rc) {
        if (s.rc == -1)
            PyErr_Format(sqlite_error, "reading the store: cannot bind: %s", api.errmsg(r->db));
        else
            PyErr_Format(sqlite_error, "reading the store: %s (%s)", api.errmsg(r->db), api.errstr(s.rc));
        goto done;
    }
    if (s.bad_column >= 0) {
        PyErr_Format(PyExc_ValueError, "store row %lld: column %s is %s, not of the store's type", s.bad_rowid,
                     COLUMN[s.bad_column], type_name(s.bad_type));
        goto done;
    }
    if (s.count == 0) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    size_t ndev = s.dev.used;
    PyObject *devices = PyList_New((Py_ssize_t)ndev), *counts = PyList_New((Py_ssize_t)ndev);
    if (devices == NULL || counts == NULL) {
        Py_XDECREF(devices);
        Py_XDECREF(counts);
        goto done;
    }
    uint32_t *order = (uint32_t *)s.dev.order.p;
    for (size_t k = 0; k < ndev; k++) {
        Slot *slot = &s.dev.slots[order[k]];
        PyObject *name = PyUnicode_DecodeUTF8(s.dev.names.p + slot->off, slot->len, NULL);
        PyObject *n = PyLong_FromLongLong(((int64_t *)s.dev.counts.p)[slot->index]);
        if (name == NULL || n == NULL) {
            Py_XDECREF(name);
            Py_XDECREF(n);
            Py_DECREF(devices);
            Py_DECREF(counts);
            goto done;
        }
        PyList_SET_ITEM(devices, (Py_ssize_t)slot->index, name);
        PyList_SET_ITEM(counts, (Py_ssize_t)slot->index, n);
    }
    result = Py_BuildValue("(nNNNNNNNnNNN)", (Py_ssize_t)s.count, buf_bytes(&s.rowid), buf_bytes(&s.index),
                           devices, counts, buf_bytes(&s.seq), buf_bytes(&s.ts), buf_bytes(&s.valid),
                           (Py_ssize_t)s.nulls, buf_bytes(&s.at), buf_bytes(&s.offsets), buf_bytes(&s.data));
done:
    scan_free(&s);
    return result;
}

static PyObject *reader_close(Reader *r, PyObject *unused) {
    (void)unused;
    if (r->busy) {
        PyErr_SetString(PyExc_RuntimeError, "close: the Reader is in use by another thread");
        return NULL;
    }
    reader_close_handles(r);
    Py_RETURN_NONE;
}

static PyMethodDef reader_methods[] = {
    {"read", (PyCFunction)(void (*)(void))reader_read, METH_FASTCALL,
     "read(after, limit) -> None | columns: up to limit store rows after rowid `after` (see _storeread.c)."},
    {"close", (PyCFunction)reader_close, METH_NOARGS, "close() -> None: close the store (idempotent)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "node.storage._storeread.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Reader(path): the SQLite store read in columns (see _storeread.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)reader_init,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_methods = reader_methods,
};

static PyMethodDef methods[] = {
    {"load", load, METH_VARARGS, "load(library, error) -> None: dlopen the SQLite library Python's sqlite3 uses."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "node.storage._storeread",
    "The SQLite store read in columns through SQLite's C API (see _storeread.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__storeread(void) {
    if (PyType_Ready(&ReaderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
