/*
 * pgreuse._slots: the slot words of a mapped shared-memory table (see _slotword.h), for workers
 * (claim and release a backend with one compare-and-swap) and the broker (share, take back, revoke).
 *
 * Slots(table_buffer, slots_off, slot_size, n, pending_off, leases_off, use_ns_off, hist0_off,
 * queue_off)
 * keeps the table's buffer exported (the mmap cannot be closed or resized under it) until close().
 * The Python reference of what is not a bare atomic is pgreuse.slots.PySlots; the differential test
 * (tests/test_slots.py) runs both on the same scripts.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_slotsobj.h"

static int
Slots_init(SlotsObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *buf;
    Py_ssize_t need;

    if (!PyArg_ParseTuple(args, "Onnnnnnnn", &buf, &self->slots_off, &self->slot_size, &self->n,
                          &self->pending_off, &self->leases_off, &self->use_ns_off,
                          &self->hist0_off, &self->queue_off))
        return -1;
    if (self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "Slots is already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE) < 0)
        return -1;
    self->has_view = 1;
    self->base = self->view.buf;
    need = self->slots_off + self->n * self->slot_size;
    if (self->queue_off < need)
        need = -1;
    else
        need = self->queue_off + Q_BYTES;
    if (self->n < 0 || self->slot_size < 40 || need < 0 || self->view.len < need ||
        ((uintptr_t)self->base | (uintptr_t)self->slots_off | (uintptr_t)self->slot_size |
         (uintptr_t)self->pending_off | (uintptr_t)self->leases_off | (uintptr_t)self->use_ns_off |
         (uintptr_t)self->hist0_off | (uintptr_t)self->queue_off) % 8) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
        PyErr_Format(PyExc_ValueError,
                     "a table of %zd bytes cannot hold %zd slots of %zd bytes at offset %zd and "
                     "its wait queue at %zd (or an offset is not 8-aligned)",
                     self->view.len, self->n, self->slot_size, self->slots_off, self->queue_off);
        return -1;
    }
    self->t.base = self->base;
    self->t.slots_off = self->slots_off;
    self->t.slot_size = self->slot_size;
    self->t.n = self->n;
    self->t.pending_off = self->pending_off;
    self->t.queue_off = self->queue_off;
    return 0;
}

static void
Slots_dealloc(SlotsObject *self)
{
    if (self->has_view)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Slots_close(SlotsObject *self, PyObject *unused)
{
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *
Slots_load(SlotsObject *self, PyObject *arg)
{
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if ((i == -1 && PyErr_Occurred()) || check(self, i) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(sw_load(word_at(self, self->slots_off + i * self->slot_size)));
}

static PyObject *
Slots_cas(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    unsigned long long expected, desired;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "cas(index, expected, desired)");
        return NULL;
    }
    i = PyLong_AsSsize_t(args[0]);
    if ((i == -1 && PyErr_Occurred()) || check(self, i) < 0)
        return NULL;
    expected = PyLong_AsUnsignedLongLong(args[1]);
    desired = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(
        sw_cas(word_at(self, self->slots_off + i * self->slot_size), expected, desired));
}

static PyObject *
Slots_store(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    unsigned long long value;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "store(index, value)");
        return NULL;
    }
    i = PyLong_AsSsize_t(args[0]);
    if ((i == -1 && PyErr_Occurred()) || check(self, i) < 0)
        return NULL;
    value = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    sw_store(word_at(self, self->slots_off + i * self->slot_size), value);
    Py_RETURN_NONE;
}

static PyObject *
Slots_pending(SlotsObject *self, PyObject *unused)
{
    if (!self->has_view)
        return PyErr_Format(PyExc_ValueError, "the slot table is closed");
    return PyLong_FromUnsignedLongLong(sw_load(word_at(self, self->pending_off)));
}

static PyObject *
Slots_set_pending(SlotsObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (!self->has_view)
        return PyErr_Format(PyExc_ValueError, "the slot table is closed");
    sw_store(word_at(self, self->pending_off), (uint64_t)(n > 0 ? n : 0));
    Py_RETURN_NONE;
}

static PyObject *
Slots_add(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off;
    unsigned long long n;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add(offset, n)");
        return NULL;
    }
    off = PyLong_AsSsize_t(args[0]);
    n = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    if (!self->has_view || off < 0 || off % 8 || off + 8 > self->view.len)
        return PyErr_Format(PyExc_ValueError, "no counter at offset %zd", off);
    sw_add(word_at(self, off), n);
    Py_RETURN_NONE;
}

/* claim(holder, start, generations, parking, pid): take an IDLE slot nobody holds whose generation
 * this process has the fd of (generations[i]: that generation's low 24 bits, or -1), starting the
 * scan at ``start``. Returns the slot index; -1 if no slot is idle or workers wait in the table's
 * queue (the caller queues behind them); -2 if the proxy has waiters (they go first); -3 - i if
 * slot i is idle but its fd is missing here (and no other could be claimed). The winner writes the
 * parking key it serves and its lease start into the record. */
