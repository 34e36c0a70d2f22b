/* pbcore._speedups: the compiled Banana Decoder and Encoder.
 *
 * A line-by-line mirror of pbcore/banana.py's PyDecoder and PyEncoder (the
 * reference implementation): the same values, the same bytes, the same
 * BananaError messages with the same byte positions, the same offset,
 * buffered and held. tests/test_speedups.py and fuzz/fuzz_speedups.py compare
 * the two. No I/O, no clock, no threads; the GIL is held throughout.
 *
 * pbcore.banana calls _configure() once, before either class is used, with
 * BananaError, the vocabulary tables, DIALECTS and DEFAULT_LIMITS.
 *
 * Limits are read as C integers clamped at 2**62 (no stream position or count
 * reaches that); a prefix value at or above 2**62 is kept as a Python int and
 * compared with the limits' own Python ints, so even absurd limits behave as
 * the pure code does. Messages print the limits' Python ints.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <stdint.h>

#define B_LIST 0x80
#define B_INT 0x81
#define B_STRING 0x82
#define B_NEG 0x83
#define B_FLOAT 0x84
#define B_LONGINT 0x85
#define B_LONGNEG 0x86
#define B_VOCAB 0x87

#define LIST_COST 64
#define ITEM_COST 48
#define TABLE_SIZE 4096
#define CLAMP ((long long)1 << 62)
#define N_WORDS 64

/* -- module state (set by _configure) --------------------------------------- */

static PyObject *BananaError = NULL;
static PyObject *Dialects = NULL;      /* (b"pb", b"none") */
static PyObject *DefaultLimits = NULL;
static PyObject *VocabItems = NULL;    /* dict: word -> its encoded item (pb dialect) */
static Py_ssize_t VocabMaxLen = 0;     /* the longest word */
static PyObject *Words[N_WORDS];       /* index -> the shared word bytes (pb dialect) */
static PyObject *WordsDict = NULL;     /* the same, as given (for indexes past N_WORDS) */
static PyObject *PbDialect = NULL;     /* b"pb" */
static PyObject *EmptyBytes = NULL;
static PyObject *UnicodeTag = NULL;    /* b"unicode", jelly's commonest atom (never a vocabulary word) */

static int
configured(void)
{
    if (BananaError == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "pbcore._speedups is not configured (import pbcore.banana)");
        return 0;
    }
    return 1;
}

/* The value of limits.<name>, as a new reference to the Python int, and clamped into *out. */
static PyObject *
read_limit(PyObject *limits, const char *name, long long *out)
{
    PyObject *value = PyObject_GetAttrString(limits, name);
    if (value == NULL) {
        return NULL;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        Py_DECREF(value);
        return NULL;
    }
    if (overflow > 0 || v > CLAMP) {
        v = CLAMP;
    }
    else if (overflow < 0 || v < -CLAMP) {
        v = -CLAMP;
    }
    *out = v;
    return value;
}

static int
check_dialect(PyObject *dialect)
{
    int found = PySequence_Contains(Dialects, dialect);
    if (found < 0) {
        return -1;
    }
    if (!found) {
        PyErr_Format(PyExc_ValueError, "unknown Banana dialect %R; expected one of %R", dialect, Dialects);
        return -1;
    }
    return 0;
}

/* A Python int from a base-128 little-endian prefix of any length. */
static PyObject *
b128_to_pylong(const unsigned char *digits, Py_ssize_t count)
{
    Py_ssize_t nbytes = (7 * count + 7) / 8 + 1;
    unsigned char *bytes = PyMem_Calloc((size_t)nbytes, 1);
    if (bytes == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t bit = 7 * i;
        unsigned int value = (unsigned int)(digits[i] & 0x7F) << (bit % 8);
        bytes[bit / 8] |= (unsigned char)(value & 0xFF);
        bytes[bit / 8 + 1] |= (unsigned char)(value >> 8);
    }
    PyObject *result = PyObject_CallMethod((PyObject *)&PyLong_Type, "from_bytes", "y#s", (const char *)bytes,
                                           nbytes, "little");
    PyMem_Free(bytes);
    return result;
}

/* ========================================================================== */
/* Decoder                                                                    */
/* ========================================================================== */

typedef struct {
    PyObject *items; /* a list */
    long long want;  /* its claimed length */
} Frame;

typedef struct {
    PyObject_HEAD
    PyObject *dialect;
    int is_pb;
    int untracked;       /* the lists made are not tracked by the cycle collector */
    PyObject *limits;
    long long prefix_limit, size_limit, max_depth, max_bytes, max_decoded;
    PyObject *prefix_limit_o, *size_limit_o, *max_depth_o, *max_bytes_o, *max_decoded_o;
    PyObject *buf;       /* bytes */
    Py_ssize_t pos;      /* where parsing resumes, within buf */
    long long base;      /* stream offset of buf[0] */
    PyObject *pending;   /* list of bytes fed and not yet joined to buf */
    long long pending_len;
    long long need;      /* bytes needed past pos before parsing can progress */
    long long expr_start;
    long long cost;
    Frame *stack;
    Py_ssize_t depth, capacity;
    PyObject *failed;    /* the BananaError, once there is one */
    long long fail_at;   /* where it was found */
    PyObject *weakrefs;
} Decoder;

static PyTypeObject DecoderType;

static int
decoder_set_limits_obj(Decoder *self, PyObject *limits)
{
    long long prefix, size, depth, bytes, decoded;
    PyObject *p = NULL, *s = NULL, *d = NULL, *b = NULL, *m = NULL;
    if (!(p = read_limit(limits, "prefix_limit", &prefix)) || !(s = read_limit(limits, "size_limit", &size)) ||
        !(d = read_limit(limits, "max_depth", &depth)) || !(b = read_limit(limits, "max_expression_bytes", &bytes)) ||
        !(m = read_limit(limits, "max_decoded_bytes", &decoded))) {
        Py_XDECREF(p);
        Py_XDECREF(s);
        Py_XDECREF(d);
        Py_XDECREF(b);
        return -1;
    }
    Py_INCREF(limits);
    Py_XSETREF(self->limits, limits);
    Py_XSETREF(self->prefix_limit_o, p);
    Py_XSETREF(self->size_limit_o, s);
    Py_XSETREF(self->max_depth_o, d);
    Py_XSETREF(self->max_bytes_o, b);
    Py_XSETREF(self->max_decoded_o, m);
    self->prefix_limit = prefix;
    self->size_limit = size;
    self->max_depth = depth;
    self->max_bytes = bytes;
    self->max_decoded = decoded;
    return 0;
}

static int
decoder_set_dialect_obj(Decoder *self, PyObject *dialect)
{
    int is_pb = PyObject_RichCompareBool(dialect, PbDialect, Py_EQ);
    if (is_pb < 0) {
        return -1;
    }
    Py_INCREF(dialect);
    Py_XSETREF(self->dialect, dialect);
    self->is_pb = is_pb;
    return 0;
}

static void
decoder_clear_stack(Decoder *self)
{
    while (self->depth > 0) {
        self->depth--;
        Py_CLEAR(self->stack[self->depth].items);
    }
}

static int
decoder_init(Decoder *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"dialect", "limits", "untracked", NULL};
    PyObject *dialect = PbDialect, *limits = DefaultLimits;
    int untracked = 0;
    if (!configured()) {
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OO$p:Decoder", kwlist, &dialect, &limits, &untracked)) {
        return -1;
    }
    self->untracked = untracked;
    if (check_dialect(dialect) < 0 || decoder_set_dialect_obj(self, dialect) < 0 ||
        decoder_set_limits_obj(self, limits) < 0) {
        return -1;
    }
    Py_INCREF(EmptyBytes);
    Py_XSETREF(self->buf, EmptyBytes);
    PyObject *pending = PyList_New(0);
    if (pending == NULL) {
        return -1;
    }
    Py_XSETREF(self->pending, pending);
    decoder_clear_stack(self);
    Py_CLEAR(self->failed);
    self->pos = 0;
    self->base = 0;
    self->pending_len = 0;
    self->need = 0;
    self->expr_start = 0;
    self->cost = 0;
    self->fail_at = 0;
    return 0;
}

static int
decoder_traverse(Decoder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->dialect);
    Py_VISIT(self->limits);
    Py_VISIT(self->pending);
    Py_VISIT(self->failed);
    for (Py_ssize_t i = 0; i < self->depth; i++) {
        Py_VISIT(self->stack[i].items);
    }
    return 0;
}

