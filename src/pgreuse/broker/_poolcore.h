/*
 * BackendCore, WaiterCore and PoolCore: the fields of pgreuse.broker.pool.Backend, Waiter and Pool
 * that the lending fast path (_lending.h) and the C session read and write on every proxied
 * transaction, as struct members. Included by _proxycore.c.
 *
 * pool.py builds Backend, Waiter and Pool on these bases when the C core runs, so the Python code reads and
 * writes the same fields through their descriptors and the C code reaches them without the
 * attribute machinery (a lookup in the type, then in the instance, per read: before this, that
 * machinery was about a tenth of the broker's CPU per transaction). The classes are plain Python
 * ones with PGREUSE_PURE_PYTHON=1. Nothing here has logic: these are fields, and Backend's
 * dispatch_readable, the loop's read callback for a backend socket (in Python a frame per read).
 */
#ifndef PGREUSE_POOLCORE_H
#define PGREUSE_POOLCORE_H

/* The functions every type here has alike, for a struct whose object fields FIELDS lists:
 * Name_alloc (fields None), Name_traverse, Name_clear, Name_dealloc. */
#define FIELD_INIT_NONE(f) self->f = Py_NewRef(Py_None);
#define FIELD_VISIT(f) Py_VISIT(self->f);
#define FIELD_CLEAR(f) Py_CLEAR(self->f);
#define CORE_TYPE_FUNCS(Name, Struct, FIELDS)                                                      \
    static Struct *Name##_alloc(PyTypeObject *type)                                                \
    {                                                                                              \
        Struct *self = (Struct *)type->tp_alloc(type, 0);                                          \
                                                                                                   \
        if (self == NULL)                                                                          \
            return NULL;                                                                           \
        FIELDS(FIELD_INIT_NONE)                                                                    \
        return self;                                                                               \
    }                                                                                              \
    static int Name##_traverse(Struct *self, visitproc visit, void *arg)                           \
    {                                                                                              \
        FIELDS(FIELD_VISIT)                                                                        \
        return 0;                                                                                  \
    }                                                                                              \
    static int Name##_clear(Struct *self)                                                          \
    {                                                                                              \
        FIELDS(FIELD_CLEAR)                                                                        \
        return 0;                                                                                  \
    }                                                                                              \
    static void Name##_dealloc(Struct *self)                                                       \
    {                                                                                              \
        PyTypeObject *type = Py_TYPE(self);                                                        \
                                                                                                   \
        PyObject_GC_UnTrack(self);                                                                 \
        Name##_clear(self);                                                                        \
        type->tp_free((PyObject *)self);                                                           \
    }

/* -- BackendCore ------------------------------------------------------------------------------- */

typedef struct BackendObject { /* (tagged: _proxycore.h names it) */
    PyObject_HEAD
    long long lease_started_ns, leases, use_ns;
    char watched;
    PyObject *state, *holder, *parking, *sock, *tls, *on_readable, *idle_watch;
} BackendObject;

#define BACKEND_FIELDS(X) X(state) X(holder) X(parking) X(sock) X(tls) X(on_readable) X(idle_watch)

static FieldSpec backend_specs[] = {
    {offsetof(BackendObject, state), NULL, "state"},
    {offsetof(BackendObject, holder), NULL, "holder"},
    {offsetof(BackendObject, parking), NULL, "parking"},
    {offsetof(BackendObject, sock), NULL, "sock"},
    {offsetof(BackendObject, tls), NULL, "tls"},
    {offsetof(BackendObject, on_readable), NULL, "on_readable"},
    {offsetof(BackendObject, idle_watch), NULL, "idle_watch"},
};

static PyGetSetDef Backend_getset[] = {
    FIELD_GETSET("state", backend_specs[0]),
    FIELD_GETSET("holder", backend_specs[1]),
    FIELD_GETSET("parking", backend_specs[2]),
    FIELD_GETSET("sock", backend_specs[3]),
    FIELD_GETSET("tls", backend_specs[4]),
    FIELD_GETSET("on_readable", backend_specs[5]),
    FIELD_GETSET("idle_watch", backend_specs[6]),
    {NULL},
};

static PyMemberDef Backend_members[] = {
    {"lease_started_ns", T_LONGLONG, offsetof(BackendObject, lease_started_ns), 0, NULL},
    {"leases", T_LONGLONG, offsetof(BackendObject, leases), 0, NULL},
    {"use_ns", T_LONGLONG, offsetof(BackendObject, use_ns), 0, NULL},
    {"watched", T_BOOL, offsetof(BackendObject, watched), 0, NULL},
    {NULL},
};

CORE_TYPE_FUNCS(Backend, BackendObject, BACKEND_FIELDS)

static PyObject *
Backend_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    return (PyObject *)Backend_alloc(type);
}

