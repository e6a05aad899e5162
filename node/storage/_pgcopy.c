/* The PostgreSQL sink's COPY text of a batch read in columns, built in C.
 *
 * format_copy(cols, idents, contexts, data_field) -> (bytes body, list days) | None
 *
 *   cols:       the batch read in columns (node.storage.source.Columns, _storeread.c);
 *   idents:     idents[k] is the COPY field of cols.devices[k] (postgres._device_fields);
 *   contexts:   contexts[k] its context fields between received_at and data, with the tab
 *               before and after them ("\ttype\tclass...\tlabels\t");
 *   data_field: data_field(text) -> str, the COPY field of a data text that holds a
 *               backslash, tab, newline or carriage return (postgres._data_field:
 *               jsonb_text, then COPY's escapes).
 *
 * The body is, byte for byte, the UTF-8 of "".join(postgres.copy_text(batch)) for the same
 * rows (tests/storage/test_postgres_native.py checks it with hypothesis): per row
 * "<ident>\t<seq>\t<repr(ts) or \N>\t<YYYY-MM-DD HH:MM:SS>.<micro>+00<context><data>\n",
 * received_at as PostgreSQL's to_timestamp() rounds it (microseconds since 2000 =
 * rint((seconds - 946684800) * 1e6), round half to even: postgres.pg_micros).  days are
 * the distinct UTC days (since 1970) of those times, first seen first: postgres.pg_day of
 * each row, the partitions the batch needs.
 *
 * None: a receive time this code does not format (not finite, or a year outside
 * 1000..9999, where Python's datetime or strftime behave otherwise); the caller formats
 * the batch in Python, which gives whatever it gives there (an error for a time out of
 * datetime's range, as before).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_cout.h"

#define PG_EPOCH_UNIX 946684800.0 /* s from the unix epoch to PostgreSQL's (2000-01-01) */
#define PG_EPOCH_UNIX_LL 946684800LL
#define DAY 86400LL


/* n digits of v, zero-padded */
static inline void digits(char *w, long long v, int n) {
    for (int k = n - 1; k >= 0; k--) {
        w[k] = (char)('0' + v % 10);
        v /= 10;
    }
}

/* The civil date of a day since 1970-01-01 (H. Hinnant's civil_from_days). */
static void civil(long long z, long long *y, int *m, int *d) {
    z += 719468;
    long long era = (z >= 0 ? z : z - 146096) / 146097;
    long long doe = z - era * 146097;
    long long yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    long long doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    long long mp = (5 * doy + 2) / 153;
    *d = (int)(doy - (153 * mp + 2) / 5 + 1);
    *m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *y = yoe + era * 400 + (*m <= 2);
}

static long long floor_div(long long a, long long b) {
    long long q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}


/* UTF-8 of each str of a tuple, once */
static int utf8_all(PyObject *strs, const char **text, size_t *len, const char *what) {
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(strs); k++) {
        PyObject *s = PyTuple_GET_ITEM(strs, k);
        Py_ssize_t n;
        if (!PyUnicode_CheckExact(s)) {
            PyErr_Format(PyExc_TypeError, "format_copy: %s[%zd] is not a str", what, k);
            return -1;
        }
        if ((text[k] = PyUnicode_AsUTF8AndSize(s, &n)) == NULL) return -1;
        len[k] = (size_t)n;
    }
    return 0;
}

