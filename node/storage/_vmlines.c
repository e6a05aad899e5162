/* node.storage._vmlines: the VictoriaMetrics sink's line protocol, formatted in C.
 *
 * format_batch(rows, prefixes, fallback) -> (bytes body, int skipped)
 * format_columns(cols, prefixes, prefix_of, fallback) -> (bytes body, int skipped)
 *
 *   rows:      the store's tuples (rowid, device_id, seq, ts, received_at, data JSON text);
 *   prefixes:  device_id -> "measurement,tags" (node.storage.victoria._prefix);
 *   fallback:  fallback(row, prefixes) -> (line str, skipped int), the Python formatter
 *              (node.storage.victoria.raw_line), called for every row this code does not
 *              format itself.
 *   cols:      the same rows read in columns (node.storage.source.Columns, _storeread.c);
 *              prefixes is then a list (the prefix of cols.devices[k] at k), prefix_of the
 *              dict above, and the fallback gets the row rebuilt as the store's tuple.
 *
 * The body is, byte for byte, what "\n".join(lines) + "\n" encoded gives for the lines
 * of raw_line (tests/storage/test_victoria_native.py checks it with hypothesis): for each
 * row "<prefix> <fields>,iotnode_seq=<seq> <ms>\n".  Fields follow victoria._fields over
 * orjson.loads(data): numbers (ints as their digits, floats as repr(), booleans 0/1) named
 * after their path (nested objects joined with "_", up to depth 3), every character
 * outside [A-Za-z0-9_] as "_", a leading digit prefixed with "_", an empty name "value";
 * strings, lists, nulls and objects nested too deep counted as skipped.
 *
 * This code parses the JSON itself and hands a row to the fallback whenever its result
 * could differ from Python's: a key with an escape, a key repeated in one object (a dict
 * keeps the last value at the first key's place), an integer of more than 18 digits or
 * "-0" (orjson makes floats or 0 of those), a float that overflows (orjson refuses it,
 * json gives inf), text that is not JSON as this parser reads it, a row that is not
 * (int, str, int, float|None, float, str), a time that does not fit.  The common case --
 * an object of numbers with plain keys -- never leaves C.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_cout.h"

#define YEAR (365 * 86400.0)
#define MAX_DEPTH 3     /* victoria._MAX_DEPTH: objects at depth 0..2 are expanded */
#define MAX_NAME 512    /* bytes of a field's raw path; longer: fallback */
#define MAX_KEYS 64     /* members of one expanded object; more: fallback */
#define MAX_NEST 128    /* nesting of skipped values; deeper: fallback */
#define MAX_NUMBER 64   /* characters of a float's text; longer: fallback */

enum { OK = 0, FALLBACK = 1, ERROR = -1, MORE = 2 };


typedef struct {
    const char *p, *end;
} Cur;

static inline void ws(Cur *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

/* A string at c->p (the opening quote).  *s, *n: its raw bytes between the quotes;
 * *escaped: whether it holds a backslash.  FALLBACK if it is not a JSON string. */
static int string(Cur *c, const char **s, size_t *n, int *escaped) {
    if (c->p >= c->end || *c->p != '"') return FALLBACK;
    const char *start = ++c->p;
    int esc = 0;
    while (c->p < c->end) {
        unsigned char ch = (unsigned char)*c->p;
        if (ch == '"') {
            *s = start;
            *n = (size_t)(c->p - start);
            *escaped = esc;
            c->p++;
            return OK;
        }
        if (ch < 0x20) return FALLBACK;
        if (ch == '\\') {
            esc = 1;
            if (c->end - c->p < 2) return FALLBACK;
            char e = c->p[1];
            if (e == 'u') {
                if (c->end - c->p < 6) return FALLBACK;
                for (int i = 2; i < 6; i++)
                    if (!((c->p[i] >= '0' && c->p[i] <= '9') || (c->p[i] >= 'a' && c->p[i] <= 'f') ||
                          (c->p[i] >= 'A' && c->p[i] <= 'F')))
                        return FALLBACK;
                c->p += 6;
                continue;
            }
            if (e == '\0' || !strchr("\"\\/bfnrt", e)) return FALLBACK;
            c->p += 2;
            continue;
        }
        c->p++;
    }
    return FALLBACK;
}

/* A number at c->p: its text [*s, *s + *n) and whether it has a fraction or exponent. */
static int number(Cur *c, const char **s, size_t *n, int *is_float) {
    const char *p = c->p, *e = c->end;
    const char *start = p;
    int flt = 0;
    if (p < e && *p == '-') p++;
    if (p >= e) return FALLBACK;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < e && *p >= '0' && *p <= '9') p++;
    } else {
        return FALLBACK;
    }
    if (p < e && *p == '.') {
        flt = 1;
        p++;
        if (p >= e || !(*p >= '0' && *p <= '9')) return FALLBACK;
        while (p < e && *p >= '0' && *p <= '9') p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        flt = 1;
        p++;
        if (p < e && (*p == '+' || *p == '-')) p++;
        if (p >= e || !(*p >= '0' && *p <= '9')) return FALLBACK;
        while (p < e && *p >= '0' && *p <= '9') p++;
    }
    *s = start;
    *n = (size_t)(p - start);
    *is_float = flt;
    c->p = p;
    return OK;
}

