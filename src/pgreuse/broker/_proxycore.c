/*
 * pgreuse.broker._proxycore: the proxy session's per-transaction work in C.
 *
 * The reference is pgreuse.broker.proxy.PyProxySession. SessionCore is a base type holding the
 * session's hot fields as struct members, with C versions of the methods every proxied
 * transaction runs: the two read callbacks, _interest, _idle, _lease and granted. proxy.py builds
 * ProxySession from SessionCore and PyProxySession, so these override the Python methods of the
 * same names, and every other method (the message loop, refusals, TLS, closing) is the reference
 * itself, working on the same fields through the member descriptors.
 *
 * Each C method does what its Python namesake does for the usual case and calls the Python
 * reference for the rest (setup() hands them over): a read that is not whole ordinary messages
 * (_client_slow), a TLS backend (_backend_readable), a release that is not clean
 * (_release_at_idle), any change of readiness registration (_set_client, _set_backend, _interest),
 * and every error (_client_failed, _backend_failed, close). So the C code holds no logic of its own
 * beyond the fast path, and the proxy tests run the same scenarios against both (nox runs the
 * Python one with PGREUSE_PURE_PYTHON=1). The C methods call the reference functions setup() was
 * given, not self.<name>: overriding one of them in a subclass does not reach the C paths.
 *
 * System calls are made here directly: EINTR counts as "would block" (the loop calls again, or
 * the rest is buffered for the writer), where Python's socket methods retry at once.
 *
 * Why C: the broker's CPU per transaction decides the proxy's throughput on a busy host. In Python
 * this work is about 550 bytecode operations and 8 socket-method calls per transaction; here it is
 * four system calls and a few field updates.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "../wire/_scan.h"

/* Room before the read buffer for a server header cut at the end of the previous read (at most 5
 * bytes, see pgr_scan_server), so the scan sees one contiguous run without a copy of the read. */
#define STASH_ROOM 8
#define RECV (256 * 1024) /* as proxy_fields._RECV */

static unsigned char rbuf[STASH_ROOM + RECV];
static unsigned long long last_request;

/* Set by setup(). */
static PyObject *clean_outcome;
static Py_ssize_t max_pending = 1024 * 1024;
static PyObject *py_client_slow, *py_client_failed, *py_close, *py_backend_readable, *py_interest,
    *py_release_at_idle, *py_backend_failed, *py_set_client, *py_set_backend, *py_forward,
    *py_flush_to_backend;
/* Interned names and keyword tuples. */
static PyObject *s_request, *s_give_back, *s_wants_write, *kw_reading_writing, *kw_unread_checked, *empty_bytes, *empty_tuple;

/* -- ProxyCounters: the totals of pgreuse.broker.proxy.PyProxyStats, as plain integers ---------- */

typedef struct {
    PyObject_HEAD
    long long xacts, queries, received, sent, wait_ns, denied, broken;
} Counters;

static PyMemberDef Counters_members[] = {
    {"xacts", T_LONGLONG, offsetof(Counters, xacts), 0, NULL},
    {"queries", T_LONGLONG, offsetof(Counters, queries), 0, NULL},
    {"received", T_LONGLONG, offsetof(Counters, received), 0, NULL},
    {"sent", T_LONGLONG, offsetof(Counters, sent), 0, NULL},
    {"wait_ns", T_LONGLONG, offsetof(Counters, wait_ns), 0, NULL},
    {"denied", T_LONGLONG, offsetof(Counters, denied), 0, NULL},
    {"broken", T_LONGLONG, offsetof(Counters, broken), 0, NULL},
    {NULL},
};

static int
Counters_init(Counters *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"xacts", "queries", "received", "sent", "wait_ns", "denied", "broken",
                            NULL};
    self->xacts = self->queries = self->received = self->sent = 0;
    self->wait_ns = self->denied = self->broken = 0;
    return PyArg_ParseTupleAndKeywords(args, kwds, "|LLLLLLL", names, &self->xacts, &self->queries,
                                       &self->received, &self->sent, &self->wait_ns, &self->denied,
                                       &self->broken)
               ? 0
               : -1;
}

static PyObject *
Counters_repr(Counters *self)
{
    return PyUnicode_FromFormat(
        "ProxyCounters(xacts=%lld, queries=%lld, received=%lld, sent=%lld, wait_ns=%lld, "
        "denied=%lld, broken=%lld)",
        self->xacts, self->queries, self->received, self->sent, self->wait_ns, self->denied,
        self->broken);
}