static int
decoder_clear(Decoder *self)
{
    Py_CLEAR(self->dialect);
    Py_CLEAR(self->limits);
    Py_CLEAR(self->prefix_limit_o);
    Py_CLEAR(self->size_limit_o);
    Py_CLEAR(self->max_depth_o);
    Py_CLEAR(self->max_bytes_o);
    Py_CLEAR(self->max_decoded_o);
    Py_CLEAR(self->buf);
    Py_CLEAR(self->pending);
    Py_CLEAR(self->failed);
    decoder_clear_stack(self);
    return 0;
}

static void
decoder_dealloc(Decoder *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    decoder_clear(self);
    PyMem_Free(self->stack);
    self->stack = NULL;
    type->tp_free((PyObject *)self);
}

static int
decoder_ready(Decoder *self)
{
    if (self->buf == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Decoder.__init__ was not called");
        return 0;
    }
    return 1;
}

static int
raise_failed(Decoder *self)
{
    if (self->failed != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(self->failed), self->failed);
        return 1;
    }
    return 0;
}

/* Make the BananaError "<message> (at byte N of the stream)", remember it, and set it. */
static void
decoder_fail(Decoder *self, Py_ssize_t pos, const char *format, ...)
{
    va_list vargs;
    va_start(vargs, format);
    PyObject *message = PyUnicode_FromFormatV(format, vargs);
    va_end(vargs);
    if (message == NULL) {
        return;
    }
    long long at = self->base + (long long)pos;
    PyObject *full = PyUnicode_FromFormat("%U (at byte %lld of the stream)", message, at);
    Py_DECREF(message);
    if (full == NULL) {
        return;
    }
    PyObject *error = PyObject_CallOneArg(BananaError, full);
    Py_DECREF(full);
    if (error == NULL) {
        return;
    }
    self->fail_at = at;
    Py_XSETREF(self->failed, error);
    PyErr_SetObject((PyObject *)Py_TYPE(error), error);
}

static void
decoder_over_decoded(Decoder *self, Py_ssize_t pos)
{
    decoder_fail(self, pos, "expression over the limit of %S bytes decoded (Limits.max_decoded_bytes)",
                 self->max_decoded_o);
}