static int literal(Cur *c, const char *word, size_t n) {
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0) return FALLBACK;
    c->p += n;
    return OK;
}

/* Past an array's or object's opening character: whether it is empty (then also past its
 * closing one). */
static int empty(Cur *c, char close) {
    c->p++;
    ws(c);
    if (c->p < c->end && *c->p == close) {
        c->p++;
        return 1;
    }
    return 0;
}

/* After an array's or object's member: MORE past a ',' (another member follows), OK past the
 * closing character, FALLBACK otherwise. */
static int more(Cur *c, char close) {
    ws(c);
    if (c->p >= c->end) return FALLBACK;
    if (*c->p == ',') {
        c->p++;
        return MORE;
    }
    if (*c->p == close) {
        c->p++;
        return OK;
    }
    return FALLBACK;
}

/* Step over any value (a skipped one: only its validity matters). */
static int skip(Cur *c, int nest) {
    if (nest > MAX_NEST) return FALLBACK;
    ws(c);
    if (c->p >= c->end) return FALLBACK;
    const char *s;
    size_t n;
    int flag;
    switch (*c->p) {
    case '"':
        return string(c, &s, &n, &flag);
    case 't':
        return literal(c, "true", 4);
    case 'f':
        return literal(c, "false", 5);
    case 'n':
        return literal(c, "null", 4);
    case '[':
        if (empty(c, ']')) return OK;
        for (;;) {
            if (skip(c, nest + 1) != OK) return FALLBACK;
            int rc = more(c, ']');
            if (rc != MORE) return rc;
        }
    case '{':
        if (empty(c, '}')) return OK;
        for (;;) {
            ws(c);
            if (string(c, &s, &n, &flag) != OK) return FALLBACK;
            ws(c);
            if (c->p >= c->end || *c->p != ':') return FALLBACK;
            c->p++;
            if (skip(c, nest + 1) != OK) return FALLBACK;
            int rc = more(c, '}');
            if (rc != MORE) return rc;
        }
    default:
        return number(c, &s, &n, &flag);
    }
}

/* Whether a JSON number text with a fraction is already repr(float(text)), so that it can be
 * copied: "-"? int "." frac, no exponent, at most 15 significant digits (every decimal of 15
 * digits is a distinct double, so the shortest digits that round-trip are the text's own),
 * a fraction without trailing zeros (or exactly "0"), and repr's fixed-point range: at most
 * 16 integer digits, or "0." and at most 3 zeros before the first digit (repr writes
 * 0.0001 as is and 0.00001 as 1e-05).  Anything else is converted and formatted by Python's
 * own float repr (PyOS_double_to_string). */
static int is_repr(const char *s, size_t n) {
    const char *p = s, *e = s + n;
    if (*p == '-') p++;
    const char *int0 = p;
    while (p < e && *p >= '0' && *p <= '9') p++;
    size_t ints = (size_t)(p - int0);
    if (p >= e || *p != '.') return 0;
    const char *frac0 = ++p;
    while (p < e && *p >= '0' && *p <= '9') p++;
    size_t fracs = (size_t)(p - frac0);
    if (p != e || ints == 0 || fracs == 0) return 0; /* an exponent, or not this shape */
    if (frac0[fracs - 1] == '0') {
        if (fracs != 1) return 0; /* trailing zeros: repr drops them */
        size_t sig = ints;        /* an integral value: its digits without the trailing zeros */
        while (sig > 0 && int0[sig - 1] == '0') sig--;
        return ints <= 16 && sig <= 15;
    }
    if (ints == 1 && int0[0] == '0') {
        size_t zeros = 0;
        while (zeros < fracs && frac0[zeros] == '0') zeros++;
        return zeros <= 3 && fracs - zeros <= 15;
    }
    return ints <= 16 && ints + fracs <= 15;
}

