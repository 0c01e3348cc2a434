/*
 * BackendCore and PoolCore: the fields of pgreuse.broker.pool.Backend and Pool that the lending
 * fast path (_lending.h) and the C session read and write on every proxied transaction, as struct
 * members. Included by _proxycore.c.
 *
 * pool.py builds Backend and Pool on these bases when the C core runs, so the Python code reads and
 * writes the same fields through their descriptors and the C code reaches them without the
 * attribute machinery (a lookup in the type, then in the instance, per read: before this, that
 * machinery was about a tenth of the broker's CPU per transaction). The classes are plain Python
 * ones with PGREUSE_PURE_PYTHON=1. Nothing here has logic: these are fields, and Backend's
 * dispatch_readable, the loop's read callback for a backend socket (in Python a frame per read).
 */
#ifndef PGREUSE_POOLCORE_H
#define PGREUSE_POOLCORE_H

/* -- BackendCore ------------------------------------------------------------------------------- */

typedef struct {
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

static PyObject *
Backend_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    BackendObject *self = (BackendObject *)type->tp_alloc(type, 0);

    (void)args;
    (void)kwds;
    if (self == NULL)
        return NULL;
#define INIT_NONE(f) self->f = Py_NewRef(Py_None);
    BACKEND_FIELDS(INIT_NONE)
#undef INIT_NONE
    return (PyObject *)self;
}

static int
Backend_traverse(BackendObject *self, visitproc visit, void *arg)
{
#define VISIT(f) Py_VISIT(self->f);
    BACKEND_FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int
Backend_clear(BackendObject *self)
{
#define CLEAR(f) Py_CLEAR(self->f);
    BACKEND_FIELDS(CLEAR)
#undef CLEAR
    return 0;
}

static void
Backend_dealloc(BackendObject *self)
{
    PyTypeObject *type = Py_TYPE(self);

    PyObject_GC_UnTrack(self);
    Backend_clear(self);
    type->tp_free((PyObject *)self);
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
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgreuse._proxycore.BackendCore",
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

/* -- PoolCore ---------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    char closing, debug, paused, reset_every_lease;
    /* Unqueued leases and lent time counted and not yet added to the table (Pool.flush_table). */
    long long noted_leases, noted_use_ns;
    PyObject *idle, *waiters, *states, *lagging, *flush_timer;
} PoolObject;

#define POOL_FIELDS(X) X(idle) X(waiters) X(states) X(lagging) X(flush_timer)

static FieldSpec pool_specs[] = {
    {offsetof(PoolObject, idle), &PyList_Type, "idle"},
    {offsetof(PoolObject, waiters), NULL, "waiters"},
    {offsetof(PoolObject, states), &PyDict_Type, "_states"},
    {offsetof(PoolObject, lagging), &PySet_Type, "_lagging"},
    {offsetof(PoolObject, flush_timer), NULL, "_flush_timer"},
};

static PyGetSetDef Pool_getset[] = {
    FIELD_GETSET("idle", pool_specs[0]),
    FIELD_GETSET("waiters", pool_specs[1]),
    FIELD_GETSET("_states", pool_specs[2]),
    FIELD_GETSET("_lagging", pool_specs[3]),
    FIELD_GETSET("_flush_timer", pool_specs[4]),
    {NULL},
};

static PyMemberDef Pool_members[] = {
    {"closing", T_BOOL, offsetof(PoolObject, closing), 0, NULL},
    {"_debug", T_BOOL, offsetof(PoolObject, debug), 0, NULL},
    {"paused", T_BOOL, offsetof(PoolObject, paused), 0, NULL},
    {"_reset_every_lease", T_BOOL, offsetof(PoolObject, reset_every_lease), 0, NULL},
    {"_noted_leases", T_LONGLONG, offsetof(PoolObject, noted_leases), 0, NULL},
    {"_noted_use_ns", T_LONGLONG, offsetof(PoolObject, noted_use_ns), 0, NULL},
    {NULL},
};

static PyObject *
Pool_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PoolObject *self = (PoolObject *)type->tp_alloc(type, 0);

    (void)args;
    (void)kwds;
    if (self == NULL)
        return NULL;
    self->flush_timer = Py_NewRef(Py_None);
    self->waiters = Py_NewRef(Py_None);
    self->idle = PyList_New(0);
    self->states = PyDict_New();
    self->lagging = PySet_New(NULL);
    if (self->idle == NULL || self->states == NULL || self->lagging == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
Pool_traverse(PoolObject *self, visitproc visit, void *arg)
{
#define VISIT(f) Py_VISIT(self->f);
    POOL_FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int
Pool_clear(PoolObject *self)
{
#define CLEAR(f) Py_CLEAR(self->f);
    POOL_FIELDS(CLEAR)
#undef CLEAR
    return 0;
}

static void
Pool_dealloc(PoolObject *self)
{
    PyTypeObject *type = Py_TYPE(self);

    PyObject_GC_UnTrack(self);
    Pool_clear(self);
    type->tp_free((PyObject *)self);
}

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgreuse._proxycore.PoolCore",
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