static int
decoder_push(Decoder *self, long long want)
{
    if (self->depth == self->capacity) {
        Py_ssize_t capacity = self->capacity ? self->capacity * 2 : 16;
        Frame *stack = PyMem_Realloc(self->stack, (size_t)capacity * sizeof(Frame));
        if (stack == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->stack = stack;
        self->capacity = capacity;
    }
    PyObject *items = PyList_New(0);
    if (items == NULL) {
        return -1;
    }
    if (self->untracked) {
        PyObject_GC_UnTrack(items);
    }
    self->stack[self->depth].items = items;
    self->stack[self->depth].want = want;
    self->depth++;
    return 0;
}

/* Parse items of buf from pos until an expression completes or the bytes run out.
 * Returns 1 with *result set (a new reference) when an expression completes, 0 when
 * more bytes are needed, -1 on an error; *newpos is where parsing stopped. */
static int
decoder_parse(Decoder *self, PyObject *bufobj, Py_ssize_t pos, PyObject **result, Py_ssize_t *newpos)
{
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(bufobj);
    const Py_ssize_t end = PyBytes_GET_SIZE(bufobj);
    const long long size_limit = self->size_limit, max_depth = self->max_depth;
    const long long max_bytes = self->max_bytes, max_decoded = self->max_decoded;
    const long long prefix_limit = self->prefix_limit;
    const int is_pb = self->is_pb;
    PyObject *item = NULL, *numo = NULL;
    int status = -1;

    if (self->depth == 0) {
        self->expr_start = self->base + pos;
        self->cost = 0;
    }
    const long long expr_start = self->expr_start - self->base; /* negative if it began in an earlier buffer */
    const int check_size = (long long)end - expr_start > max_bytes;
    self->need = 0;
    long long cost = self->cost;

    while (pos < end) {
        const Py_ssize_t start = pos;
        unsigned int first = buf[pos], kind;
        long long num; /* the prefix, when below 2**62; else numo holds it */
        if (first & 0x80) {
            kind = first;
            num = 0;
            pos += 1;
        }
        else if (pos + 1 < end && (buf[pos + 1] & 0x80)) {
            kind = buf[pos + 1];
            num = first;
            pos += 2;
        }
        else {
            Py_ssize_t window = end - pos, k = 0;
            if ((long long)window > prefix_limit + 1) {
                window = (Py_ssize_t)(prefix_limit + 1);
            }
            while (k < window && !(buf[pos + k] & 0x80)) {
                k++;
            }
            if (k == window) {
                if ((long long)(end - pos) > prefix_limit) {
                    decoder_fail(self, start, "prefix longer than the limit of %S bytes", self->prefix_limit_o);
                    goto done;
                }
                self->need = (long long)(end - pos) + 1;
                *newpos = start;
                status = 0;
                goto done;
            }
            kind = buf[pos + k];
            if (k <= 9) {
                unsigned long long value = 0;
                for (Py_ssize_t i = k - 1; i >= 0; i--) {
                    value = (value << 7) | buf[pos + i];
                }
                if (value < (unsigned long long)CLAMP) {
                    num = (long long)value;
                }
                else {
                    num = CLAMP;
                    numo = PyLong_FromUnsignedLongLong(value);
                    if (numo == NULL) {
                        goto done;
                    }
                }
            }
            else {
                numo = b128_to_pylong(buf + pos, k);
                if (numo == NULL) {
                    goto done;
                }
                int overflow = 0;
                num = PyLong_AsLongLongAndOverflow(numo, &overflow);
                if (num == -1 && PyErr_Occurred()) {
                    goto done;
                }
                if (!overflow && num < CLAMP) {
                    Py_CLEAR(numo); /* leading zero digits: a small number after all */
                }
                else {
                    num = CLAMP;
                }
            }
            pos += k + 1;
        }

        if (kind == B_STRING) { /* the commonest item, so tested first */
            if (numo == NULL) {
                long long stop = (long long)pos + num;
                if (stop > (long long)end || num > size_limit) {
                    if (num > size_limit) {
                        decoder_fail(self, start, "byte string of %lld bytes is over the size limit of %S", num,
                                     self->size_limit_o);
                        goto done;
                    }
                    if (stop - expr_start > max_bytes) {
                        decoder_fail(self, start, "expression longer than the limit of %S bytes", self->max_bytes_o);
                        goto done;
                    }
                    self->need = stop - start;
                    *newpos = start;
                    status = 0;
                    goto done;
                }
                if (num == 7 && UnicodeTag != NULL && memcmp(buf + pos, "unicode", 7) == 0) {
                    /* jelly's tag for every str: one shared object (bytes are immutable) */
                    item = Py_NewRef(UnicodeTag);
                }
                else {
                    item = PyBytes_FromStringAndSize((const char *)buf + pos, (Py_ssize_t)num);
                }
                if (item == NULL) {
                    goto done;
                }
                pos = (Py_ssize_t)stop;
            }
            else {
                int over = PyObject_RichCompareBool(numo, self->size_limit_o, Py_GT);
                if (over < 0) {
                    goto done;
                }
                if (over) {
                    decoder_fail(self, start, "byte string of %S bytes is over the size limit of %S", numo,
                                 self->size_limit_o);
                    goto done;
                }
                /* A claim of 2**62 bytes or more never fits in the buffer. */
                PyObject *offset = PyLong_FromLongLong((long long)pos - expr_start);
                PyObject *length = offset ? PyNumber_Add(numo, offset) : NULL;
                Py_XDECREF(offset);
                if (length == NULL) {
                    goto done;
                }
                over = PyObject_RichCompareBool(length, self->max_bytes_o, Py_GT);
                Py_DECREF(length);
                if (over < 0) {
                    goto done;
                }
                if (over) {
                    decoder_fail(self, start, "expression longer than the limit of %S bytes", self->max_bytes_o);
                    goto done;
                }
                self->need = LLONG_MAX;
                *newpos = start;
                status = 0;
                goto done;
            }
        }
        else if (kind == B_LIST) {
            int over;
            if (numo == NULL) {
                over = num > size_limit;
            }
            else if ((over = PyObject_RichCompareBool(numo, self->size_limit_o, Py_GT)) < 0) {
                goto done;
            }
            if (over) {
                if (numo == NULL) {
                    decoder_fail(self, start, "list of %lld items is over the size limit of %S", num,
                                 self->size_limit_o);
                }
                else {
                    decoder_fail(self, start, "list of %S items is over the size limit of %S", numo,
                                 self->size_limit_o);
                }
                goto done;
            }
            if ((long long)self->depth >= max_depth) { /* the encoder's rule: no list at depth max_depth */
                decoder_fail(self, start, "lists nested deeper than the limit of %S", self->max_depth_o);
                goto done;
            }
            if (num) {
                if (decoder_push(self, numo == NULL ? num : LLONG_MAX) < 0) {
                    goto done;
                }
                Py_CLEAR(numo);
                continue;
            }
            item = PyList_New(0);
            if (item == NULL) {
                goto done;
            }
            if (self->untracked) {
                PyObject_GC_UnTrack(item);
            }
            cost += LIST_COST;
            if (cost > max_decoded) {
                decoder_over_decoded(self, start);
                goto done;
            }
        }
        else if (kind == B_VOCAB) {
            if (!is_pb) {
                decoder_fail(self, start, "vocabulary item outside the pb dialect");
                goto done;
            }
            PyObject *word = NULL;
            if (numo == NULL && num < N_WORDS) {
                word = Words[num];
            }
            else if (numo == NULL || num >= N_WORDS) {
                PyObject *key = numo ? Py_NewRef(numo) : PyLong_FromLongLong(num);
                if (key == NULL) {
                    goto done;
                }
                word = PyDict_GetItemWithError(WordsDict, key);
                Py_DECREF(key);
                if (word == NULL && PyErr_Occurred()) {
                    goto done;
                }
            }
            if (word == NULL) {
                if (numo == NULL) {
                    decoder_fail(self, start, "unknown vocabulary index %lld", num);
                }
                else {
                    decoder_fail(self, start, "unknown vocabulary index %S", numo);
                }
                goto done;
            }
            item = Py_NewRef(word);
        }
        else if (kind == B_INT || kind == B_LONGINT) {
            item = numo ? Py_NewRef(numo) : PyLong_FromLongLong(num);
            if (item == NULL) {
                goto done;
            }
        }
        else if (kind == B_NEG || kind == B_LONGNEG) {
            item = numo ? PyNumber_Negative(numo) : PyLong_FromLongLong(-num);
            if (item == NULL) {
                goto done;
            }
        }
        else if (kind == B_FLOAT) {
            if (pos + 8 > end) {
                self->need = (long long)(pos + 8 - start);
                *newpos = start;
                status = 0;
                goto done;
            }
            uint64_t bits = 0;
            for (int i = 0; i < 8; i++) {
                bits = (bits << 8) | buf[pos + i];
            }
            double value;
            memcpy(&value, &bits, sizeof value);
            item = PyFloat_FromDouble(value);
            if (item == NULL) {
                goto done;
            }
            pos += 8;
        }
        else {
            decoder_fail(self, start, "unknown type byte 0x%02x", kind);
            goto done;
        }
        Py_CLEAR(numo);

        if (check_size && (long long)pos - expr_start > max_bytes) {
            decoder_fail(self, start, "expression longer than the limit of %S bytes", self->max_bytes_o);
            goto done;
        }
        /* Put the item in its list; a list that is now full is itself an item. */
        for (;;) {
            if (self->depth == 0) {
                *result = item;
                item = NULL;
                *newpos = pos;
                status = 1;
                goto done;
            }
            Frame *top = &self->stack[self->depth - 1];
            if (PyList_Append(top->items, item) < 0) {
                goto done;
            }
            Py_DECREF(item);
            item = NULL;
            if ((long long)PyList_GET_SIZE(top->items) < top->want) {
                break;
            }
            long long want = top->want;
            item = top->items;
            top->items = NULL;
            self->depth--;
            cost += LIST_COST + ITEM_COST * want;
            if (cost > max_decoded) {
                decoder_over_decoded(self, start);
                goto done;
            }
        }
    }
    *newpos = pos;
    status = 0;

done:
    Py_XDECREF(item);
    Py_XDECREF(numo);
    self->cost = cost;
    return status;
}

/* Unusable from now on: let go of what it held; offset stays where parsing failed. */
static void
decoder_drop_state(Decoder *self)
{
    decoder_clear_stack(self);
    Py_INCREF(EmptyBytes);
    Py_XSETREF(self->buf, EmptyBytes);
    self->base = self->fail_at;
    self->pos = 0;
    if (self->pending != NULL && PyList_SetSlice(self->pending, 0, PY_SSIZE_T_MAX, NULL) < 0) {
        PyErr_WriteUnraisable((PyObject *)self);
    }
    self->pending_len = 0;
    self->need = 0;
}

static PyObject *
decoder_next_expression_impl(Decoder *self)
{
    if (!decoder_ready(self) || raise_failed(self)) {
        return NULL;
    }
    Py_ssize_t pos = self->pos;
    Py_ssize_t held = PyBytes_GET_SIZE(self->buf) - pos;
    Py_ssize_t npending = PyList_GET_SIZE(self->pending);
    if (npending) {
        long long available = (long long)held + self->pending_len;
        if (available < self->need) {
            Py_RETURN_NONE;
        }
        PyObject *joined;
        if (held <= 0 && npending == 1) {
            joined = Py_NewRef(PyList_GET_ITEM(self->pending, 0));
        }
        else {
            if (held < 0) {
                held = 0;
            }
            joined = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(held + self->pending_len));
            if (joined == NULL) {
                return NULL;
            }
            char *out = PyBytes_AS_STRING(joined);
            if (held > 0) {
                memcpy(out, PyBytes_AS_STRING(self->buf) + pos, (size_t)held);
                out += held;
            }
            for (Py_ssize_t i = 0; i < npending; i++) {
                PyObject *chunk = PyList_GET_ITEM(self->pending, i);
                memcpy(out, PyBytes_AS_STRING(chunk), (size_t)PyBytes_GET_SIZE(chunk));
                out += PyBytes_GET_SIZE(chunk);
            }
        }
        self->base += pos;
        Py_SETREF(self->buf, joined);
        if (PyList_SetSlice(self->pending, 0, PY_SSIZE_T_MAX, NULL) < 0) {
            return NULL;
        }
        self->pending_len = 0;
        pos = 0;
    }
    else if ((long long)held < (self->need > 1 ? self->need : 1)) {
        Py_RETURN_NONE;
    }
    PyObject *result = NULL;
    Py_ssize_t newpos = pos;
    PyObject *buf = Py_NewRef(self->buf);
    /* No collection while parsing: every object made here is alive, and the collections a
     * large expression's allocations would trigger (each traversing what was made so far)
     * take as long as the parse itself. The collector runs again at the next allocation. */
    int collecting = PyGC_Disable();
    int status = decoder_parse(self, buf, pos, &result, &newpos);
    if (collecting) {
        PyGC_Enable();
    }
    Py_DECREF(buf);
    if (status < 0) {
        if (self->failed != NULL) {
            decoder_drop_state(self);
        }
        return NULL;
    }
    self->pos = newpos;
    if (status == 0) {
        Py_RETURN_NONE;
    }
    return result;
}

static PyObject *
decoder_next_expression(Decoder *self, PyObject *Py_UNUSED(ignored))
{
    return decoder_next_expression_impl(self);
}

static PyObject *
decoder_feed(Decoder *self, PyObject *data)
{
    if (!decoder_ready(self) || raise_failed(self)) {
        return NULL;
    }
    int truth = PyObject_IsTrue(data);
    if (truth < 0) {
        return NULL;
    }
    if (truth) {
        PyObject *chunk;
        if (PyBytes_CheckExact(data)) {
            chunk = Py_NewRef(data);
        }
        else if ((chunk = PyObject_CallOneArg((PyObject *)&PyBytes_Type, data)) == NULL) {
            return NULL;
        }
        Py_ssize_t size = PyBytes_GET_SIZE(chunk);
        int appended = PyList_Append(self->pending, chunk);
        Py_DECREF(chunk);
        if (appended < 0) {
            return NULL;
        }
        self->pending_len += size;
    }
    Py_RETURN_NONE;
}

static long long
decoder_buffered_value(Decoder *self)
{
    return (long long)PyBytes_GET_SIZE(self->buf) - self->pos + self->pending_len;
}

static PyObject *
decoder_get_offset(Decoder *self, void *Py_UNUSED(closure))
{
    if (!decoder_ready(self)) {
        return NULL;
    }
    return PyLong_FromLongLong(self->base + self->pos);
}