/* "<metric_name(raw or 'value')>=" */
static int put_name(Out *o, const char *raw, size_t n) {
    if (n == 0) {
        raw = "value";
        n = 5;
    }
    if (out_grow(o, n + 2) < 0) return ERROR;
    char *w = o->buf + o->len;
    char *w0 = w;
    if (raw[0] >= '0' && raw[0] <= '9') *w++ = '_';
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)raw[i];
        if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_')
            *w++ = (char)ch;
        else if (ch < 0x80 || ch >= 0xC0)
            *w++ = '_'; /* one "_" per character: an ASCII one or a UTF-8 lead byte */
        /* a UTF-8 continuation byte belongs to the character already written */
    }
    *w++ = '=';
    o->len += (size_t)(w - w0);
    return OK;
}

typedef struct {
    Out *out;
    long long skipped;
    int fields; /* fields written in this row */
    char name[MAX_NAME];
} Row;

static int sep(Row *r) {
    if (r->fields++ && out_ch(r->out, ',') < 0) return ERROR;
    return OK;
}

/* victoria._fields(value at c->p, name[0:n], out, depth) */
static int fields(Row *r, Cur *c, size_t n, int depth) {
    ws(c);
    if (c->p >= c->end) return FALLBACK;
    char ch = *c->p;
    const char *s;
    size_t len;
    int flag;
    if (ch == 't' || ch == 'f') {
        if (ch == 't' ? literal(c, "true", 4) : literal(c, "false", 5)) return FALLBACK;
        if (sep(r) || put_name(r->out, r->name, n) || out_ch(r->out, ch == 't' ? '1' : '0')) return ERROR;
        return OK;
    }
    if (ch == '-' || (ch >= '0' && ch <= '9')) {
        if (number(c, &s, &len, &flag) != OK) return FALLBACK;
        if (!flag) {
            size_t digits = len - (s[0] == '-');
            if (digits > 18 || (len == 2 && s[0] == '-' && s[1] == '0')) return FALLBACK;
            if (sep(r) || put_name(r->out, r->name, n) || out_put(r->out, s, len)) return ERROR;
            return OK;
        }
        if (is_repr(s, len)) {
            if (sep(r) || put_name(r->out, r->name, n) || out_put(r->out, s, len)) return ERROR;
            return OK;
        }
        if (len >= MAX_NUMBER) return FALLBACK;
        char text[MAX_NUMBER];
        memcpy(text, s, len);
        text[len] = '\0';
        char *end = NULL;
        double v = PyOS_string_to_double(text, &end, NULL); /* correctly rounded, as orjson's */
        if (v == -1.0 && PyErr_Occurred()) return ERROR;
        if (end != text + len || !isfinite(v)) return FALLBACK;
        char *repr = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (repr == NULL) return ERROR;
        int rc = (sep(r) || put_name(r->out, r->name, n) || out_put(r->out, repr, strlen(repr))) ? ERROR : OK;
        PyMem_Free(repr);
        return rc;
    }
    if (ch == '{' && depth < MAX_DEPTH) {
        const char *keys[MAX_KEYS];
        size_t lens[MAX_KEYS];
        int count = 0;
        if (empty(c, '}')) return OK;
        for (;;) {
            ws(c);
            if (string(c, &s, &len, &flag) != OK || flag) return FALLBACK;
            if (count == MAX_KEYS) return FALLBACK;
            for (int i = 0; i < count; i++)
                if (lens[i] == len && memcmp(keys[i], s, len) == 0) return FALLBACK; /* a repeated key */
            keys[count] = s;
            lens[count] = len;
            count++;
            size_t m = n;  /* the child's name: name + "_" + key, or the key at the top */
            if (n) {
                if (n + 1 + len > MAX_NAME) return FALLBACK;
                r->name[m++] = '_';
            } else if (len > MAX_NAME) {
                return FALLBACK;
            }
            memcpy(r->name + m, s, len);
            m += len;
            ws(c);
            if (c->p >= c->end || *c->p != ':') return FALLBACK;
            c->p++;
            int rc = fields(r, c, m, depth + 1);
            if (rc != OK) return rc;
            rc = more(c, '}');
            if (rc != MORE) return rc;
        }
    }
    /* a string, list, null, or an object nested too deep: one skipped value */
    if (skip(c, depth) != OK) return FALLBACK;
    r->skipped++;
    return OK;
}

