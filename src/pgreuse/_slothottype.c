/*
 * pgreuse._slots.Hot, the type: its fields, __init__ (what it caches of the connection and its
 * channel), garbage collection, and the process id it compares with across fork(). What it does is
 * in _slothot.c.
 */
#include "_slothot.h"

#include <pthread.h>
#include <structmember.h>
#include <unistd.h>

long hot_pid;

static void
after_fork_child(void)
{
    hot_pid = (long)getpid();
}

PyObject *s_dead, *s_outbox, *s_lock, *s_holder, *s_start, *s_gens, *s_pid, *s_fds, *s_full,
    *s_pids, *s_given_back, *s_sock, *s_fileno, *s_gi_code, *s_co_name, *s_status, *s_txn_status,
    *s_pipeline_status, *s_parameter_status, *s_acquire, *s_release, *s_held, *s_session_dirty,
    *s_released, *s_poke_if_room, *s_waits_in_table;

static int
Hot_traverse(HotObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->slots);
    Py_VISIT(self->channel);
    Py_VISIT(self->outbox);
    Py_VISIT(self->lock);
    Py_VISIT(self->pgconn);
    for (int k = 0; k < 5; k++)
        Py_VISIT(self->claim_args[k]);
    Py_VISIT(self->fds);
    Py_VISIT(self->full);
    Py_VISIT(self->pids);
    Py_VISIT(self->given_back);
    Py_VISIT(self->baseline);
    Py_VISIT(self->names);
    Py_VISIT(self->state_only);
    Py_VISIT(self->watched);
    Py_VISIT(self->span);
    Py_VISIT(self->control_fd_obj);
    Py_VISIT(self->bounds);
    return 0;
}

static int
Hot_clear(HotObject *self)
{
    Py_CLEAR(self->slots);
    Py_CLEAR(self->channel);
    Py_CLEAR(self->outbox);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->pgconn);
    for (int k = 0; k < 5; k++)
        Py_CLEAR(self->claim_args[k]);
    Py_CLEAR(self->fds);
    Py_CLEAR(self->full);
    Py_CLEAR(self->pids);
    Py_CLEAR(self->given_back);
    Py_CLEAR(self->baseline);
    Py_CLEAR(self->names);
    Py_CLEAR(self->state_only);
    Py_CLEAR(self->watched);
    Py_CLEAR(self->span);
    Py_CLEAR(self->control_fd_obj);
    Py_CLEAR(self->bounds);
    return 0;
}

static void
Hot_dealloc(HotObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->slots != NULL)
        hot_unlinger(self); /* (the broker's janitor pokes its waiters if need be) */
    Hot_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject *slots_type;

static int
Hot_init(HotObject *self, PyObject *args, PyObject *Py_UNUSED(kwds))
{
    PyObject *slots, *channel, *pgconn, *baseline, *names, *state_only, *watched, *sock = NULL;
    PyObject *parking, *fileno = NULL, *bounds, *waits;
    long fd_number, home;
    long long check_after;

    if (!PyArg_ParseTuple(args, "O!OOllOO!O!O!OLO!", slots_type, &slots, &channel, &pgconn,
                          &fd_number, &home, &parking, &PyTuple_Type, &baseline, &PyTuple_Type,
                          &names, &PyFrozenSet_Type, &state_only, &watched, &check_after,
                          &PyTuple_Type, &bounds))
        return -1;
    if (PyTuple_GET_SIZE(baseline) != PyTuple_GET_SIZE(names)) {
        PyErr_SetString(PyExc_ValueError, "Hot: baseline and names differ in length");
        return -1;
    }
    Hot_clear(self);
    self->slots = (SlotsObject *)Py_NewRef(slots);
    self->channel = Py_NewRef(channel);
    self->pgconn = Py_NewRef(pgconn);
    self->baseline = Py_NewRef(baseline);
    self->names = Py_NewRef(names);
    self->state_only = Py_NewRef(state_only);
    self->watched = Py_NewRef(watched);
    self->span = Py_NewRef(Py_None);
    self->home = home;
    self->check_after_ns = check_after;
    self->owner_pid = hot_pid;
    self->slot = -1;
    if (!(self->outbox = PyObject_GetAttr(channel, s_outbox)) ||
        !(self->lock = PyObject_GetAttr(channel, s_lock)) ||
        !(self->claim_args[0] = PyObject_GetAttr(channel, s_holder)) ||
        !(self->claim_args[1] = PyObject_GetAttr(channel, s_start)) ||
        !(self->claim_args[2] = PyObject_GetAttr(channel, s_gens)) ||
        !(self->claim_args[4] = PyObject_GetAttr(channel, s_pid)) ||
        !(self->fds = PyObject_GetAttr(channel, s_fds)) ||
        !(self->full = PyObject_GetAttr(channel, s_full)) ||
        !(self->pids = PyObject_GetAttr(channel, s_pids)) ||
        !(self->given_back = PyObject_GetAttr(channel, s_given_back)) ||
        !(sock = PyObject_GetAttr(channel, s_sock)) ||
        !(fileno = PyObject_CallMethodNoArgs(sock, s_fileno))) {
        Py_XDECREF(sock);
        return -1;
    }
    self->claim_args[3] = Py_NewRef(parking);
    self->holder = (uint32_t)PyLong_AsUnsignedLong(self->claim_args[0]);
    if (PyErr_Occurred())
        return -1;
    self->bounds = Py_NewRef(bounds);
    if (!(waits = PyObject_GetAttr(channel, s_waits_in_table)))
        return -1;
    self->waits = PyObject_IsTrue(waits);
    Py_DECREF(waits);
    if (self->waits < 0)
        return -1;
    self->control_fd = PyLong_AsLong(fileno);
    self->control_fd_obj = Py_NewRef(fileno);
    self->fd_number = fd_number;
    Py_DECREF(fileno);
    Py_DECREF(sock);
    if (PyErr_Occurred())
        return -1;
    if (!PyList_Check(self->claim_args[2]) || !PyList_Check(self->fds) ||
        !PyList_Check(self->full) || !PyList_Check(self->pids) || !PyList_Check(self->given_back)) {
        PyErr_SetString(PyExc_TypeError, "Hot: the channel's per-slot caches must be lists");
        return -1;
    }
    return 0;
}