static PyTypeObject CountersType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgreuse.broker._proxycore.ProxyCounters",
    .tp_basicsize = sizeof(Counters),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Totals over every proxy session of a broker (SHOW STATS).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Counters_init,
    .tp_repr = (reprfunc)Counters_repr,
    .tp_members = Counters_members,
};

/* -- SessionCore ------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int fd;
    int bfd;
    int tx;
    char closed, session_mode, proxied, unsynced, quitting, want_lease, dirty;
    char c_reading, c_writing, b_writing;
    Py_ssize_t syncs, c_left, b_left;
    long long request_ns;
    Counters *stats;
    PyObject *backend, *bsock, *btls, *request, *rejecting, *c_stash, *b_stash, *to_backend,
        *to_client, *pool, *parking_key, *on_backend;
} Session;

#define OBJECT_FIELDS(X)                                                                           \
    X(backend) X(bsock) X(btls) X(request) X(rejecting) X(c_stash) X(b_stash) X(to_backend)        \
        X(to_client) X(pool) X(parking_key) X(on_backend)

static PyMemberDef Session_members[] = {
    {"fd", T_INT, offsetof(Session, fd), 0, NULL},
    {"_bfd", T_INT, offsetof(Session, bfd), 0, NULL},
    {"_tx", T_INT, offsetof(Session, tx), 0, NULL},
    {"closed", T_BOOL, offsetof(Session, closed), 0, NULL},
    {"session_mode", T_BOOL, offsetof(Session, session_mode), 0, NULL},
    {"proxied", T_BOOL, offsetof(Session, proxied), 0, NULL},
    {"_unsynced", T_BOOL, offsetof(Session, unsynced), 0, NULL},
    {"_quitting", T_BOOL, offsetof(Session, quitting), 0, NULL},
    {"_want_lease", T_BOOL, offsetof(Session, want_lease), 0, NULL},
    {"_dirty", T_BOOL, offsetof(Session, dirty), 0, NULL},
    {"_c_reading", T_BOOL, offsetof(Session, c_reading), 0, NULL},
    {"_c_writing", T_BOOL, offsetof(Session, c_writing), 0, NULL},
    {"_b_writing", T_BOOL, offsetof(Session, b_writing), 0, NULL},
    {"_syncs", T_PYSSIZET, offsetof(Session, syncs), 0, NULL},
    {"_c_left", T_PYSSIZET, offsetof(Session, c_left), 0, NULL},
    {"_b_left", T_PYSSIZET, offsetof(Session, b_left), 0, NULL},
    {"_request_ns", T_LONGLONG, offsetof(Session, request_ns), 0, NULL},
    {NULL},
};

/* The object fields are getsets, not members: the C code reads them without checks, so none may be
 * deleted (a member could be), and those it reads as a given type must have it (the Python methods
 * assign them too, and a wrong type there must be an error, not a crash here). One getter and one
 * setter serve every such field of the three types: the closure says where, and which type. */
typedef struct {
    Py_ssize_t offset;
    PyTypeObject *type; /* NULL: any object */
    const char *name;
} FieldSpec;

static PyObject *
field_get(PyObject *self, void *closure)
{
    FieldSpec *f = closure;
    PyObject *v = *(PyObject **)((char *)self + f->offset);

    if (v == NULL) { /* only after tp_clear */
        PyErr_SetString(PyExc_AttributeError, f->name);
        return NULL;
    }
    return Py_NewRef(v);
}