/* One row formatted into out from its parts (prefix and data as UTF-8); FALLBACK leaves out
 * as it was. */
static int format_text(Out *out, const char *ptext, size_t plen, long long seqv, int has_ts, double tsv,
                       double atv, const char *dtext, size_t dlen, long long *skipped) {
    /* victoria._ms: the device's time if finite and within a year of received_at */
    double when = atv;
    if (has_ts && isfinite(tsv) && fabs(tsv - atv) <= YEAR) when = tsv;
    double ms = nearbyint(when * 1000); /* round half to even, as Python's round() */
    if (!isfinite(ms) || fabs(ms) >= 9.0e18) return FALLBACK;
    size_t mark = out->len;
    Row r;
    r.out = out;
    r.skipped = 0;
    r.fields = 0;
    if (out_put(out, ptext, plen) || out_ch(out, ' ')) return ERROR;
    Cur c = {dtext, dtext + dlen};
    int rc = fields(&r, &c, 0, 0);
    if (rc == OK) {
        ws(&c);
        if (c.p != c.end) rc = FALLBACK; /* text after the value */
    }
    if (rc != OK) {
        out->len = mark;
        return rc;
    }
    if ((r.fields && out_ch(out, ',')) || out_put(out, "iotnode_seq=", 12) || out_ll(out, seqv) ||
        out_ch(out, ' ') || out_ll(out, (long long)ms) || out_ch(out, '\n'))
        return ERROR;
    *skipped += r.skipped;
    return OK;
}

/* One store row (a tuple) formatted into out; FALLBACK leaves out as it was. */
static int format_row(Out *out, PyObject *row, PyObject *prefixes, long long *skipped) {
    if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != 6) return FALLBACK;
    PyObject *device = PyTuple_GET_ITEM(row, 1), *seq = PyTuple_GET_ITEM(row, 2);
    PyObject *ts = PyTuple_GET_ITEM(row, 3), *at = PyTuple_GET_ITEM(row, 4), *data = PyTuple_GET_ITEM(row, 5);
    if (!PyUnicode_CheckExact(device) || !PyLong_CheckExact(seq) || !PyFloat_CheckExact(at) ||
        !PyUnicode_CheckExact(data) || (ts != Py_None && !PyFloat_CheckExact(ts)))
        return FALLBACK;
    PyObject *prefix = PyDict_GetItemWithError(prefixes, device);
    if (prefix == NULL) {
        if (PyErr_Occurred()) return ERROR;
        return FALLBACK; /* raises the KeyError Python would */
    }
    if (!PyUnicode_CheckExact(prefix)) return FALLBACK;
    int overflow = 0;
    long long seqv = PyLong_AsLongLongAndOverflow(seq, &overflow);
    if (overflow || (seqv == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return FALLBACK;
    }
    Py_ssize_t plen, dlen;
    const char *ptext = PyUnicode_AsUTF8AndSize(prefix, &plen);
    if (ptext == NULL) {
        PyErr_Clear();
        return FALLBACK;
    }
    const char *dtext = PyUnicode_AsUTF8AndSize(data, &dlen);
    if (dtext == NULL) {
        PyErr_Clear(); /* a lone surrogate: Python's json reads it */
        return FALLBACK;
    }
    double tsv = ts == Py_None ? 0.0 : PyFloat_AS_DOUBLE(ts);
    return format_text(out, ptext, (size_t)plen, seqv, ts != Py_None, tsv, PyFloat_AS_DOUBLE(at), dtext,
                       (size_t)dlen, skipped);
}