PyObject *
Slots_claim(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long holder, parking, pid;
    Py_ssize_t start, k, missing = -1;
    uint64_t ticket;
    PyObject *gens;

    if (nargs != 5 || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "claim(holder, start, generations: list, parking, pid)");
        return NULL;
    }
    if (worker_holder(self, args[0], &holder) < 0)
        return NULL;
    start = PyLong_AsSsize_t(args[1]);
    parking = PyLong_AsUnsignedLong(args[3]);
    pid = PyLong_AsUnsignedLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    gens = args[2];
    if (PyList_GET_SIZE(gens) < self->n)
        return PyErr_Format(PyExc_ValueError, "generations has %zd entries, the table %zd slots",
                            PyList_GET_SIZE(gens), self->n);
    if (sw_load(word_at(self, self->pending_off)) != 0)
        return PyLong_FromLong(-2);
    if (sq_first(&self->t, &ticket))
        return PyLong_FromLong(-1);
    for (k = 0; k < self->n; k++) {
        Py_ssize_t i = (start + k) % self->n;
        char *rec = record(self, i);
        uint64_t w = sw_load((uint64_t *)(rec + REC_WORD));
        long have;

        if (SW_STATE(w) != SW_IDLE || SW_HOLDER(w) != 0)
            continue;
        have = PyLong_AsLong(PyList_GET_ITEM(gens, i));
        if (have == -1 && PyErr_Occurred())
            return NULL;
        if (have != (long)SW_GEN(w)) {
            if (missing < 0)
                missing = i;
            continue;
        }
        if (!sw_cas((uint64_t *)(rec + REC_WORD), w, SW_MAKE(SW_LENT, SW_GEN(w), holder)))
            continue; /* someone else won it: try the next */
        *(uint32_t *)(rec + REC_PARKING) = (uint32_t)parking;
        *(uint32_t *)(rec + REC_HOLDER_PID) = (uint32_t)pid;
        *(int64_t *)(rec + REC_LEASE_START) = sw_now_ns();
        return PyLong_FromSsize_t(i);
    }
    return PyLong_FromSsize_t(missing < 0 ? -1 : -3 - missing);
}

/* release(index, holder, generation, bucket): the holder gives a clean slot back. Counts the lease
 * in the record and the pool's counters (its wait in histogram bucket ``bucket``), clears the
 * holder's fields, then hands the slot to the first worker waiting in the table, or CASes it back to
 * IDLE(0) when nobody waits there or the proxy's oldest waiter came first. Returns the proxy's queue
 * length when the slot went idle while the proxy has waiters (the caller pokes the broker), 0 when
 * it is idle or granted, -1 when the slot was no longer this holder's (the broker revoked it). */
PyObject *
Slots_release(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i, bucket;
    unsigned long holder, gen;

    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "release(index, holder, generation, bucket)");
        return NULL;
    }
    i = PyLong_AsSsize_t(args[0]);
    holder = PyLong_AsUnsignedLong(args[1]);
    gen = PyLong_AsUnsignedLong(args[2]);
    bucket = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred() || check(self, i) < 0)
        return NULL;
    if (bucket < 0 || bucket >= N_BUCKETS)
        return PyErr_Format(PyExc_ValueError, "histogram bucket %zd does not exist", bucket);
    return PyLong_FromLongLong(
        slots_release_lent(self, i, SW_MAKE(SW_LENT, gen, holder), bucket, 1, sw_now_ns()));
}