static PyObject *
decoder_get_buffered(Decoder *self, void *Py_UNUSED(closure))
{
    if (!decoder_ready(self)) {
        return NULL;
    }
    return PyLong_FromLongLong(decoder_buffered_value(self));
}

static PyObject *
decoder_get_held(Decoder *self, void *Py_UNUSED(closure))
{
    if (!decoder_ready(self)) {
        return NULL;
    }
    long long buffered = decoder_buffered_value(self);
    if (self->depth == 0) {
        return PyLong_FromLongLong(buffered);
    }
    long long open_lists = 0;
    for (Py_ssize_t i = 0; i < self->depth; i++) {
        open_lists += LIST_COST + ITEM_COST * (long long)PyList_GET_SIZE(self->stack[i].items);
    }
    return PyLong_FromLongLong(self->base + self->pos - self->expr_start + self->cost + open_lists + buffered);
}

static PyObject *
decoder_get_at_boundary(Decoder *self, void *Py_UNUSED(closure))
{
    if (!decoder_ready(self)) {
        return NULL;
    }
    return PyBool_FromLong(self->depth == 0 && decoder_buffered_value(self) == 0);
}

static PyObject *
decoder_get_dialect(Decoder *self, void *Py_UNUSED(closure))
{
    if (!decoder_ready(self)) {
        return NULL;
    }
    return Py_NewRef(self->dialect);
}

static int
decoder_set_dialect(Decoder *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete dialect");
        return -1;
    }
    return decoder_set_dialect_obj(self, value);
}

static PyObject *
decoder_get_limits(Decoder *self, void *Py_UNUSED(closure))
{
    if (!decoder_ready(self)) {
        return NULL;
    }
    return Py_NewRef(self->limits);
}

static int
decoder_set_limits(Decoder *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete limits");
        return -1;
    }
    return decoder_set_limits_obj(self, value);
}

/* _buf: the joined buffer, for tests that measure what the decoded objects alone take. */
static PyObject *
decoder_get_buf(Decoder *self, void *Py_UNUSED(closure))
{
    if (!decoder_ready(self)) {
        return NULL;
    }
    return Py_NewRef(self->buf);
}

static int
decoder_set_buf(Decoder *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL || !PyBytes_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "_buf must be bytes");
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(self->buf, value);
    return 0;
}

/* -- iteration: __iter__ calls next_expression (an override too), like the pure generator -- */

typedef struct {
    PyObject_HEAD
    PyObject *decoder;
} DecoderIter;

static PyTypeObject DecoderIterType;

static PyObject *
decoder_iter(Decoder *self)
{
    DecoderIter *it = PyObject_GC_New(DecoderIter, &DecoderIterType);
    if (it == NULL) {
        return NULL;
    }
    it->decoder = Py_NewRef((PyObject *)self);
    PyObject_GC_Track(it);
    return (PyObject *)it;
}

static PyObject *
decoder_iter_next(DecoderIter *it)
{
    if (it->decoder == NULL) {
        return NULL;
    }
    PyObject *result;
    if (Py_IS_TYPE(it->decoder, &DecoderType)) {
        result = decoder_next_expression_impl((Decoder *)it->decoder);
    }
    else {
        result = PyObject_CallMethod(it->decoder, "next_expression", NULL);
    }
    if (result == Py_None) {
        Py_DECREF(result);
        Py_CLEAR(it->decoder);
        return NULL;
    }
    if (result == NULL) {
        Py_CLEAR(it->decoder);
    }
    return result;
}

static int
decoder_iter_traverse(DecoderIter *it, visitproc visit, void *arg)
{
    Py_VISIT(it->decoder);
    return 0;
}

static void
decoder_iter_dealloc(DecoderIter *it)
{
    PyObject_GC_UnTrack(it);
    Py_CLEAR(it->decoder);
    PyObject_GC_Del(it);
}

static PyTypeObject DecoderIterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pbcore._speedups._DecoderIterator",
    .tp_basicsize = sizeof(DecoderIter),
    .tp_dealloc = (destructor)decoder_iter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)decoder_iter_traverse,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)decoder_iter_next,
};