static int call_fallback(Out *out, PyObject *fallback, PyObject *row, PyObject *prefixes, long long *skipped) {
    PyObject *res = PyObject_CallFunctionObjArgs(fallback, row, prefixes, NULL);
    if (res == NULL) return ERROR;
    int rc = ERROR;
    if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(res, 0))) {
        PyErr_SetString(PyExc_TypeError, "format_batch: fallback must return (str, int)");
        goto done;
    }
    long long n = PyLong_AsLongLong(PyTuple_GET_ITEM(res, 1));
    if (n == -1 && PyErr_Occurred()) goto done;
    Py_ssize_t len;
    const char *text = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(res, 0), &len);
    if (text == NULL) goto done;
    if (out_put(out, text, (size_t)len) || out_ch(out, '\n')) goto done;
    *skipped += n;
    rc = OK;
done:
    Py_DECREF(res);
    return rc;
}

static PyObject *format_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "format_batch expected 3 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *rows = PySequence_Fast(args[0], "format_batch: rows must be a sequence");
    if (rows == NULL) return NULL;
    PyObject *prefixes = args[1], *fallback = args[2];
    if (!PyDict_Check(prefixes)) {
        Py_DECREF(rows);
        PyErr_SetString(PyExc_TypeError, "format_batch: prefixes must be a dict");
        return NULL;
    }
    Out out = {NULL, 0, 0};
    long long skipped = 0;
    PyObject *result = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(rows);
    for (Py_ssize_t i = 0; i < n; i++) {
        /* a fallback call may run any Python code: take the row afresh, and hold it */
        PyObject *row = PySequence_Fast_GET_ITEM(rows, i);
        Py_INCREF(row);
        int rc = format_row(&out, row, prefixes, &skipped);
        if (rc == FALLBACK) rc = call_fallback(&out, fallback, row, prefixes, &skipped);
        Py_DECREF(row);
        if (rc != OK) goto done;
        if (PySequence_Fast_GET_SIZE(rows) != n) {
            PyErr_SetString(PyExc_RuntimeError, "format_batch: rows changed size during formatting");
            goto done;
        }
    }
    PyObject *body = PyBytes_FromStringAndSize(out.buf ? out.buf : "", (Py_ssize_t)out.len);
    if (body != NULL) {
        result = Py_BuildValue("(NL)", body, skipped);
    }
done:
    PyMem_Free(out.buf);
    Py_DECREF(rows);
    return result;
}


/* Row i of the columns as the store's tuple (rowid, device_id, seq, ts|None, received_at, data),
 * for the fallback. */
static PyObject *column_row(long long rowid, PyObject *device, long long seq, int has_ts, double ts, double at,
                            const char *data, size_t dlen) {
    PyObject *text = PyUnicode_DecodeUTF8(data, (Py_ssize_t)dlen, NULL);
    if (text == NULL) return NULL;
    PyObject *tsobj = has_ts ? PyFloat_FromDouble(ts) : (Py_INCREF(Py_None), Py_None);
    if (tsobj == NULL) {
        Py_DECREF(text);
        return NULL;
    }
    return Py_BuildValue("(LOLNdN)", rowid, device, seq, tsobj, at, text);
}

/* format_columns(cols, prefixes, prefix_of, fallback): format_batch of a batch read in columns
 * (node.storage.source.Columns); prefixes[k] is the prefix of cols.devices[k], prefix_of the
 * same as a dict for the fallback, which gets the row rebuilt as the store's tuple. */