/* check(backend_fd, control_fd) -> int: one poll() with no wait, before a claimed backend is used.
 * Bit 1: the backend's peer hung up, or something waits to be read on it (PostgreSQL ended the
 * session while it idled in the table, or sent a FATAL before it did): not fit to lend. Bit 2: the
 * control channel has something to read (an fd the broker pushed, or its end: the broker died). */
PyObject *
check_fds(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct pollfd p[2];
    long fd, ctl;
    int n, r = 0;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "check(backend_fd, control_fd)");
        return NULL;
    }
    fd = PyLong_AsLong(args[0]);
    ctl = PyLong_AsLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    p[0].fd = (int)fd;
    p[0].events = POLLIN | POLLRDHUP;
    p[1].fd = (int)ctl;
    p[1].events = POLLIN;
    p[0].revents = p[1].revents = 0;
    n = poll(p, 2, 0);
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (p[0].revents)
        r |= 1;
    if (p[1].revents)
        r |= 2;
    return PyLong_FromLong(r);
}

static PyMethodDef module_methods[] = {
    {"check", (PyCFunction)(void (*)(void))check_fds, METH_FASTCALL,
     "check(backend_fd, control_fd) -> int: 1 the backend hung up or has data, 2 the control "
     "channel has data (both may be set)."},
    {NULL},
};

static PyMethodDef Slots_methods[] = {
    {"load", (PyCFunction)Slots_load, METH_O, "The slot word of slot i."},
    {"cas", (PyCFunction)(void (*)(void))Slots_cas, METH_FASTCALL,
     "cas(i, expected, desired) -> bool: compare-and-swap slot i's word."},
    {"store", (PyCFunction)(void (*)(void))Slots_store, METH_FASTCALL,
     "store(i, value): set a word the caller owns."},
    {"pending", (PyCFunction)Slots_pending, METH_NOARGS, "Requests queued in the proxy now."},
    {"set_pending", (PyCFunction)Slots_set_pending, METH_O, "Publish the proxy's queue length."},
    {"add", (PyCFunction)(void (*)(void))Slots_add, METH_FASTCALL,
     "add(offset, n): atomically add n to the counter at byte offset."},
    {"claim", (PyCFunction)(void (*)(void))Slots_claim, METH_FASTCALL, NULL},
    {"release", (PyCFunction)(void (*)(void))Slots_release, METH_FASTCALL, NULL},
    {"hand_over", (PyCFunction)(void (*)(void))Slots_hand_over, METH_FASTCALL, NULL},
    {"enqueue", (PyCFunction)Slots_enqueue, METH_O, NULL},
    {"rescue", (PyCFunction)Slots_rescue, METH_O, NULL},
    {"take_lingering", (PyCFunction)Slots_take_lingering, METH_NOARGS, NULL},
    {"wait", (PyCFunction)(void (*)(void))Slots_wait, METH_FASTCALL, NULL},
    {"cancel_waiters", (PyCFunction)Slots_cancel_waiters, METH_O, NULL},
    {"skip", (PyCFunction)Slots_skip, METH_O, NULL},
    {"waiting", (PyCFunction)Slots_waiting, METH_NOARGS, NULL},
    {"close", (PyCFunction)Slots_close, METH_NOARGS, "Release the table's buffer."},
    {NULL},
};

static PyTypeObject SlotsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgreuse._slots.Slots",
    .tp_basicsize = sizeof(SlotsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The slot words of a mapped pgreuse table.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Slots_init,
    .tp_dealloc = (destructor)Slots_dealloc,
    .tp_methods = Slots_methods,
};

static struct PyModuleDef slots_module = {
    PyModuleDef_HEAD_INIT, "pgreuse._slots", "Slot words of the shared-memory table (C).", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__slots(void)
{
    PyObject *m;

    if (PyType_Ready(&SlotsType) < 0)
        return NULL;
    m = PyModule_Create(&slots_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Slots", (PyObject *)&SlotsType) < 0 ||
        hot_add_type(m, &SlotsType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
