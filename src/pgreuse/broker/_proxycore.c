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
 *
 * The module is in four files along the reference's seams (proxy_fields.py, proxy_client.py,
 * proxy_lease.py, proxy_backend.py), with what they share in _proxycore.h: _proxyfields.c holds the
 * ProxyCounters and SessionCore types and their fields, _proxyclient.c the client's read callback
 * and the sends to the backend, _proxybackend.c the backend's read callback. This file holds the
 * module (its state, setup() and init) and what works on the pool's objects: _idle, _interest,
 * _lease, granted and the clean give-back. Those are here because _poolcore.h and _lending.h, whose
 * types and functions are static, are included here and nowhere else.
 */
#include "_proxycore.h"

unsigned char pxc_rbuf[STASH_ROOM + RECV];
static unsigned long long last_request;

/* Set by setup(). */
static PyObject *clean_outcome;
static Py_ssize_t max_pending = 1024 * 1024;
PyObject *pxc_py_client_slow, *pxc_py_client_failed, *pxc_py_close, *pxc_py_backend_readable,
    *pxc_py_release_at_idle, *pxc_py_backend_failed, *pxc_py_forward, *pxc_py_flush_to_backend;
static PyObject *py_interest, *py_set_client, *py_set_backend;
/* Interned names and keyword tuples. */
static PyObject *s_request, *s_give_back, *s_wants_write, *kw_reading_writing, *kw_unread_checked, *empty_tuple;
PyObject *pxc_empty_bytes;

#include "_poolcore.h"

/* -- helpers (those the other files call too are in _proxycore.h) ------------------------------- */

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

/* -- the methods ------------------------------------------------------------------------------- */

/* _idle: 1, 0, or -1 with an error. */
int
pxc_idle(Session *self)
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

PyObject *
pxc_Session_idle(Session *self, PyObject *unused)
{
    int r = pxc_idle(self);

    (void)unused;
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

/* _interest: the usual case here, the rest in the reference. */
int
pxc_interest(Session *self)
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

PyObject *
pxc_Session_interest(Session *self, PyObject *unused)
{
    (void)unused;
    if (pxc_interest(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

#include "_lending.h"

int
pxc_lease(Session *self)
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

PyObject *
pxc_Session_lease(Session *self, PyObject *unused)
{
    (void)unused;
    if (pxc_lease(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* _give_back(CLEAN, just_read=True). */
int
pxc_give_back_clean(Session *self)
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
    if (PyByteArray_GET_SIZE(self->to_backend) && pxc_flush_to_backend(self) < 0)
        return -1;
    if ((PyByteArray_GET_SIZE(self->to_backend) || !self->c_reading || self->btls != Py_None) &&
        pxc_interest(self) < 0)
        return -1;
    return 0;
}

PyObject *
pxc_Session_granted(Session *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "granted() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (granted_impl(self, args[0], args[1]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

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
    if (take(args[0], "_client_slow", &pxc_py_client_slow) < 0 ||
        take(args[0], "_client_failed", &pxc_py_client_failed) < 0 ||
        take(args[0], "close", &pxc_py_close) < 0 ||
        take(args[0], "_backend_readable", &pxc_py_backend_readable) < 0 ||
        take(args[0], "_interest", &py_interest) < 0 ||
        take(args[0], "_release_at_idle", &pxc_py_release_at_idle) < 0 ||
        take(args[0], "_backend_failed", &pxc_py_backend_failed) < 0 ||
        take(args[0], "_set_client", &py_set_client) < 0 ||
        take(args[0], "_set_backend", &py_set_backend) < 0 ||
        take(args[0], "_forward", &pxc_py_forward) < 0 ||
        take(args[0], "_flush_to_backend", &pxc_py_flush_to_backend) < 0)
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
        (pxc_empty_bytes = PyBytes_FromStringAndSize(NULL, 0)) == NULL ||
        (empty_tuple = PyTuple_New(0)) == NULL || lending_names() < 0)
        return NULL;
    if (PyType_Ready(&pxc_CountersType) < 0 || PyType_Ready(&pxc_SessionType) < 0 ||
        PyType_Ready(&BackendType) < 0 || PyType_Ready(&WaiterType) < 0 ||
        PyType_Ready(&PoolType) < 0)
        return NULL;
    c_granted_descr = PyDict_GetItemWithError(pxc_SessionType.tp_dict, a_granted); /* borrowed */
    if (c_granted_descr == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_SystemError, "SessionType has no granted");
        return NULL;
    }
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "ProxyCounters", (PyObject *)&pxc_CountersType) < 0 ||
        PyModule_AddObjectRef(m, "SessionCore", (PyObject *)&pxc_SessionType) < 0 ||
        PyModule_AddObjectRef(m, "BackendCore", (PyObject *)&BackendType) < 0 ||
        PyModule_AddObjectRef(m, "WaiterCore", (PyObject *)&WaiterType) < 0 ||
        PyModule_AddObjectRef(m, "PoolCore", (PyObject *)&PoolType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