static int
field_set(PyObject *self, PyObject *value, void *closure)
{
    FieldSpec *f = closure;
    PyObject **slot = (PyObject **)((char *)self + f->offset);

    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "cannot delete %s", f->name);
        return -1;
    }
    if (f->type != NULL && !Py_IS_TYPE(value, f->type)) {
        PyErr_Format(PyExc_TypeError, "%s must be %s, not %s", f->name, f->type->tp_name,
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    Py_INCREF(value);
    Py_SETREF(*slot, value);
    return 0;
}

#define FIELD_GETSET(name, spec) {name, field_get, field_set, NULL, &(spec)}

static FieldSpec session_specs[] = {
    {offsetof(Session, backend), NULL, "backend"},
    {offsetof(Session, bsock), NULL, "_bsock"},
    {offsetof(Session, btls), NULL, "_btls"},
    {offsetof(Session, request), NULL, "_request"},
    {offsetof(Session, rejecting), NULL, "_rejecting"},
    {offsetof(Session, pool), NULL, "pool"},
    {offsetof(Session, parking_key), NULL, "parking_key"},
    {offsetof(Session, on_backend), NULL, "_on_backend"},
    {offsetof(Session, to_backend), &PyByteArray_Type, "_to_backend"},
    {offsetof(Session, to_client), &PyByteArray_Type, "_to_client"},
    {offsetof(Session, c_stash), &PyBytes_Type, "_c_stash"},
    {offsetof(Session, b_stash), &PyBytes_Type, "_b_stash"},
    {offsetof(Session, stats), &CountersType, "stats"},
};

static PyGetSetDef Session_getset[] = {
    FIELD_GETSET("backend", session_specs[0]),
    FIELD_GETSET("_bsock", session_specs[1]),
    FIELD_GETSET("_btls", session_specs[2]),
    FIELD_GETSET("_request", session_specs[3]),
    FIELD_GETSET("_rejecting", session_specs[4]),
    FIELD_GETSET("pool", session_specs[5]),
    FIELD_GETSET("parking_key", session_specs[6]),
    FIELD_GETSET("_on_backend", session_specs[7]),
    FIELD_GETSET("_to_backend", session_specs[8]),
    FIELD_GETSET("_to_client", session_specs[9]),
    FIELD_GETSET("_c_stash", session_specs[10]),
    FIELD_GETSET("_b_stash", session_specs[11]),
    FIELD_GETSET("stats", session_specs[12]),
    {NULL},
};

#include "_poolcore.h"

static PyObject *
Session_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Session *self = (Session *)type->tp_alloc(type, 0);

    (void)args;
    (void)kwds;
    if (self == NULL)
        return NULL;
    self->fd = self->bfd = -1;
    self->tx = 'I';
#define INIT_NONE(f) self->f = Py_NewRef(Py_None);
    OBJECT_FIELDS(INIT_NONE)
#undef INIT_NONE
    Py_SETREF(self->c_stash, Py_NewRef(empty_bytes));
    Py_SETREF(self->b_stash, Py_NewRef(empty_bytes));
    Py_SETREF(self->to_backend, PyByteArray_FromStringAndSize(NULL, 0));
    Py_SETREF(self->to_client, PyByteArray_FromStringAndSize(NULL, 0));
    self->stats = (Counters *)PyObject_CallNoArgs((PyObject *)&CountersType);
    if (self->to_backend == NULL || self->to_client == NULL || self->stats == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
Session_traverse(Session *self, visitproc visit, void *arg)
{
#define VISIT(f) Py_VISIT(self->f);
    OBJECT_FIELDS(VISIT)
#undef VISIT
    Py_VISIT(self->stats);
    return 0;
}

static int
Session_clear(Session *self)
{
#define CLEAR(f) Py_CLEAR(self->f);
    OBJECT_FIELDS(CLEAR)
#undef CLEAR
    Py_CLEAR(self->stats);
    return 0;
}

static void
Session_dealloc(Session *self)
{
    PyTypeObject *type = Py_TYPE(self);

    PyObject_GC_UnTrack(self);
    Session_clear(self);
    type->tp_free((PyObject *)self);
}

/* -- helpers ----------------------------------------------------------------------------------- */

/* The C core stamps times the pool's Python code subtracts from time.monotonic_ns(): it must read
 * the same clock, which on Linux (the only system pgreuse runs on) is CLOCK_MONOTONIC. */
#ifndef __linux__
#error "pgreuse.broker._proxycore is built for Linux only (its clock must be time.monotonic_ns()'s)"
#endif

static long long
monotonic_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int
would_block(int err)
{
    return err == EAGAIN || err == EWOULDBLOCK || err == EINTR;
}

/* The OSError Python's socket methods would raise for errno ``err`` (a new reference; OSError
 * picks the subclass, e.g. ConnectionResetError). */
static PyObject *
os_error(int err)
{
    return PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
}

/* The result of a call made for its effect: 0, or -1 with the call's error. */
static int
discard(PyObject *result)
{
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* Call the Python reference ``func`` (args[0] is the session). */
static int
call_ref(PyObject *func, PyObject *const *args, size_t nargs, PyObject *kwnames)
{
    if (func == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "pgreuse.broker._proxycore.setup() was not called");
        return -1;
    }
    return discard(PyObject_Vectorcall(func, args, nargs, kwnames));
}

/* func(self) or func(self, arg). */
static int
call_py(PyObject *func, Session *self, PyObject *arg)
{
    PyObject *args[2] = {(PyObject *)self, arg};

    return call_ref(func, args, arg == NULL ? 1 : 2, NULL);
}

/* _set_client / _set_backend(reading=..., writing=...) */
static int
call_set(PyObject *func, Session *self, int reading, int writing)
{
    PyObject *args[3] = {(PyObject *)self, reading ? Py_True : Py_False,
                         writing ? Py_True : Py_False};

    return call_ref(func, args, 1, kw_reading_writing);
}

/* getattr(obj, name) is truthy: 1, 0, or -1 with an error. */
static int
attr_true(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    int t;

    if (v == NULL)
        return -1;
    t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

static int
backend_failed_text(Session *self, PyObject *why)
{
    int r;

    if (why == NULL)
        return -1;
    r = call_py(py_backend_failed, self, why);
    Py_DECREF(why);
    return r;
}

/* _backend_failed(f"{what}: {exc}") for errno ``err``. */
static int
backend_failed_errno(Session *self, const char *what, int err)
{
    PyObject *exc = os_error(err);

    if (exc == NULL)
        return -1;
    PyObject *why = PyUnicode_FromFormat("%s: %S", what, exc);
    Py_DECREF(exc);
    return backend_failed_text(self, why);
}

static int
append(PyObject *bytearray, const unsigned char *data, Py_ssize_t n)
{
    Py_ssize_t old = PyByteArray_GET_SIZE(bytearray);

    if (PyByteArray_Resize(bytearray, old + n) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(bytearray) + old, data, (size_t)n);
    return 0;
}

/* -- the methods ------------------------------------------------------------------------------- */

/* _idle: 1, 0, or -1 with an error. */
static int
idle(Session *self)
{
    if (self->syncs || self->unsynced || self->tx != 'I' || self->b_left ||
        PyBytes_GET_SIZE(self->b_stash) || PyByteArray_GET_SIZE(self->to_backend) || self->c_left)
        return 0;
    if (self->btls != Py_None) {
        int t = attr_true(self->btls, s_wants_write);

        return t < 0 ? -1 : !t;
    }
    return 1;
}

static PyObject *
Session_idle(Session *self, PyObject *unused)
{
    int r = idle(self);

    (void)unused;
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

/* _interest: the usual case here, the rest in the reference. */
static int
interest(Session *self)
{
    Py_ssize_t pending = PyByteArray_GET_SIZE(self->to_backend);

    if (self->closed)
        return 0;
    if (PyByteArray_GET_SIZE(self->to_client) == 0 && self->btls == Py_None &&
        (pending == 0 || (self->backend == Py_None && pending < max_pending))) {
        /* Nothing buffered, or a query waiting for its backend: read both sides, write neither. */
        if ((!self->c_reading || self->c_writing) && call_set(py_set_client, self, 1, 0) < 0)
            return -1;
        if (self->backend != Py_None) {
            BackendObject *core = backend_core(self->backend);

            if (core == NULL)
                return -1;
            if ((!core->watched || self->b_writing) && call_set(py_set_backend, self, 1, 0) < 0)
                return -1;
        }
        return 0;
    }
    return call_py(py_interest, self, NULL);
}

static PyObject *
Session_interest(Session *self, PyObject *unused)
{
    (void)unused;
    if (interest(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

#include "_lending.h"

static int
lease(Session *self)
{
    PyObject *request = PyLong_FromUnsignedLongLong(++last_request);
    PyObject *pool;
    int done;

    if (request == NULL)
        return -1;
    self->want_lease = 0;
    Py_SETREF(self->request, Py_NewRef(request));
    self->request_ns = monotonic_ns();
    pool = Py_NewRef(self->pool);
    /* An idle backend and nobody waiting: lent here (_lending.h); else Pool.request. Either may
     * answer synchronously: granted() runs inside this call. */
    done = lend_idle(self, pool, request);
    if (done == 0)
        done = queue_request(self, pool, request);
    if (done == 0) {
        PyObject *args[4] = {pool, (PyObject *)self, request, self->parking_key};

        done = discard(PyObject_VectorcallMethod(s_request, args, 4, NULL));
    }
    Py_DECREF(pool);
    Py_DECREF(request);
    return done < 0 ? -1 : 0;
}

static PyObject *
Session_lease(Session *self, PyObject *unused)
{
    (void)unused;
    if (lease(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Send ``data`` on ``fd`` and keep in ``rest`` what the socket does not take now (what
 * _forward and _reply do): 0, -1 with a Python error, or the errno of a failed send. */
static int
send_rest(int fd, const unsigned char *data, Py_ssize_t n, PyObject *rest)
{
    ssize_t sent = send(fd, data, (size_t)n, MSG_NOSIGNAL);

    if (sent < 0) {
        int err = errno;

        if (!would_block(err))
            return err;
        sent = 0;
    }
    return sent < n ? append(rest, data + sent, n - sent) : 0;
}

/* _forward for a chunk of the shared read buffer. */
static int
forward(Session *self, const unsigned char *data, Py_ssize_t n)
{
    int err;

    if (self->backend == Py_None || PyByteArray_GET_SIZE(self->to_backend))
        return append(self->to_backend, data, n);
    if (self->btls != Py_None) {
        PyObject *chunk = PyBytes_FromStringAndSize((const char *)data, n);
        int r;

        if (chunk == NULL)
            return -1;
        r = call_py(py_forward, self, chunk);
        Py_DECREF(chunk);
        return r;
    }
    err = send_rest(self->bfd, data, n, self->to_backend);
    return err > 0 ? backend_failed_errno(self, "send failed", err) : err;
}

static int
flush_to_backend(Session *self)
{
    PyObject *pending = self->to_backend;
    ssize_t sent;

    if (self->btls != Py_None)
        return call_py(py_flush_to_backend, self, NULL);
    sent = send(self->bfd, PyByteArray_AS_STRING(pending), (size_t)PyByteArray_GET_SIZE(pending),
                MSG_NOSIGNAL);
    if (sent < 0) {
        int err = errno;

        return would_block(err) ? 0 : backend_failed_errno(self, "send failed", err);
    }
    return PySequence_DelSlice(pending, 0, sent);
}

/* The lease for a query read just now failed (an error is set): the query must not be lost with
 * the shared read buffer. It goes to the backend if one was granted before the failure, else into
 * _to_backend, where it waits as it would have had the lease not been tried first. */
static void
keep_query(Session *self, const unsigned char *data, Py_ssize_t n)
{
    PyObject *type, *value, *tb;

    PyErr_Fetch(&type, &value, &tb);
    if (forward(self, data, n) < 0)
        PyErr_Clear(); /* (the first error is the one reported) */
    PyErr_Restore(type, value, tb);
}

static PyObject *
Session_client_readable(Session *self, PyObject *unused)
{
    const unsigned char *data = rbuf + STASH_ROOM;
    ssize_t n;
    long syncs, unsynced, first;
    int r;

    (void)unused;
    if (self->closed) /* (the reader is removed at close: never read a descriptor number reused) */
        Py_RETURN_NONE;
    n = recv(self->fd, rbuf + STASH_ROOM, RECV, 0);
    if (n < 0) {
        int err = errno;
        PyObject *exc;

        if (would_block(err))
            Py_RETURN_NONE;
        exc = os_error(err);
        if (exc == NULL)
            return NULL;
        r = call_py(py_client_failed, self, exc);
        Py_DECREF(exc);
        return r < 0 ? NULL : Py_NewRef(Py_None);
    }
    if (n == 0)
        return call_py(py_close, self, NULL) < 0 ? NULL : Py_NewRef(Py_None);
    self->stats->received += n;
    if (PyBytes_GET_SIZE(self->c_stash) == 0 && self->c_left == 0 && self->rejecting == Py_None &&
        pgr_scan_client(data, n, self->session_mode, &syncs, &unsynced, &first) == 0 &&
        !(pgr_neutral(first) && self->backend == Py_None && self->request == Py_None &&
          !self->want_lease)) {
        /* Whole messages that _decide would all forward, and no refusal being answered. */
        self->quitting = 0;
        self->proxied = 1;
        if (syncs) {
            self->syncs += syncs;
            self->stats->queries += syncs;
        }
        if (unsynced >= 0)
            self->unsynced = unsynced == 1;
        r = 0;
        if (self->backend != Py_None && PyByteArray_GET_SIZE(self->to_backend) == 0) {
            r = forward(self, data, n);
        }
        else if (self->backend == Py_None && self->request == Py_None &&
                 PyByteArray_GET_SIZE(self->to_backend) == 0 && lendable(self->pool, &r) != NULL) {
            /* A backend is lent at once (lend_idle): lease first, and the query goes from the
             * read buffer to it without a copy into _to_backend (the same bytes and the same
             * state as the append, lease and flush below). */
            r = lease(self);
            if (r == 0)
                r = forward(self, data, n);
            else
                keep_query(self, data, n);
        }
        else if (r < 0) {
            keep_query(self, data, n);
            return NULL;
        }
        else {
            r = append(self->to_backend, data, n);
            if (r == 0 && self->backend == Py_None && self->request == Py_None)
                r = lease(self);
        }
        if (r < 0 || interest(self) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    {
        PyObject *chunk = PyBytes_FromStringAndSize((const char *)data, n);

        if (chunk == NULL)
            return NULL;
        r = call_py(py_client_slow, self, chunk);
        Py_DECREF(chunk);
    }
    return r < 0 ? NULL : Py_NewRef(Py_None);
}

/* _reply for a chunk of the shared read buffer. */
static int
reply(Session *self, const unsigned char *data, Py_ssize_t n)
{
    int err;

    self->stats->sent += n;
    if (PyByteArray_GET_SIZE(self->to_client))
        return append(self->to_client, data, n);
    err = send_rest(self->fd, data, n, self->to_client);
    return err > 0 ? 0 : err; /* a failed send: the client is gone, its EOF comes to the reader */
}

/* _scan_backend over the n bytes just read at rbuf + STASH_ROOM. */
static int
scan_backend(Session *self, Py_ssize_t n)
{
    unsigned char *data = rbuf + STASH_ROOM;
    long long len = n;
    long long pos = 0;
    Py_ssize_t stashed = PyBytes_GET_SIZE(self->b_stash);
    long syncs = (long)self->syncs;
    long tx, flags;

    if (stashed) {
        if (stashed > STASH_ROOM) {
            PyErr_Format(PyExc_SystemError, "a stashed server header of %zd bytes", stashed);
            return -1;
        }
        data -= stashed;
        memcpy(data, PyBytes_AS_STRING(self->b_stash), (size_t)stashed);
        len += stashed;
        Py_SETREF(self->b_stash, Py_NewRef(empty_bytes));
    }
    if (self->b_left) { /* the rest of a message begun in an earlier read */
        pos = self->b_left < len ? self->b_left : len;
        self->b_left -= (Py_ssize_t)pos;
    }
    flags = pgr_scan_server(data, len, &pos, &syncs, &tx);
    self->syncs = syncs;
    if (tx >= 0)
        self->tx = (int)tx;
    if (flags) {
        if (flags & UNSOLICITED_READY)
            return backend_failed_text(
                self, PyUnicode_FromString("server sent a ReadyForQuery nobody asked for")) < 0
                       ? -1
                       : 1;
        if (flags & BAD_LENGTH) {
            PyObject *type = PyBytes_FromStringAndSize((const char *)data + pos, 1);
            PyObject *why;

            if (type == NULL)
                return -1;
            why = PyUnicode_FromFormat("server message type %R has invalid length %d", type,
                                       (int)pgr_length(data + pos));
            Py_DECREF(type);
            return backend_failed_text(self, why) < 0 ? -1 : 1;
        }
        if (!self->session_mode)
            self->dirty = 1; /* a SET: the next holder must not inherit it */
    }
    if (pos > len) {
        self->b_left = (Py_ssize_t)(pos - len);
    }
    else if (pos < len) {
        PyObject *rest = PyBytes_FromStringAndSize((const char *)data + pos, (Py_ssize_t)(len - pos));

        if (rest == NULL)
            return -1;
        Py_SETREF(self->b_stash, rest);
    }
    return 0;
}

/* _give_back(CLEAN, just_read=True). */
static int
give_back_clean(Session *self)
{
    PyObject *b = Py_NewRef(self->backend);
    PyObject *pool;
    int done;

    if (self->b_writing && call_set(py_set_backend, self, 0, 0) < 0) {
        Py_DECREF(b);
        return -1;
    }
    /* The read registration goes back with the backend (see pool.Backend). */
    Py_SETREF(self->backend, Py_NewRef(Py_None));
    Py_SETREF(self->bsock, Py_NewRef(Py_None));
    Py_SETREF(self->btls, Py_NewRef(Py_None));
    self->bfd = -1;
    self->stats->xacts++;
    pool = Py_NewRef(self->pool);
    /* The next waiter in process, or nobody waiting: done here (_lending.h); else Pool.give_back. */
    done = give_back_fast(self, pool, b);
    if (done == 0) {
        PyObject *args[5] = {pool, b, (PyObject *)self, clean_outcome, Py_True};

        done = discard(PyObject_VectorcallMethod(s_give_back, args, 4, kw_unread_checked));
    }
    Py_DECREF(pool);
    Py_DECREF(b);
    return done < 0 ? -1 : 0;
}

static PyObject *
Session_backend_readable(Session *self, PyObject *unused)
{
    ssize_t n;
    int r;

    (void)unused;
    if (self->btls != Py_None || self->backend == Py_None)
        return call_py(py_backend_readable, self, NULL) < 0 ? NULL : Py_NewRef(Py_None);
    n = recv(self->bfd, rbuf + STASH_ROOM, RECV, 0);
    if (n < 0) {
        int err = errno;

        if (would_block(err))
            Py_RETURN_NONE;
        return backend_failed_errno(self, "receive failed", err) < 0 ? NULL : Py_NewRef(Py_None);
    }
    if (n == 0) {
        r = backend_failed_text(self, PyUnicode_FromString("the server closed the connection"));
        return r < 0 ? NULL : Py_NewRef(Py_None);
    }
    /* Forward first, then scan: the scan is then off the path of the answer. */
    if (reply(self, rbuf + STASH_ROOM, n) < 0)
        return NULL;
    r = scan_backend(self, n);
    if (r != 0) /* -1: an error; 1: the backend failed and the session is closed */
        return r < 0 ? NULL : Py_NewRef(Py_None);
    if (self->closed)
        Py_RETURN_NONE;
    if (self->backend != Py_None && (self->quitting || !self->session_mode)) {
        r = idle(self);
        if (r < 0)
            return NULL;
        if (r) {
            if (!self->dirty && !self->session_mode)
                r = give_back_clean(self);
            else
                r = call_py(py_release_at_idle, self, NULL);
            if (r < 0)
                return NULL;
        }
    }
    if (interest(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* granted(b, request): 0, or -1 with an error. */
static int
granted_impl(Session *self, PyObject *b, PyObject *request)
{
    PyObject *sock, *tls;
    BackendObject *core;
    int same, fd;

    same = self->request == Py_None ? 0 : PyObject_RichCompareBool(request, self->request, Py_EQ);
    if (same < 0)
        return -1;
    if (!same || self->closed) {
        /* Cannot happen in process (abandon() runs before close() returns); never keep it. */
        PyObject *pool = Py_NewRef(self->pool);
        PyObject *call[4] = {pool, b, (PyObject *)self, clean_outcome};
        int r = discard(PyObject_VectorcallMethod(s_give_back, call, 4, NULL));

        Py_DECREF(pool);
        return r;
    }
    Py_SETREF(self->request, Py_NewRef(Py_None));
    self->stats->wait_ns += monotonic_ns() - self->request_ns;
    if ((core = backend_core(b)) == NULL)
        return -1;
    sock = Py_NewRef(core->sock);
    fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0) {
        Py_DECREF(sock);
        return -1;
    }
    tls = Py_NewRef(core->tls);
    Py_SETREF(self->backend, Py_NewRef(b));
    self->bfd = fd;
    Py_SETREF(self->btls, tls);
    Py_SETREF(self->bsock, tls == Py_None ? sock : Py_NewRef(tls));
    if (tls != Py_None)
        Py_DECREF(sock);
    /* The socket is still registered for reading (the pool's idle watch): take the callback. */
    Py_SETREF(core->on_readable, Py_NewRef(self->on_backend));
    if (PyByteArray_GET_SIZE(self->to_backend) && flush_to_backend(self) < 0)
        return -1;
    if ((PyByteArray_GET_SIZE(self->to_backend) || !self->c_reading || self->btls != Py_None) &&
        interest(self) < 0)
        return -1;
    return 0;
}

static PyObject *
Session_granted(Session *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "granted() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (granted_impl(self, args[0], args[1]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef Session_methods[] = {
    {"_client_readable", (PyCFunction)Session_client_readable, METH_NOARGS, NULL},
    {"_backend_readable", (PyCFunction)Session_backend_readable, METH_NOARGS, NULL},
    {"_interest", (PyCFunction)Session_interest, METH_NOARGS, NULL},
    {"_idle", (PyCFunction)Session_idle, METH_NOARGS, NULL},
    {"_lease", (PyCFunction)Session_lease, METH_NOARGS, NULL},
    {"granted", (PyCFunction)(void (*)(void))Session_granted, METH_FASTCALL, NULL},
    {NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgreuse.broker._proxycore.SessionCore",
    .tp_basicsize = sizeof(Session),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The proxy session's hot fields and per-transaction methods (see proxy.py).",
    .tp_new = Session_new,
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_free = PyObject_GC_Del,
    .tp_traverse = (traverseproc)Session_traverse,
    .tp_clear = (inquiry)Session_clear,
    .tp_members = Session_members,
    .tp_getset = Session_getset,
    .tp_methods = Session_methods,
};

/* -- setup ------------------------------------------------------------------------------------- */

static int
take(PyObject *cls, const char *name, PyObject **slot)
{
    PyObject *f = PyObject_GetAttrString(cls, name);

    if (f == NULL)
        return -1;
    if (!PyFunction_Check(f)) {
        PyErr_Format(PyExc_TypeError, "setup(): %s.%s is not a Python function",
                     ((PyTypeObject *)cls)->tp_name, name);
        Py_DECREF(f);
        return -1;
    }
    Py_XSETREF(*slot, f);
    return 0;
}

static PyObject *
setup(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 7 || !PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "setup(reference_class, clean_outcome, max_pending, "
                                         "closed, idle, lent, shared)");
        return NULL;
    }
    Py_XSETREF(st_closed, Py_NewRef(args[3]));
    Py_XSETREF(st_idle, Py_NewRef(args[4]));
    Py_XSETREF(st_lent, Py_NewRef(args[5]));
    Py_XSETREF(st_shared, Py_NewRef(args[6]));
    {
        Py_ssize_t limit = PyLong_AsSsize_t(args[2]);

        if (limit == -1 && PyErr_Occurred())
            return NULL;
        max_pending = limit;
    }
    Py_XSETREF(clean_outcome, Py_NewRef(args[1]));
    if (take(args[0], "_client_slow", &py_client_slow) < 0 ||
        take(args[0], "_client_failed", &py_client_failed) < 0 ||
        take(args[0], "close", &py_close) < 0 ||
        take(args[0], "_backend_readable", &py_backend_readable) < 0 ||
        take(args[0], "_interest", &py_interest) < 0 ||
        take(args[0], "_release_at_idle", &py_release_at_idle) < 0 ||
        take(args[0], "_backend_failed", &py_backend_failed) < 0 ||
        take(args[0], "_set_client", &py_set_client) < 0 ||
        take(args[0], "_set_backend", &py_set_backend) < 0 ||
        take(args[0], "_forward", &py_forward) < 0 ||
        take(args[0], "_flush_to_backend", &py_flush_to_backend) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"setup", (PyCFunction)(void (*)(void))setup, METH_FASTCALL,
     "setup(reference_class, clean_outcome, max_pending, closed, idle, lent, shared): hand over "
     "the Python reference, and SlotState's members."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pgreuse.broker._proxycore", "The proxy session's hot path in C.", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__proxycore(void)
{
    PyObject *m;

    if ((s_request = PyUnicode_InternFromString("request")) == NULL ||
        (s_give_back = PyUnicode_InternFromString("give_back")) == NULL ||
        (s_wants_write = PyUnicode_InternFromString("wants_write")) == NULL ||
        (kw_reading_writing = Py_BuildValue("(ss)", "reading", "writing")) == NULL ||
        (kw_unread_checked = Py_BuildValue("(s)", "unread_checked")) == NULL ||
        (empty_bytes = PyBytes_FromStringAndSize(NULL, 0)) == NULL ||
        (empty_tuple = PyTuple_New(0)) == NULL || lending_names() < 0)
        return NULL;
    if (PyType_Ready(&CountersType) < 0 || PyType_Ready(&SessionType) < 0 ||
        PyType_Ready(&BackendType) < 0 || PyType_Ready(&WaiterType) < 0 ||
        PyType_Ready(&PoolType) < 0)
        return NULL;
    c_granted_descr = PyDict_GetItemWithError(SessionType.tp_dict, a_granted); /* borrowed */
    if (c_granted_descr == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_SystemError, "SessionType has no granted");
        return NULL;
    }
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "ProxyCounters", (PyObject *)&CountersType) < 0 ||
        PyModule_AddObjectRef(m, "SessionCore", (PyObject *)&SessionType) < 0 ||
        PyModule_AddObjectRef(m, "BackendCore", (PyObject *)&BackendType) < 0 ||
        PyModule_AddObjectRef(m, "WaiterCore", (PyObject *)&WaiterType) < 0 ||
        PyModule_AddObjectRef(m, "PoolCore", (PyObject *)&PoolType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