static PyMethodDef decoder_methods[] = {
    {"feed", (PyCFunction)decoder_feed, METH_O, "Add bytes received from the peer."},
    {"next_expression", (PyCFunction)decoder_next_expression, METH_NOARGS,
     "Return the next complete expression, or None if more bytes are needed."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef decoder_getset[] = {
    {"offset", (getter)decoder_get_offset, NULL, "How many bytes of the stream have been consumed into items.", NULL},
    {"buffered", (getter)decoder_get_buffered, NULL,
     "How many bytes have been fed but not yet made into a complete item.", NULL},
    {"held", (getter)decoder_get_held, NULL,
     "What the unfinished expression costs so far, as max_decoded_bytes counts (0 at a boundary).", NULL},
    {"at_boundary", (getter)decoder_get_at_boundary, NULL, "True when no expression is partly received.", NULL},
    {"dialect", (getter)decoder_get_dialect, (setter)decoder_set_dialect, "The Banana dialect, b'pb' or b'none'.",
     NULL},
    {"limits", (getter)decoder_get_limits, (setter)decoder_set_limits, "The Limits the decoder enforces.", NULL},
    {"_buf", (getter)decoder_get_buf, (setter)decoder_set_buf, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pbcore._speedups.Decoder",
    .tp_doc = "Turns a byte stream, in any chunking, into complete s-expressions (compiled; see PyDecoder).",
    .tp_basicsize = sizeof(Decoder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)decoder_init,
    .tp_dealloc = (destructor)decoder_dealloc,
    .tp_traverse = (traverseproc)decoder_traverse,
    .tp_clear = (inquiry)decoder_clear,
    .tp_iter = (getiterfunc)decoder_iter,
    .tp_methods = decoder_methods,
    .tp_getset = decoder_getset,
    .tp_weaklistoffset = offsetof(Decoder, weakrefs),
};

/* ========================================================================== */
/* Encoder                                                                    */
/* ========================================================================== */

typedef struct {
    PyObject_HEAD
    PyObject *dialect;
    PyObject *limits;
    PyObject *vocab; /* dict word -> item, or NULL for the none dialect */
    long long size_limit, max_depth, prefix_bits;
    PyObject *size_limit_o, *max_depth_o, *prefix_limit_o;
    long long short_; /* lengths below this need no size check */
    PyObject *weakrefs;
} Encoder;

typedef struct {
    char *data;
    Py_ssize_t len, cap;
    char small[512];
} Out;

static void
out_init(Out *out)
{
    out->data = out->small;
    out->len = 0;
    out->cap = (Py_ssize_t)sizeof out->small;
}

static void
out_free(Out *out)
{
    if (out->data != out->small) {
        PyMem_Free(out->data);
    }
}

static int
out_reserve(Out *out, Py_ssize_t extra)
{
    if (out->len + extra <= out->cap) {
        return 0;
    }
    if (extra > PY_SSIZE_T_MAX / 2 - out->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t cap = out->cap * 2;
    if (cap < out->len + extra) {
        cap = out->len + extra;
    }
    char *data;
    if (out->data == out->small) {
        data = PyMem_Malloc((size_t)cap);
        if (data != NULL) {
            memcpy(data, out->small, (size_t)out->len);
        }
    }
    else {
        data = PyMem_Realloc(out->data, (size_t)cap);
    }
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->data = data;
    out->cap = cap;
    return 0;
}

/* The base-128 prefix of v and a type byte (room for them must be reserved: 11 bytes). */
static inline void
put_head(Out *out, unsigned long long v, unsigned char type)
{
    char *p = out->data + out->len;
    do {
        *p++ = (char)(v & 0x7F);
        v >>= 7;
    } while (v);
    *p++ = (char)type;
    out->len = p - out->data;
}

static int
put_head_checked(Out *out, unsigned long long v, unsigned char type)
{
    if (out_reserve(out, 11) < 0) {
        return -1;
    }
    put_head(out, v, type);
    return 0;
}

static int
put_raw(Out *out, const char *data, Py_ssize_t size)
{
    if (out_reserve(out, size) < 0) {
        return -1;
    }
    memcpy(out->data + out->len, data, (size_t)size);
    out->len += size;
    return 0;
}

static void
encoder_error(const char *format, ...)
{
    va_list vargs;
    va_start(vargs, format);
    PyObject *message = PyUnicode_FromFormatV(format, vargs);
    va_end(vargs);
    if (message != NULL) {
        PyErr_SetObject(BananaError, message);
        Py_DECREF(message);
    }
}

static int
encode_int(Encoder *self, PyObject *value, Out *out)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (!overflow) {
        unsigned long long magnitude = v >= 0 ? (unsigned long long)v : 0ULL - (unsigned long long)v;
        if (magnitude >= TABLE_SIZE && self->prefix_bits < 64 && (magnitude >> self->prefix_bits) != 0) {
            PyErr_Format(BananaError, "cannot encode int %S: over the %S-byte prefix limit", value,
                         self->prefix_limit_o);
            return -1;
        }
        unsigned char type;
        if (v >= 0) {
            type = magnitude < (1ULL << 31) ? B_INT : B_LONGINT;
        }
        else {
            type = magnitude <= (1ULL << 31) ? B_NEG : B_LONGNEG;
        }
        return put_head_checked(out, magnitude, type);
    }
    /* Beyond 64 bits: the slow way, through the int's own bytes. */
    int negative = overflow < 0;
    PyObject *magnitude = PyNumber_Absolute(value);
    if (magnitude == NULL) {
        return -1;
    }
    PyObject *bits_o = PyObject_CallMethod(magnitude, "bit_length", NULL);
    if (bits_o == NULL) {
        Py_DECREF(magnitude);
        return -1;
    }
    long long bits = PyLong_AsLongLong(bits_o);
    Py_DECREF(bits_o);
    if (bits == -1 && PyErr_Occurred()) {
        Py_DECREF(magnitude);
        return -1;
    }
    if (bits > self->prefix_bits) {
        Py_DECREF(magnitude);
        PyErr_Format(BananaError, "cannot encode int %S: over the %S-byte prefix limit", value, self->prefix_limit_o);
        return -1;
    }
    Py_ssize_t nbytes = (Py_ssize_t)((bits + 7) / 8);
    PyObject *raw = PyObject_CallMethod(magnitude, "to_bytes", "ns", nbytes, "little");
    Py_DECREF(magnitude);
    if (raw == NULL) {
        return -1;
    }
    const unsigned char *digits = (const unsigned char *)PyBytes_AS_STRING(raw);
    Py_ssize_t ndigits = (Py_ssize_t)((bits + 6) / 7);
    if (out_reserve(out, ndigits + 1) < 0) {
        Py_DECREF(raw);
        return -1;
    }
    for (Py_ssize_t i = 0; i < ndigits; i++) {
        Py_ssize_t bit = 7 * i;
        unsigned int word = digits[bit / 8];
        if (bit / 8 + 1 < nbytes) {
            word |= (unsigned int)digits[bit / 8 + 1] << 8;
        }
        out->data[out->len++] = (char)((word >> (bit % 8)) & 0x7F);
    }
    out->data[out->len++] = (char)(negative ? B_LONGNEG : B_LONGINT);
    Py_DECREF(raw);
    return 0;
}

static int encode_obj(Encoder *self, PyObject *obj, Out *out, Py_ssize_t depth);

static int
encode_bytes(Encoder *self, PyObject *obj, Out *out)
{
    Py_ssize_t n = PyBytes_GET_SIZE(obj);
    if (self->vocab != NULL && n <= VocabMaxLen) {
        PyObject *word = PyDict_GetItemWithError(self->vocab, obj);
        if (word != NULL) {
            return put_raw(out, PyBytes_AS_STRING(word), PyBytes_GET_SIZE(word));
        }
        if (PyErr_Occurred()) {
            return -1;
        }
    }
    if ((long long)n >= self->short_ && (long long)n > self->size_limit) {
        PyErr_Format(BananaError, "cannot encode a byte string of %zd bytes: over the size limit of %S", n,
                     self->size_limit_o);
        return -1;
    }
    if (out_reserve(out, n + 11) < 0) {
        return -1;
    }
    put_head(out, (unsigned long long)n, B_STRING);
    memcpy(out->data + out->len, PyBytes_AS_STRING(obj), (size_t)n);
    out->len += n;
    return 0;
}

static int
encode_sequence(Encoder *self, PyObject *obj, Out *out, Py_ssize_t depth)
{
    int is_list = PyList_CheckExact(obj);
    Py_ssize_t n = is_list ? PyList_GET_SIZE(obj) : PyTuple_GET_SIZE(obj);
    if ((long long)depth >= self->max_depth) {
        PyErr_Format(BananaError, "cannot encode: lists nested deeper than %S (or a cycle)", self->max_depth_o);
        return -1;
    }
    if ((long long)n >= self->short_ && (long long)n > self->size_limit) {
        PyErr_Format(BananaError, "cannot encode a list of %zd items: over the size limit of %S", n,
                     self->size_limit_o);
        return -1;
    }
    if (put_head_checked(out, (unsigned long long)n, B_LIST) < 0) {
        return -1;
    }
    if (Py_EnterRecursiveCall("")) {
        return -1;
    }
    depth += 1;
    int status = 0;
    for (Py_ssize_t i = 0; i < (is_list ? PyList_GET_SIZE(obj) : n); i++) {
        PyObject *item = is_list ? PyList_GET_ITEM(obj, i) : PyTuple_GET_ITEM(obj, i);
        /* The commonest items inline; the rest the general way. */
        if (PyLong_CheckExact(item)) {
            int overflow;
            long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
            if (!overflow && v >= 0 && v < TABLE_SIZE) {
                if (put_head_checked(out, (unsigned long long)v, B_INT) < 0) {
                    status = -1;
                    break;
                }
                continue;
            }
            if (v == -1 && PyErr_Occurred()) {
                status = -1;
                break;
            }
        }
        Py_INCREF(item);
        status = encode_obj(self, item, out, depth);
        Py_DECREF(item);
        if (status < 0) {
            break;
        }
    }
    Py_LeaveRecursiveCall();
    return status;
}

static int
encode_converted(Encoder *self, PyTypeObject *base, PyObject *obj, Out *out, Py_ssize_t depth)
{
    PyObject *converted = PyObject_CallOneArg((PyObject *)base, obj);
    if (converted == NULL) {
        return -1;
    }
    if (Py_EnterRecursiveCall("")) {
        Py_DECREF(converted);
        return -1;
    }
    int status = encode_obj(self, converted, out, depth);
    Py_LeaveRecursiveCall();
    Py_DECREF(converted);
    return status;
}

static int
encode_obj(Encoder *self, PyObject *obj, Out *out, Py_ssize_t depth)
{
    if (PyBytes_CheckExact(obj)) {
        return encode_bytes(self, obj, out);
    }
    if (PyList_CheckExact(obj) || PyTuple_CheckExact(obj)) {
        return encode_sequence(self, obj, out, depth);
    }
    if (PyLong_CheckExact(obj)) {
        return encode_int(self, obj, out);
    }
    if (PyFloat_CheckExact(obj)) {
        double value = PyFloat_AS_DOUBLE(obj);
        uint64_t bits;
        memcpy(&bits, &value, sizeof bits);
        if (out_reserve(out, 9) < 0) {
            return -1;
        }
        char *p = out->data + out->len;
        *p++ = (char)B_FLOAT;
        for (int i = 7; i >= 0; i--) {
            *p++ = (char)((bits >> (8 * i)) & 0xFF);
        }
        out->len += 9;
        return 0;
    }
    if (PyBool_Check(obj)) {
        return put_head_checked(out, obj == Py_True ? 1 : 0, B_INT);
    }
    /* Subclasses of the four types go the slow way, as their base type. */
    if (PyBytes_Check(obj)) {
        return encode_converted(self, &PyBytes_Type, obj, out, depth);
    }
    if (PyLong_Check(obj)) {
        return encode_converted(self, &PyLong_Type, obj, out, depth);
    }
    if (PyFloat_Check(obj)) {
        return encode_converted(self, &PyFloat_Type, obj, out, depth);
    }
    if (PyList_Check(obj) || PyTuple_Check(obj)) {
        return encode_converted(self, &PyList_Type, obj, out, depth);
    }
    PyObject *qualname = PyObject_GetAttrString((PyObject *)Py_TYPE(obj), "__qualname__");
    if (qualname == NULL) {
        return -1;
    }
    PyObject *repr = PyObject_Repr(obj);
    if (repr == NULL) {
        Py_DECREF(qualname);
        return -1;
    }
    PyObject *spec = PyUnicode_FromString(".80"); /* {obj!r:.80} */
    PyObject *shown = spec ? PyObject_Format(repr, spec) : NULL;
    Py_XDECREF(spec);
    Py_DECREF(repr);
    if (shown != NULL) {
        encoder_error("Banana cannot encode %S objects: %S", qualname, shown);
        Py_DECREF(shown);
    }
    Py_DECREF(qualname);
    return -1;
}

static int
encoder_init(Encoder *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"dialect", "limits", NULL};
    PyObject *dialect = PbDialect, *limits = DefaultLimits;
    if (!configured()) {
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OO:Encoder", kwlist, &dialect, &limits)) {
        return -1;
    }
    if (check_dialect(dialect) < 0) {
        return -1;
    }
    long long prefix, size, depth;
    PyObject *p = NULL, *s = NULL, *d = NULL;
    if (!(p = read_limit(limits, "prefix_limit", &prefix)) || !(s = read_limit(limits, "size_limit", &size)) ||
        !(d = read_limit(limits, "max_depth", &depth))) {
        Py_XDECREF(p);
        Py_XDECREF(s);
        return -1;
    }
    int is_pb = PyObject_RichCompareBool(dialect, PbDialect, Py_EQ);
    if (is_pb < 0) {
        Py_DECREF(p);
        Py_DECREF(s);
        Py_DECREF(d);
        return -1;
    }
    Py_XSETREF(self->dialect, Py_NewRef(dialect));
    Py_XSETREF(self->limits, Py_NewRef(limits));
    Py_XSETREF(self->vocab, is_pb ? Py_NewRef(VocabItems) : NULL);
    Py_XSETREF(self->prefix_limit_o, p);
    Py_XSETREF(self->size_limit_o, s);
    Py_XSETREF(self->max_depth_o, d);
    self->size_limit = size;
    self->max_depth = depth;
    self->prefix_bits = prefix > CLAMP / 8 ? CLAMP : 7 * prefix;
    self->short_ = size + 1 < TABLE_SIZE ? size + 1 : TABLE_SIZE;
    return 0;
}

static int
encoder_ready(Encoder *self)
{
    if (self->size_limit_o == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Encoder.__init__ was not called");
        return 0;
    }
    return 1;
}

static PyObject *
encoder_encode(Encoder *self, PyObject *sexp)
{
    if (!encoder_ready(self)) {
        return NULL;
    }
    Out out;
    out_init(&out);
    PyObject *result = NULL;
    if (encode_obj(self, sexp, &out, 0) == 0) {
        result = PyBytes_FromStringAndSize(out.data, out.len);
    }
    out_free(&out);
    return result;
}

static PyObject *
encoder_encode_into(Encoder *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"sexp", "out", "depth", NULL};
    PyObject *sexp, *target;
    Py_ssize_t depth = 0;
    if (!encoder_ready(self)) {
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!|n:encode_into", kwlist, &sexp, &PyByteArray_Type, &target,
                                     &depth)) {
        return NULL;
    }
    Out out;
    out_init(&out);
    int status = encode_obj(self, sexp, &out, depth);
    /* What was written before an error stays written, as the pure encoder leaves it. */
    if (out.len) {
        Py_ssize_t old = PyByteArray_GET_SIZE(target);
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        if (PyByteArray_Resize(target, old + out.len) < 0) {
            if (status == 0) {
                Py_XDECREF(type);
                Py_XDECREF(value);
                Py_XDECREF(traceback);
                out_free(&out);
                return NULL;
            }
            PyErr_Clear();
        }
        else {
            memcpy(PyByteArray_AS_STRING(target) + old, out.data, (size_t)out.len);
        }
        PyErr_Restore(type, value, traceback);
    }
    out_free(&out);
    if (status < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static int
encoder_traverse(Encoder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->dialect);
    Py_VISIT(self->limits);
    return 0;
}

static int
encoder_clear(Encoder *self)
{
    Py_CLEAR(self->dialect);
    Py_CLEAR(self->limits);
    Py_CLEAR(self->vocab);
    Py_CLEAR(self->size_limit_o);
    Py_CLEAR(self->max_depth_o);
    Py_CLEAR(self->prefix_limit_o);
    return 0;
}

static void
encoder_dealloc(Encoder *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    encoder_clear(self);
    type->tp_free((PyObject *)self);
}

/* Below, with the plain values. */
static PyObject *encoder_encode_message(Encoder *self, PyObject *args);
static PyObject *encoder_encode_plain(Encoder *self, PyObject *args);

static PyMethodDef encoder_methods[] = {
    {"encode", (PyCFunction)encoder_encode, METH_O, "Return the bytes for one s-expression."},
    {"encode_into", (PyCFunction)(void (*)(void))encoder_encode_into, METH_VARARGS | METH_KEYWORDS,
     "Append the bytes for one s-expression, which sits at nesting depth, to out."},
    {"encode_message", (PyCFunction)encoder_encode_message, METH_VARARGS,
     "encode_message(head, values): the bytes of [*head, *values] with each value jellied, when every value is "
     "plain (pbcore.codec.ValueEncoder._write_flat); None when one is not (pb dialect only)."},
    {"encode_plain", (PyCFunction)encoder_encode_plain, METH_VARARGS,
     "encode_plain(value, depth=0): the bytes of value jellied, at Banana nesting depth, when it is plain; "
     "else None (pb dialect only)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef encoder_members[] = {
    {"dialect", T_OBJECT_EX, offsetof(Encoder, dialect), 0, "The Banana dialect, b'pb' or b'none'."},
    {"limits", T_OBJECT_EX, offsetof(Encoder, limits), 0, "The Limits the encoder enforces."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pbcore._speedups.Encoder",
    .tp_doc = "Encodes s-expressions for one dialect and one set of limits (compiled; see PyEncoder).",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)encoder_init,
    .tp_dealloc = (destructor)encoder_dealloc,
    .tp_traverse = (traverseproc)encoder_traverse,
    .tp_clear = (inquiry)encoder_clear,
    .tp_methods = encoder_methods,
    .tp_members = encoder_members,
    .tp_weaklistoffset = offsetof(Encoder, weakrefs),
};

/* ========================================================================== */
/* Plain values: pbcore.codec's and pbcore.jelly's fast paths, compiled       */
/* ========================================================================== */
/*
 * A plain value is an atom (int, bytes, float, str, None, bool: exact types) or
 * a list, tuple, dict, set or frozenset of plain values, nested at most
 * PLAIN_LEVELS deep, no container met twice. Its jelly needs no reference
 * tables. These mirror ValueEncoder._write_items and jelly._flat line for line:
 * whatever they do not handle, or would refuse, they leave to the Python code
 * (0 / NotFlat), which then does it, or says what is wrong, as it always did.
 */

#define PLAIN_LEVELS 3

/* jelly's fixed forms in the pb dialect ([None], [boolean, true], ...). */
static const char J_NONE[] = "\x01\x80\x01\x87";
static const char J_TRUE[] = "\x02\x80\x07\x82" "boolean" "\x04\x82" "true";
static const char J_FALSE[] = "\x02\x80\x07\x82" "boolean" "\x05\x82" "false";
static const char J_UNICODE[] = "\x02\x80\x07\x82" "unicode"; /* then the text's bytes item */
static const char J_DICTIONARY[] = "\x05\x87";
static const char J_LIST[] = "\x08\x87";
static const char J_TUPLE[] = "\x0b\x87";
static const char J_SET[] = "\x03\x82" "set";
static const char J_FROZENSET[] = "\x09\x82" "frozenset";

static int
put_const(Out *out, const char *data, Py_ssize_t size)
{
    return put_raw(out, data, size);
}

/* 1: written; 0: not plain (out may hold a partial write: the caller drops it); -1: an error. */
/* The containers a plain value has met so far (one met twice is a reference: not plain).
   A message has a few: they are kept in a small array, and in a set past it. */
#define SEEN_SMALL 16
typedef struct {
    Py_ssize_t n;
    PyObject *more; /* a set of ids, made once the array is full */
    void *small[SEEN_SMALL];
} Seen;

static void
seen_init(Seen *seen)
{
    seen->n = 0;
    seen->more = NULL;
}

static void
seen_free(Seen *seen)
{
    Py_CLEAR(seen->more);
}

/* 1 if *item* was met already, else 0 (and it is noted); -1 on error. */
static int
seen_add(Seen *seen, PyObject *item)
{
    for (Py_ssize_t i = 0; i < seen->n; i++) {
        if (seen->small[i] == (void *)item) {
            return 1;
        }
    }
    if (seen->more == NULL && seen->n < SEEN_SMALL) {
        seen->small[seen->n++] = (void *)item;
        return 0;
    }
    if (seen->more == NULL) {
        seen->more = PySet_New(NULL);
        if (seen->more == NULL) {
            return -1;
        }
    }
    PyObject *id = PyLong_FromVoidPtr(item);
    if (id == NULL) {
        return -1;
    }
    int known = PySet_Contains(seen->more, id);
    if (known == 0) {
        known = PySet_Add(seen->more, id) < 0 ? -1 : 0;
    }
    Py_DECREF(id);
    return known;
}

static int
write_plain(Encoder *self, PyObject *item, Out *out, long long depth, int levels, Seen *seen)
{
    if (PyLong_CheckExact(item)) {
        return encode_int(self, item, out) < 0 ? -1 : 1;
    }
    if (PyBytes_CheckExact(item)) {
        return encode_bytes(self, item, out) < 0 ? -1 : 1;
    }
    if (PyFloat_CheckExact(item)) {
        return encode_obj(self, item, out, (Py_ssize_t)depth) < 0 ? -1 : 1;
    }
    if (depth + 1 >= self->max_depth) {
        return 0; /* the forms below are lists: the general way checks */
    }
    if (PyUnicode_CheckExact(item)) {
        Py_ssize_t size;
        const char *data = PyUnicode_AsUTF8AndSize(item, &size);
        if (data == NULL) {
            PyErr_Clear(); /* not valid Unicode: the general way says so */
            return 0;
        }
        if (size >= self->short_ && size > self->size_limit) {
            return 0;
        }
        if (put_const(out, J_UNICODE, sizeof J_UNICODE - 1) < 0) {
            return -1;
        }
        if (size <= VocabMaxLen) {
            PyObject *text = PyBytes_FromStringAndSize(data, size);
            if (text == NULL) {
                return -1;
            }
            PyObject *word = PyDict_GetItemWithError(VocabItems, text);
            Py_DECREF(text);
            if (word != NULL) {
                return put_raw(out, PyBytes_AS_STRING(word), PyBytes_GET_SIZE(word)) < 0 ? -1 : 1;
            }
            if (PyErr_Occurred()) {
                return -1;
            }
        }
        if (out_reserve(out, size + 11) < 0) {
            return -1;
        }
        put_head(out, (unsigned long long)size, B_STRING);
        memcpy(out->data + out->len, data, (size_t)size);
        out->len += size;
        return 1;
    }
    if (item == Py_None) {
        return put_const(out, J_NONE, sizeof J_NONE - 1) < 0 ? -1 : 1;
    }
    if (PyBool_Check(item)) {
        int status = item == Py_True ? put_const(out, J_TRUE, sizeof J_TRUE - 1)
                                     : put_const(out, J_FALSE, sizeof J_FALSE - 1);
        return status < 0 ? -1 : 1;
    }
    const char *name;
    Py_ssize_t name_size;
    PyTypeObject *type = Py_TYPE(item);
    if (type == &PyList_Type) {
        name = J_LIST, name_size = sizeof J_LIST - 1;
    }
    else if (type == &PyTuple_Type) {
        name = J_TUPLE, name_size = sizeof J_TUPLE - 1;
    }
    else if (type == &PyDict_Type) {
        name = J_DICTIONARY, name_size = sizeof J_DICTIONARY - 1;
    }
    else if (type == &PySet_Type) {
        name = J_SET, name_size = sizeof J_SET - 1;
    }
    else if (type == &PyFrozenSet_Type) {
        name = J_FROZENSET, name_size = sizeof J_FROZENSET - 1;
    }
    else {
        return 0;
    }
    if (!levels) {
        return 0;
    }
    /* Met again, a container would be a reference: the general way. */
    int known = seen_add(seen, item);
    if (known) {
        return known < 0 ? -1 : 0;
    }
    Py_ssize_t n = PyObject_Length(item);
    long long flat_size = self->size_limit < TABLE_SIZE - 1 ? self->size_limit : TABLE_SIZE - 1;
    if (n < 0) {
        return -1;
    }
    if ((long long)n >= flat_size || depth + 3 >= self->max_depth) {
        return 0;
    }
    if (put_head_checked(out, (unsigned long long)n + 1, B_LIST) < 0 || put_const(out, name, name_size) < 0) {
        return -1;
    }
    if (Py_EnterRecursiveCall(" in pbcore's plain encoder")) {
        return -1;
    }
    int status = 1;
    if (type == &PyDict_Type) {
        Py_ssize_t position = 0;
        PyObject *key, *value;
        while (status == 1 && PyDict_Next(item, &position, &key, &value)) {
            Py_INCREF(key);
            Py_INCREF(value);
            if (put_const(out, "\x02\x80", 2) < 0) {
                status = -1;
            }
            if (status == 1) {
                status = write_plain(self, key, out, depth + 2, levels - 1, seen);
            }
            if (status == 1) {
                status = write_plain(self, value, out, depth + 2, levels - 1, seen);
            }
            Py_DECREF(key);
            Py_DECREF(value);
        }
    }
    else if (type == &PyList_Type || type == &PyTuple_Type) {
        for (Py_ssize_t i = 0; status == 1 && i < (type == &PyList_Type ? PyList_GET_SIZE(item) : n); i++) {
            PyObject *part = type == &PyList_Type ? PyList_GET_ITEM(item, i) : PyTuple_GET_ITEM(item, i);
            Py_INCREF(part);
            status = write_plain(self, part, out, depth + 1, levels - 1, seen);
            Py_DECREF(part);
        }
    }
    else {
        PyObject *iterator = PyObject_GetIter(item);
        PyObject *part;
        if (iterator == NULL) {
            status = -1;
        }
        while (status == 1 && (part = PyIter_Next(iterator)) != NULL) {
            status = write_plain(self, part, out, depth + 1, levels - 1, seen);
            Py_DECREF(part);
        }
        if (status == 1 && PyErr_Occurred()) {
            status = -1;
        }
        Py_XDECREF(iterator);
    }
    Py_LeaveRecursiveCall();
    return status;
}

static PyObject *
encoder_encode_message(Encoder *self, PyObject *args)
{
    PyObject *head, *values;
    if (!encoder_ready(self)) {
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!O!:encode_message", &PyList_Type, &head, &PyList_Type, &values)) {
        return NULL;
    }
    if (self->vocab == NULL) {
        Py_RETURN_NONE; /* jelly's fixed forms above are the pb dialect's */
    }
    Seen seen;
    seen_init(&seen);
    Out out;
    out_init(&out);
    PyObject *result = NULL;
    Py_ssize_t n_head = PyList_GET_SIZE(head), n_values = PyList_GET_SIZE(values);
    int status = put_head_checked(&out, (unsigned long long)(n_head + n_values), B_LIST) < 0 ? -1 : 1;
    for (Py_ssize_t i = 0; status == 1 && i < PyList_GET_SIZE(head); i++) {
        PyObject *item = PyList_GET_ITEM(head, i);
        Py_INCREF(item);
        status = encode_obj(self, item, &out, 1) < 0 ? -1 : 1;
        Py_DECREF(item);
    }
    for (Py_ssize_t i = 0; status == 1 && i < PyList_GET_SIZE(values); i++) {
        PyObject *item = PyList_GET_ITEM(values, i);
        Py_INCREF(item);
        status = write_plain(self, item, &out, 1, PLAIN_LEVELS, &seen);
        Py_DECREF(item);
    }
    if (status == 1) {
        result = PyBytes_FromStringAndSize(out.data, out.len);
    }
    else if (status == 0) {
        result = Py_NewRef(Py_None);
    }
    out_free(&out);
    seen_free(&seen);
    return result;
}

static PyObject *
encoder_encode_plain(Encoder *self, PyObject *args)
{
    PyObject *value;
    Py_ssize_t depth = 0;
    if (!encoder_ready(self)) {
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O|n:encode_plain", &value, &depth)) {
        return NULL;
    }
    if (self->vocab == NULL) {
        Py_RETURN_NONE; /* jelly's fixed forms above are the pb dialect's */
    }
    Seen seen;
    seen_init(&seen);
    Out out;
    out_init(&out);
    PyObject *result = NULL;
    int status = write_plain(self, value, &out, (long long)depth, PLAIN_LEVELS, &seen);
    if (status == 1) {
        result = PyBytes_FromStringAndSize(out.data, out.len);
    }
    else if (status == 0) {
        result = Py_NewRef(Py_None);
    }
    out_free(&out);
    seen_free(&seen);
    return result;
}

/* jelly._flat: the value of one list of a plain expression, or NotFlat (a new reference; NULL on error). */
static PyObject *
read_plain(PyObject *sexp, PyObject *allowed, Py_ssize_t max_keys, int levels, PyObject *not_flat);

static PyObject *
read_plain_item(PyObject *item, PyObject *allowed, Py_ssize_t max_keys, int levels, PyObject *not_flat)
{
    PyTypeObject *type = Py_TYPE(item);
    if (type == &PyBytes_Type || type == &PyLong_Type || type == &PyFloat_Type) {
        return Py_NewRef(item);
    }
    if (type != &PyList_Type) {
        return Py_NewRef(not_flat);
    }
    return read_plain(item, allowed, max_keys, levels, not_flat);
}

static int
bytes_is(PyObject *item, const char *text, Py_ssize_t size)
{
    return PyBytes_CheckExact(item) && PyBytes_GET_SIZE(item) == size && memcmp(PyBytes_AS_STRING(item), text, (size_t)size) == 0;
}

static PyObject *
read_plain(PyObject *sexp, PyObject *allowed, Py_ssize_t max_keys, int levels, PyObject *not_flat)
{
    Py_ssize_t n = PyList_GET_SIZE(sexp);
    if (n == 0) {
        return Py_NewRef(not_flat);
    }
    PyObject *head = PyList_GET_ITEM(sexp, 0);
    if (!PyBytes_CheckExact(head)) {
        return Py_NewRef(not_flat);
    }
    int allowed_here = PyDict_Contains(allowed, head);
    if (allowed_here <= 0) {
        return allowed_here < 0 ? NULL : Py_NewRef(not_flat);
    }
    if (bytes_is(head, "unicode", 7)) {
        PyObject *data = n == 2 ? PyList_GET_ITEM(sexp, 1) : NULL;
        if (data == NULL || !PyBytes_CheckExact(data)) {
            return Py_NewRef(not_flat);
        }
        PyObject *text = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), NULL);
        if (text == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                return NULL;
            }
            PyErr_Clear(); /* the general way says what is wrong */
            return Py_NewRef(not_flat);
        }
        return text;
    }
    if (bytes_is(head, "None", 4)) {
        return Py_NewRef(n == 1 ? Py_None : not_flat);
    }
    if (bytes_is(head, "boolean", 7)) {
        PyObject *word = n == 2 ? PyList_GET_ITEM(sexp, 1) : NULL;
        if (word != NULL && bytes_is(word, "true", 4)) {
            return Py_NewRef(Py_True);
        }
        if (word != NULL && bytes_is(word, "false", 5)) {
            return Py_NewRef(Py_False);
        }
        return Py_NewRef(not_flat);
    }
    if (!levels) {
        return Py_NewRef(not_flat);
    }
    levels -= 1;
    if (Py_EnterRecursiveCall(" in pbcore's plain reader")) {
        return NULL;
    }
    PyObject *result = NULL;
    if (bytes_is(head, "dictionary", 10)) {
        if (n > max_keys + 1) { /* below this many keys none is counted (see Collisions) */
            result = Py_NewRef(not_flat);
            goto done;
        }
        result = PyDict_New();
        for (Py_ssize_t i = 1; result != NULL && i < PyList_GET_SIZE(sexp); i++) {
            PyObject *pair = PyList_GET_ITEM(sexp, i);
            if (!PyList_CheckExact(pair) || PyList_GET_SIZE(pair) != 2) {
                Py_SETREF(result, Py_NewRef(not_flat));
                break;
            }
            PyObject *key = read_plain_item(PyList_GET_ITEM(pair, 0), allowed, max_keys, 0, not_flat);
            if (key == NULL || key == not_flat) {
                Py_SETREF(result, key);
                break;
            }
            PyObject *value = read_plain_item(PyList_GET_ITEM(pair, 1), allowed, max_keys, levels, not_flat);
            if (value == NULL || value == not_flat) {
                Py_DECREF(key);
                Py_SETREF(result, value);
                break;
            }
            if (PyDict_SetItem(result, key, value) < 0) {
                Py_CLEAR(result);
            }
            Py_DECREF(key);
            Py_DECREF(value);
        }
        goto done;
    }
    int is_tuple = bytes_is(head, "tuple", 5);
    if (!is_tuple && !bytes_is(head, "list", 4)) {
        result = Py_NewRef(not_flat);
        goto done;
    }
    result = PyList_New(n - 1);
    for (Py_ssize_t i = 1; result != NULL && i < n; i++) {
        PyObject *value = read_plain_item(PyList_GET_ITEM(sexp, i), allowed, max_keys, levels, not_flat);
        if (value == NULL || value == not_flat) {
            Py_SETREF(result, value);
            break;
        }
        PyList_SET_ITEM(result, i - 1, value);
    }
    if (result != NULL && result != not_flat && is_tuple) {
        Py_SETREF(result, PyList_AsTuple(result));
    }