/* The loop's read callback for the backend's socket: whoever holds it now (see pool.Backend). */
static PyObject *
Backend_dispatch_readable(BackendObject *self, PyObject *unused)
{
    PyObject *handler = self->on_readable;

    (void)unused;
    if (handler == NULL || handler == Py_None)
        Py_RETURN_NONE;
    Py_INCREF(handler); /* it may replace itself */
    Py_SETREF(handler, PyObject_CallNoArgs(handler));
    if (handler == NULL)
        return NULL;
    Py_DECREF(handler);
    Py_RETURN_NONE;
}

static PyMethodDef Backend_methods[] = {
    {"dispatch_readable", (PyCFunction)Backend_dispatch_readable, METH_NOARGS,
     "Call on_readable, if set (the loop's read callback for the socket)."},
    {NULL},
};

static PyTypeObject BackendType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgreuse.broker._proxycore.BackendCore",
    .tp_basicsize = sizeof(BackendObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The hot fields of pgreuse.broker.pool.Backend.",
    .tp_new = Backend_new,
    .tp_dealloc = (destructor)Backend_dealloc,
    .tp_free = PyObject_GC_Del,
    .tp_traverse = (traverseproc)Backend_traverse,
    .tp_clear = (inquiry)Backend_clear,
    .tp_members = Backend_members,
    .tp_getset = Backend_getset,
    .tp_methods = Backend_methods,
};

/* ``obj``'s type is ``base`` or a subtype of it. The last subtype found is kept (pool.py's class,
 * in practice the only one), so the usual check is one comparison rather than a walk of the MRO. */
static int
is_core(PyObject *obj, PyTypeObject *base, PyObject **seen)
{
    PyTypeObject *type = Py_TYPE(obj);

    if ((PyObject *)type == *seen)
        return 1;
    if (!PyType_IsSubtype(type, base))
        return 0;
    Py_XSETREF(*seen, Py_NewRef((PyObject *)type)); /* (a reference: its address stays its own) */
    return 1;
}

static PyObject *backend_class, *pool_class; /* the subtypes last seen by is_core */

#define AS_BACKEND(o) (is_core((o), &BackendType, &backend_class) ? (BackendObject *)(o) : NULL)

/* A session's backend: with the C core, pool.Backend is built on BackendCore (pool.C_FIELDS), so
 * anything else is a bug, reported as one. */
static BackendObject *
backend_core(PyObject *b)
{
    BackendObject *core = AS_BACKEND(b);

    if (core == NULL)
        PyErr_Format(PyExc_TypeError, "a proxy session's backend must be pool.Backend, not %s",
                     Py_TYPE(b)->tp_name);
    return core;
}

/* -- WaiterCore -------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    long long enqueued_ns, deadline_ns;
    PyObject *client, *request, *parking;
} WaiterObject;

#define WAITER_FIELDS(X) X(client) X(request) X(parking)

static FieldSpec waiter_specs[] = {
    {offsetof(WaiterObject, client), NULL, "client"},
    {offsetof(WaiterObject, request), NULL, "request"},
    {offsetof(WaiterObject, parking), NULL, "parking"},
};

static PyGetSetDef Waiter_getset[] = {
    FIELD_GETSET("client", waiter_specs[0]),
    FIELD_GETSET("request", waiter_specs[1]),
    FIELD_GETSET("parking", waiter_specs[2]),
    {NULL},
};

static PyMemberDef Waiter_members[] = {
    {"enqueued_ns", T_LONGLONG, offsetof(WaiterObject, enqueued_ns), 0, NULL},
    {"deadline_ns", T_LONGLONG, offsetof(WaiterObject, deadline_ns), 0, NULL},
    {NULL},
};

CORE_TYPE_FUNCS(Waiter, WaiterObject, WAITER_FIELDS)

static PyObject *
Waiter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    return (PyObject *)Waiter_alloc(type);
}

static PyTypeObject WaiterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgreuse.broker._proxycore.WaiterCore",
    .tp_basicsize = sizeof(WaiterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The fields of pgreuse.broker.pool.Waiter.",
    .tp_new = Waiter_new,
    .tp_dealloc = (destructor)Waiter_dealloc,
    .tp_free = PyObject_GC_Del,
    .tp_traverse = (traverseproc)Waiter_traverse,
    .tp_clear = (inquiry)Waiter_clear,
    .tp_members = Waiter_members,
    .tp_getset = Waiter_getset,
};

static PyObject *waiter_class;

#define AS_WAITER(o) (is_core((o), &WaiterType, &waiter_class) ? (WaiterObject *)(o) : NULL)

/* -- PoolCore ---------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    char closing, debug, paused, reset_every_lease;
    long long max_waiting, wait_timeout_ns, max_pending, expiry_at;
    /* Lease counts noted and not yet added to the table (Pool._write_counters). */
    long long noted_leases, noted_waits, noted_wait_ns, noted_use_ns;
    PyObject *idle, *waiters, *states, *lagging, *flush_timer, *expiry, *last_connect_error,
        *noted_hist, *wait_bounds, *waiter_type;
} PoolObject;