static PyObject *format_columns(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "format_columns expected 4 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *cols = args[0], *prefixes = args[1], *prefix_of = args[2], *fallback = args[3];
    if (!PyTuple_Check(cols) || PyTuple_GET_SIZE(cols) != 12) {
        PyErr_SetString(PyExc_TypeError, "format_columns: cols must be node.storage.source.Columns");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(PyTuple_GET_ITEM(cols, 0));
    if (n == -1 && PyErr_Occurred()) return NULL;
    PyObject *devices = PyTuple_GET_ITEM(cols, 3);
    if (n < 0 || !PyList_CheckExact(devices) || !PyList_CheckExact(prefixes) ||
        PyList_GET_SIZE(prefixes) != PyList_GET_SIZE(devices) || !PyDict_Check(prefix_of)) {
        PyErr_SetString(PyExc_ValueError, "format_columns: prefixes must be a list of one str per device");
        return NULL;
    }
    size_t count = (size_t)n;
    const char *rowid = column(cols, 1, "format_columns", "rowid", count * 8), *index = column(cols, 2, "format_columns", "device_index", count * 4),
               *seq = column(cols, 5, "format_columns", "seq", count * 8), *ts = column(cols, 6, "format_columns", "ts", count * 8),
               *valid = column(cols, 7, "format_columns", "ts_valid", (count + 7) / 8), *at = column(cols, 9, "format_columns", "received_at", count * 8),
               *offsets = column(cols, 10, "format_columns", "data_offsets", (count + 1) * 4), *data = column(cols, 11, "format_columns", "data", 0);
    if (!rowid || !index || !seq || !ts || !valid || !at || !offsets || !data) return NULL;
    size_t data_len = (size_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(cols, 11));
    Py_ssize_t ndev = PyList_GET_SIZE(devices);
    /* the prefixes as UTF-8, once per device */
    const char **ptext = PyMem_Calloc((size_t)ndev + 1, sizeof(char *));
    size_t *plen = PyMem_Calloc((size_t)ndev + 1, sizeof(size_t));
    Out out = {NULL, 0, 0};
    long long skipped = 0;
    PyObject *result = NULL;
    /* tuples: a fallback runs Python code, and the UTF-8 of the prefixes must outlive it */
    prefixes = PyList_AsTuple(prefixes);
    devices = PyList_AsTuple(devices);
    if (prefixes == NULL || devices == NULL || ptext == NULL || plen == NULL) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < ndev; k++) {
        PyObject *p = PyTuple_GET_ITEM(prefixes, k);
        Py_ssize_t len;
        if (!PyUnicode_CheckExact(p) || (ptext[k] = PyUnicode_AsUTF8AndSize(p, &len)) == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "format_columns: a prefix is not a str");
            goto done;
        }
        plen[k] = (size_t)len;
    }
    for (size_t i = 0; i < count; i++) {
        int32_t dev, lo, hi;
        long long rid, sq;
        double tsv, atv;
        memcpy(&dev, index + 4 * i, 4);
        memcpy(&lo, offsets + 4 * i, 4);
        memcpy(&hi, offsets + 4 * (i + 1), 4);
        memcpy(&rid, rowid + 8 * i, 8);
        memcpy(&sq, seq + 8 * i, 8);
        memcpy(&tsv, ts + 8 * i, 8);
        memcpy(&atv, at + 8 * i, 8);
        int has_ts = (((const unsigned char *)valid)[i >> 3] >> (i & 7)) & 1;
        if (dev < 0 || dev >= ndev || lo < 0 || hi < lo || (size_t)hi > data_len) {
            PyErr_Format(PyExc_ValueError, "format_columns: row %zu's device or data offsets are out of range", i);
            goto done;
        }
        int rc = format_text(&out, ptext[dev], plen[dev], sq, has_ts, tsv, atv, data + lo, (size_t)(hi - lo),
                             &skipped);
        if (rc == FALLBACK) {
            PyObject *row = column_row(rid, PyTuple_GET_ITEM(devices, dev), sq, has_ts, tsv, atv, data + lo,
                                       (size_t)(hi - lo));
            if (row == NULL) goto done;
            rc = call_fallback(&out, fallback, row, prefix_of, &skipped);
            Py_DECREF(row);
        }
        if (rc != OK) goto done;
    }
    PyObject *body = PyBytes_FromStringAndSize(out.buf ? out.buf : "", (Py_ssize_t)out.len);
    if (body != NULL) result = Py_BuildValue("(NL)", body, skipped);
done:
    Py_XDECREF(prefixes);
    Py_XDECREF(devices);
    PyMem_Free(ptext);
    PyMem_Free(plen);
    PyMem_Free(out.buf);
    return result;
}

static PyMethodDef methods[] = {
    {"format_batch", (PyCFunction)(void (*)(void))format_batch, METH_FASTCALL,
     "format_batch(rows, prefixes, fallback) -> (bytes, int): the line protocol body of a batch."},
    {"format_columns", (PyCFunction)(void (*)(void))format_columns, METH_FASTCALL,
     "format_columns(cols, prefixes, prefix_of, fallback) -> (bytes, int): format_batch of a batch in columns."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "node.storage._vmlines",
    "The VictoriaMetrics sink's line protocol formatted in C (see _vmlines.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__vmlines(void) { return PyModule_Create(&module); }