static PyObject *format_copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "format_copy expected 4 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *cols = args[0], *data_field = args[3];
    if (!PyTuple_Check(cols) || PyTuple_GET_SIZE(cols) != 12) {
        PyErr_SetString(PyExc_TypeError, "format_copy: cols must be node.storage.source.Columns");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(PyTuple_GET_ITEM(cols, 0));
    if (n == -1 && PyErr_Occurred()) return NULL;
    PyObject *devices = PyTuple_GET_ITEM(cols, 3);
    if (n < 0 || !PyList_CheckExact(devices) || !PyList_CheckExact(args[1]) || !PyList_CheckExact(args[2]) ||
        PyList_GET_SIZE(args[1]) != PyList_GET_SIZE(devices) || PyList_GET_SIZE(args[2]) != PyList_GET_SIZE(devices)) {
        PyErr_SetString(PyExc_ValueError, "format_copy: idents and contexts must be lists of one str per device");
        return NULL;
    }
    size_t count = (size_t)n;
    const char *index = column(cols, 2, "format_copy", "device_index", count * 4), *seq = column(cols, 5, "format_copy", "seq", count * 8),
               *ts = column(cols, 6, "format_copy", "ts", count * 8), *valid = column(cols, 7, "format_copy", "ts_valid", (count + 7) / 8),
               *at = column(cols, 9, "format_copy", "received_at", count * 8),
               *offsets = column(cols, 10, "format_copy", "data_offsets", (count + 1) * 4), *data = column(cols, 11, "format_copy", "data", 0);
    if (!index || !seq || !ts || !valid || !at || !offsets || !data) return NULL;
    size_t data_len = (size_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(cols, 11));
    Py_ssize_t ndev = PyList_GET_SIZE(devices);
    Out out = {NULL, 0, 0};
    PyObject *result = NULL, *days = NULL;
    /* tuples: data_field runs Python code, and the UTF-8 of the fields must outlive it */
    PyObject *idents = PyList_AsTuple(args[1]), *contexts = PyList_AsTuple(args[2]);
    const char **itext = PyMem_Calloc((size_t)ndev + 1, sizeof(char *)),
               **ctext = PyMem_Calloc((size_t)ndev + 1, sizeof(char *));
    size_t *ilen = PyMem_Calloc((size_t)ndev + 1, sizeof(size_t)),
           *clen = PyMem_Calloc((size_t)ndev + 1, sizeof(size_t));
    long long *seen = NULL; /* distinct days so far */
    size_t nseen = 0, capseen = 0;
    if (idents == NULL || contexts == NULL || itext == NULL || ctext == NULL || ilen == NULL || clen == NULL) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    if (utf8_all(idents, itext, ilen, "idents") || utf8_all(contexts, ctext, clen, "contexts")) goto done;
    long long cached_second = LLONG_MIN, last_day = LLONG_MIN;
    char when[19]; /* "YYYY-MM-DD HH:MM:SS" of cached_second */
    for (size_t i = 0; i < count; i++) {
        int32_t dev, lo, hi;
        long long sq;
        double tsv, atv;
        memcpy(&dev, index + 4 * i, 4);
        memcpy(&lo, offsets + 4 * i, 4);
        memcpy(&hi, offsets + 4 * (i + 1), 4);
        memcpy(&sq, seq + 8 * i, 8);
        memcpy(&tsv, ts + 8 * i, 8);
        memcpy(&atv, at + 8 * i, 8);
        if (dev < 0 || dev >= ndev || lo < 0 || hi < lo || (size_t)hi > data_len) {
            PyErr_Format(PyExc_ValueError, "format_copy: row %zu's device or data offsets are out of range", i);
            goto done;
        }
        /* received_at: microseconds since 2000 as postgres.pg_micros (rint: half to even) */
        double micros = nearbyint((atv - PG_EPOCH_UNIX) * 1000000.0);
        if (!isfinite(micros) || fabs(micros) > 4.0e17) goto python; /* beyond year 9999 anyway */
        long long total = (long long)micros;
        long long second = floor_div(total, 1000000), micro = total - second * 1000000;
        if (second != cached_second) {
            long long unix_s = second + PG_EPOCH_UNIX_LL, day = floor_div(unix_s, DAY), sod = unix_s - day * DAY;
            long long y;
            int m, d;
            civil(day, &y, &m, &d);
            if (y < 1000 || y > 9999) goto python;
            digits(when, y, 4);
            when[4] = '-';
            digits(when + 5, m, 2);
            when[7] = '-';
            digits(when + 8, d, 2);
            when[10] = ' ';
            digits(when + 11, sod / 3600, 2);
            when[13] = ':';
            digits(when + 14, sod / 60 % 60, 2);
            when[16] = ':';
            digits(when + 17, sod % 60, 2);
            cached_second = second;
            if (day != last_day) {
                last_day = day;
                size_t k = 0;
                while (k < nseen && seen[k] != day) k++;
                if (k == nseen) {
                    if (nseen == capseen) {
                        size_t cap = capseen ? capseen * 2 : 8;
                        long long *grown = PyMem_Realloc(seen, cap * sizeof(long long));
                        if (grown == NULL) {
                            PyErr_NoMemory();
                            goto done;
                        }
                        seen = grown;
                        capseen = cap;
                    }
                    seen[nseen++] = day;
                }
            }
        }
        if (out_put(&out, itext[dev], ilen[dev]) || out_put(&out, "\t", 1) || out_ll(&out, sq) ||
            out_put(&out, "\t", 1))
            goto done;
        if ((((const unsigned char *)valid)[i >> 3] >> (i & 7)) & 1) {
            char *repr = PyOS_double_to_string(tsv, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
            if (repr == NULL) goto done;
            int rc = out_put(&out, repr, strlen(repr));
            PyMem_Free(repr);
            if (rc) goto done;
        } else if (out_put(&out, "\\N", 2)) {
            goto done;
        }
        char frac[11] = {'\t', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
        if (out_put(&out, frac, 1) || out_put(&out, when, sizeof when)) goto done;
        frac[0] = '.';
        digits(frac + 1, micro, 6);
        frac[7] = '+';
        frac[8] = '0';
        frac[9] = '0';
        if (out_put(&out, frac, 10) || out_put(&out, ctext[dev], clen[dev])) goto done;
        const char *text = data + lo;
        size_t tlen = (size_t)(hi - lo);
        int plain = 1;
        for (size_t k = 0; k < tlen; k++) {
            char c = text[k];
            if (c == '\\' || c == '\t' || c == '\n' || c == '\r') {
                plain = 0;
                break;
            }
        }
        if (plain) {
            if (out_put(&out, text, tlen)) goto done;
        } else {
            PyObject *s = PyUnicode_DecodeUTF8(text, (Py_ssize_t)tlen, NULL);
            if (s == NULL) goto done;
            PyObject *field = PyObject_CallOneArg(data_field, s);
            Py_DECREF(s);
            if (field == NULL) goto done;
            Py_ssize_t flen;
            const char *ftext = PyUnicode_Check(field) ? PyUnicode_AsUTF8AndSize(field, &flen) : NULL;
            if (ftext == NULL) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "format_copy: data_field must return a str");
                Py_DECREF(field);
                goto done;
            }
            int rc = out_put(&out, ftext, (size_t)flen);
            Py_DECREF(field);
            if (rc) goto done;
        }
        if (out_put(&out, "\n", 1)) goto done;
    }
    days = PyList_New((Py_ssize_t)nseen);
    if (days == NULL) goto done;
    for (size_t k = 0; k < nseen; k++) {
        PyObject *v = PyLong_FromLongLong(seen[k]);
        if (v == NULL) goto done;
        PyList_SET_ITEM(days, (Py_ssize_t)k, v);
    }
    PyObject *body = PyBytes_FromStringAndSize(out.buf ? out.buf : "", (Py_ssize_t)out.len);
    if (body != NULL) result = Py_BuildValue("(NO)", body, days);
    goto done;
python:
    Py_INCREF(Py_None);
    result = Py_None;
done:
    Py_XDECREF(days);
    Py_XDECREF(idents);
    Py_XDECREF(contexts);
    PyMem_Free(itext);
    PyMem_Free(ctext);
    PyMem_Free(ilen);
    PyMem_Free(clen);
    PyMem_Free(seen);
    PyMem_Free(out.buf);
    return result;
}

static PyMethodDef methods[] = {
    {"format_copy", (PyCFunction)(void (*)(void))format_copy, METH_FASTCALL,
     "format_copy(cols, idents, contexts, data_field) -> (bytes, list) | None: a batch in columns as COPY text."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "node.storage._pgcopy",
    "The PostgreSQL sink's COPY text built in C (see _pgcopy.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__pgcopy(void) { return PyModule_Create(&module); }