#define POOL_FIELDS(X)                                                                             \
    X(idle) X(waiters) X(states) X(lagging) X(flush_timer) X(expiry) X(last_connect_error)         \
        X(noted_hist) X(wait_bounds) X(waiter_type)

static FieldSpec pool_specs[] = {
    {offsetof(PoolObject, idle), &PyList_Type, "idle"},
    {offsetof(PoolObject, waiters), NULL, "waiters"},
    {offsetof(PoolObject, states), &PyDict_Type, "_states"},
    {offsetof(PoolObject, lagging), &PySet_Type, "_lagging"},
    {offsetof(PoolObject, flush_timer), NULL, "_flush_timer"},
    {offsetof(PoolObject, expiry), NULL, "_expiry"},
    {offsetof(PoolObject, last_connect_error), NULL, "last_connect_error"},
    {offsetof(PoolObject, noted_hist), &PyList_Type, "_noted_hist"},
    {offsetof(PoolObject, wait_bounds), &PyTuple_Type, "_wait_bounds"},
    {offsetof(PoolObject, waiter_type), NULL, "_waiter_type"},
};

static PyGetSetDef Pool_getset[] = {
    FIELD_GETSET("idle", pool_specs[0]),
    FIELD_GETSET("waiters", pool_specs[1]),
    FIELD_GETSET("_states", pool_specs[2]),
    FIELD_GETSET("_lagging", pool_specs[3]),
    FIELD_GETSET("_flush_timer", pool_specs[4]),
    FIELD_GETSET("_expiry", pool_specs[5]),
    FIELD_GETSET("last_connect_error", pool_specs[6]),
    FIELD_GETSET("_noted_hist", pool_specs[7]),
    FIELD_GETSET("_wait_bounds", pool_specs[8]),
    FIELD_GETSET("_waiter_type", pool_specs[9]),
    {NULL},
};

static PyMemberDef Pool_members[] = {
    {"closing", T_BOOL, offsetof(PoolObject, closing), 0, NULL},
    {"_debug", T_BOOL, offsetof(PoolObject, debug), 0, NULL},
    {"paused", T_BOOL, offsetof(PoolObject, paused), 0, NULL},
    {"_reset_every_lease", T_BOOL, offsetof(PoolObject, reset_every_lease), 0, NULL},
    {"_max_waiting", T_LONGLONG, offsetof(PoolObject, max_waiting), 0, NULL},
    {"_wait_timeout_ns", T_LONGLONG, offsetof(PoolObject, wait_timeout_ns), 0, NULL},
    {"_max_pending", T_LONGLONG, offsetof(PoolObject, max_pending), 0, NULL},
    {"_expiry_at", T_LONGLONG, offsetof(PoolObject, expiry_at), 0, NULL},
    {"_noted_leases", T_LONGLONG, offsetof(PoolObject, noted_leases), 0, NULL},
    {"_noted_waits", T_LONGLONG, offsetof(PoolObject, noted_waits), 0, NULL},
    {"_noted_wait_ns", T_LONGLONG, offsetof(PoolObject, noted_wait_ns), 0, NULL},
    {"_noted_use_ns", T_LONGLONG, offsetof(PoolObject, noted_use_ns), 0, NULL},
    {NULL},
};

CORE_TYPE_FUNCS(Pool, PoolObject, POOL_FIELDS)

static PyObject *
Pool_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PoolObject *self = Pool_alloc(type);

    (void)args;
    (void)kwds;
    if (self == NULL)
        return NULL;
    /* (Pool.__init__ sets them all; these keep the types the C code relies on until then) */
    Py_SETREF(self->idle, PyList_New(0));
    Py_SETREF(self->states, PyDict_New());
    Py_SETREF(self->lagging, PySet_New(NULL));
    Py_SETREF(self->noted_hist, PyList_New(0));
    Py_SETREF(self->wait_bounds, PyTuple_New(0));
    if (self->idle == NULL || self->states == NULL || self->lagging == NULL ||
        self->noted_hist == NULL || self->wait_bounds == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgreuse.broker._proxycore.PoolCore",
    .tp_basicsize = sizeof(PoolObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The lending fields of pgreuse.broker.pool.Pool.",
    .tp_new = Pool_new,
    .tp_dealloc = (destructor)Pool_dealloc,
    .tp_free = PyObject_GC_Del,
    .tp_traverse = (traverseproc)Pool_traverse,
    .tp_clear = (inquiry)Pool_clear,
    .tp_members = Pool_members,
    .tp_getset = Pool_getset,
};

#define AS_POOL(o) (is_core((o), &PoolType, &pool_class) ? (PoolObject *)(o) : NULL)

#endif
