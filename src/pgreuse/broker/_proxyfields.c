/*
 * pgreuse.broker._proxycore, the types and their fields (proxy_fields.py's part): ProxyCounters,
 * the totals every session adds to, and SessionCore, its fields as struct members and getsets, its
 * allocation and garbage collection, and its methods table (the methods are in the other files).
 * The getter and setter here serve the pool's types too (_poolcore.h).
 */
#include "_proxycore.h"

/* -- ProxyCounters: the totals of pgreuse.broker.proxy.PyProxyStats, as plain integers ---------- */

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

PyTypeObject pxc_CountersType = {
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

PyObject *
pxc_field_get(PyObject *self, void *closure)
{
    FieldSpec *f = closure;
    PyObject *v = *(PyObject **)((char *)self + f->offset);

    if (v == NULL) { /* only after tp_clear */
        PyErr_SetString(PyExc_AttributeError, f->name);
        return NULL;
    }
    return Py_NewRef(v);
}

int
pxc_field_set(PyObject *self, PyObject *value, void *closure)
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
    {offsetof(Session, stats), &pxc_CountersType, "stats"},
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
    Py_SETREF(self->c_stash, Py_NewRef(pxc_empty_bytes));
    Py_SETREF(self->b_stash, Py_NewRef(pxc_empty_bytes));
    Py_SETREF(self->to_backend, PyByteArray_FromStringAndSize(NULL, 0));
    Py_SETREF(self->to_client, PyByteArray_FromStringAndSize(NULL, 0));
    self->stats = (Counters *)PyObject_CallNoArgs((PyObject *)&pxc_CountersType);
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

static PyMethodDef Session_methods[] = {
    {"_client_readable", (PyCFunction)pxc_Session_client_readable, METH_NOARGS, NULL},
    {"_backend_readable", (PyCFunction)pxc_Session_backend_readable, METH_NOARGS, NULL},
    {"_interest", (PyCFunction)pxc_Session_interest, METH_NOARGS, NULL},
    {"_idle", (PyCFunction)pxc_Session_idle, METH_NOARGS, NULL},
    {"_lease", (PyCFunction)pxc_Session_lease, METH_NOARGS, NULL},
    {"granted", (PyCFunction)(void (*)(void))pxc_Session_granted, METH_FASTCALL, NULL},
    {NULL},
};

PyTypeObject pxc_SessionType = {
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