static PyMethodDef Hot_methods[] = {
    {"begin", (PyCFunction)(void (*)(void))Hot_begin, METH_FASTCALL, NULL},
    {"adopt", (PyCFunction)(void (*)(void))Hot_adopt, METH_FASTCALL, NULL},
    {"end", (PyCFunction)Hot_end, METH_O, NULL},
    {"unlinger", (PyCFunction)Hot_unlinger, METH_NOARGS, NULL},
    {NULL},
};

static PyMemberDef Hot_members[] = {
    {"slot", T_PYSSIZET, offsetof(HotObject, slot), 0, NULL},
    {"generation", T_LONG, offsetof(HotObject, generation), 0, NULL},
    {"backend_pid", T_LONG, offsetof(HotObject, backend_pid), 0, NULL},
    {"started", T_DOUBLE, offsetof(HotObject, started), 0, NULL},
    {"fd_number", T_LONG, offsetof(HotObject, fd_number), 0, NULL},
    {"waited", T_DOUBLE, offsetof(HotObject, waited), 0, NULL},
    {"bucket", T_PYSSIZET, offsetof(HotObject, bucket), 0, NULL},
    {"watched", T_BOOL, offsetof(HotObject, watched_flag), 0, NULL},
    {"span", T_OBJECT, offsetof(HotObject, span), 0, NULL},
    {"lingering", T_INT, offsetof(HotObject, lingering), READONLY,
     "the slot is kept for this connection's next transaction"},
    {NULL},
};

static PyTypeObject HotType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgreuse._slots.Hot",
    .tp_basicsize = sizeof(HotObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A connection's lease start and end in the usual case.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Hot_init,
    .tp_dealloc = (destructor)Hot_dealloc,
    .tp_traverse = (traverseproc)Hot_traverse,
    .tp_clear = (inquiry)Hot_clear,
    .tp_methods = Hot_methods,
    .tp_members = Hot_members,
};

int
hot_add_type(PyObject *module, PyTypeObject *slots)
{
    static const char *names[] = {
        "_dead", "_outbox", "_lock", "holder", "_start", "_gens", "pid", "_fds", "_full", "_pids",
        "_given_back", "sock", "fileno", "gi_code", "co_name", "status", "transaction_status",
        "pipeline_status", "parameter_status", "acquire", "release", "_held", "_session_dirty",
        "_released", "_poke_if_room", "waits_in_table",
    };
    PyObject **slots_for[] = {
        &s_dead, &s_outbox, &s_lock, &s_holder, &s_start, &s_gens, &s_pid, &s_fds, &s_full,
        &s_pids, &s_given_back, &s_sock, &s_fileno, &s_gi_code, &s_co_name, &s_status,
        &s_txn_status, &s_pipeline_status, &s_parameter_status, &s_acquire, &s_release, &s_held,
        &s_session_dirty, &s_released, &s_poke_if_room, &s_waits_in_table,
    };

    for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++)
        if (!(*slots_for[k] = PyUnicode_InternFromString(names[k])))
            return -1;
    slots_type = slots;
    hot_pid = (long)getpid();
    if (pthread_atfork(NULL, NULL, after_fork_child) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
        return -1;
    }
    if (PyType_Ready(&HotType) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "HOT_LEASED", HOT_LEASED) < 0 ||
        PyModule_AddIntConstant(module, "HOT_NOTHING", HOT_NOTHING) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "Hot", (PyObject *)&HotType);
}