done:
    Py_LeaveRecursiveCall();
    return result;
}

static PyObject *
speedups_flat_value(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *sexp, *allowed, *not_flat;
    Py_ssize_t max_keys;
    int levels;
    if (!PyArg_ParseTuple(args, "OO!niO:flat_value", &sexp, &PyDict_Type, &allowed, &max_keys, &levels, &not_flat)) {
        return NULL;
    }
    /* As while parsing: the containers made here would trigger collections that find nothing. */
    int collecting = PyGC_Disable();
    PyObject *value = read_plain_item(sexp, allowed, max_keys, levels, not_flat);
    if (collecting) {
        PyGC_Enable();
    }
    return value;
}

/* ========================================================================== */
/* module                                                                     */
/* ========================================================================== */

static PyObject *
speedups_configure(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *error, *words, *vocab_items, *dialects, *default_limits;
    if (!PyArg_ParseTuple(args, "OO!O!O!O:_configure", &error, &PyDict_Type, &words, &PyDict_Type, &vocab_items,
                          &PyTuple_Type, &dialects, &default_limits)) {
        return NULL;
    }
    Py_ssize_t max_len = 0, i = 0;
    PyObject *key, *value;
    while (PyDict_Next(vocab_items, &i, &key, &value)) {
        if (!PyBytes_CheckExact(key) || !PyBytes_CheckExact(value)) {
            PyErr_SetString(PyExc_TypeError, "vocabulary items must be bytes");
            return NULL;
        }
        if (PyBytes_GET_SIZE(key) > max_len) {
            max_len = PyBytes_GET_SIZE(key);
        }
    }
    for (Py_ssize_t index = 0; index < N_WORDS; index++) {
        PyObject *number = PyLong_FromSsize_t(index);
        if (number == NULL) {
            return NULL;
        }
        PyObject *word = PyDict_GetItemWithError(words, number);
        Py_DECREF(number);
        if (word == NULL && PyErr_Occurred()) {
            return NULL;
        }
        Py_XSETREF(Words[index], Py_XNewRef(word));
    }
    Py_XSETREF(BananaError, Py_NewRef(error));
    Py_XSETREF(WordsDict, Py_NewRef(words));
    Py_XSETREF(VocabItems, Py_NewRef(vocab_items));
    Py_XSETREF(Dialects, Py_NewRef(dialects));
    Py_XSETREF(DefaultLimits, Py_NewRef(default_limits));
    VocabMaxLen = max_len;
    Py_RETURN_NONE;
}

static PyMethodDef speedups_methods[] = {
    {"flat_value", speedups_flat_value, METH_VARARGS,
     "flat_value(sexp, allowed_types, max_hash_collisions, levels, not_flat): pbcore.jelly.flat_value, compiled."},
    {"_configure", speedups_configure, METH_VARARGS,
     "_configure(BananaError, words, vocab_items, dialects, default_limits): called once by pbcore.banana."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "pbcore._speedups", "The compiled Banana codec (see pbcore.banana).", -1, speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&DecoderType) < 0 || PyType_Ready(&EncoderType) < 0 || PyType_Ready(&DecoderIterType) < 0) {
        return NULL;
    }
    if (PbDialect == NULL && (PbDialect = PyBytes_FromString("pb")) == NULL) {
        return NULL;
    }
    if (EmptyBytes == NULL && (EmptyBytes = PyBytes_FromStringAndSize(NULL, 0)) == NULL) {
        return NULL;
    }
    if (UnicodeTag == NULL && (UnicodeTag = PyBytes_FromString("unicode")) == NULL) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&DecoderType);
    if (PyModule_AddObject(module, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(&DecoderType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(module, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
