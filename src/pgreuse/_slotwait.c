/*
 * pgreuse._slots, the table's wait queue (_slotqueue.h) as methods of Slots: where a sync worker's
 * transaction waits for a backend when none is idle, and where the broker cancels waits.
 */
#include "_slotsobj.h"

/* hand_over(index, owned) -> holder: slot ``index`` (whose word the caller owns as ``owned``) goes
 * to the first worker waiting in the table (its holder id), else back to IDLE (0); -1 if the word
 * was not ``owned``. */
PyObject *
Slots_hand_over(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    unsigned long long owned;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "hand_over(index, owned)");
        return NULL;
    }
    i = PyLong_AsSsize_t(args[0]);
    owned = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred() || check(self, i) < 0)
        return NULL;
    return PyLong_FromLongLong(sq_hand_over(&self->t, i, owned));
}

/* enqueue(holder) -> ticket (>= 0), -1 (full: go through the proxy) or -2 (cancelled) */
PyObject *
Slots_enqueue(SlotsObject *self, PyObject *arg)
{
    unsigned long holder;
    if (worker_holder(self, arg, &holder) < 0)
        return NULL;
    return PyLong_FromLongLong(sq_enqueue(&self->t, (uint32_t)holder, sw_now_ns()));
}

/* rescue(holder): hand the idle slots to the first waiters (after enqueue) */
PyObject *
Slots_rescue(SlotsObject *self, PyObject *arg)
{
    unsigned long holder;
    if (worker_holder(self, arg, &holder) < 0)
        return NULL;
    sq_rescue(&self->t, (uint32_t)holder);
    Py_RETURN_NONE;
}

/* wait(ticket, holder, parking, pid, control_fd) -> (slot or a negative code, waited ns). Blocks
 * without the GIL until the ticket is granted, cancelled or times out (--wait-timeout from the
 * table). The winner writes its parking key, pid and lease start, and counts its wait; a timeout
 * is counted too. */
PyObject *
Slots_wait(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long holder, parking, pid;
    long long ticket;
    long control_fd;
    int64_t got, since, deadline, now;
    char *rec;

    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "wait(ticket, holder, parking, pid, control_fd)");
        return NULL;
    }
    if (worker_holder(self, args[1], &holder) < 0)
        return NULL;
    ticket = PyLong_AsLongLong(args[0]);
    parking = PyLong_AsUnsignedLong(args[2]);
    pid = PyLong_AsUnsignedLong(args[3]);
    control_fd = PyLong_AsLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (ticket < 0)
        return PyErr_Format(PyExc_ValueError, "ticket %lld is not a ticket", ticket);
    since = (int64_t)sw_load(sq_entry(&self->t, (uint64_t)ticket) + 1);
    deadline = since + (int64_t)sw_load(sq_q(&self->t, Q_TIMEOUT));
    Py_BEGIN_ALLOW_THREADS
    got = sq_wait(&self->t, (uint64_t)ticket, (uint32_t)holder, deadline, (int)control_fd);
    Py_END_ALLOW_THREADS
    now = sw_now_ns();
    if (got >= 0) {
        rec = record(self, (Py_ssize_t)got);
        *(uint32_t *)(rec + REC_PARKING) = (uint32_t)parking;
        *(uint32_t *)(rec + REC_HOLDER_PID) = (uint32_t)pid;
        *(int64_t *)(rec + REC_LEASE_START) = now;
        sw_add(word_at(self, self->leases_off + 8), 1);                         /* waits */
        sw_add(word_at(self, self->leases_off + 16), (uint64_t)(now - since)); /* wait_ns */
    } else if (got == SQ_TIMEOUT) {
        sw_add(word_at(self, self->leases_off + 32), 1); /* timeouts */
    }
    return Py_BuildValue("(LL)", (long long)got, (long long)(now - since));
}

/* take_lingering() -> 0 or 1: hand lingering slots whose holders did not come back within
 * LINGER_STEAL_NS to the table's first waiter, or back idle (the broker's janitor, for its own
 * waiters and a pause) */
PyObject *
Slots_take_lingering(SlotsObject *self, PyObject *unused)
{
    int64_t due = INT64_MAX;
    (void)unused;
    if (!self->has_view)
        return PyErr_Format(PyExc_ValueError, "the slot table is closed");
    return PyLong_FromLong(sq_take_lingering(&self->t, sw_now_ns(), &due));
}

/* cancel_waiters(holder) -> n: cancel (and wake) every waiter of the table (holder 0) or one
 * holder's */
PyObject *
Slots_cancel_waiters(SlotsObject *self, PyObject *arg)
{
    unsigned long holder = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (!self->has_view)
        return PyErr_Format(PyExc_ValueError, "the slot table is closed");
    return PyLong_FromLong(sq_cancel_all(&self->t, (uint32_t)holder));
}

/* waiting() -> n: workers waiting in the queue now, or about to (tickets taken, from the first
 * still waiting) */
PyObject *
Slots_waiting(SlotsObject *self, PyObject *unused)
{
    uint64_t head;
    if (!self->has_view)
        return PyErr_Format(PyExc_ValueError, "the slot table is closed");
    if (!sq_first(&self->t, &head))
        head = sw_load(sq_q(&self->t, Q_HEAD));
    return PyLong_FromUnsignedLongLong(sw_load(sq_q(&self->t, Q_TAIL)) - head);
}

/* skip(ticket) -> bool: the janitor's way past a ticket whose process died before publishing it */
PyObject *
Slots_skip(SlotsObject *self, PyObject *arg)
{
    unsigned long long ticket = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (!self->has_view)
        return PyErr_Format(PyExc_ValueError, "the slot table is closed");
    return PyBool_FromLong(sq_skip(&self->t, ticket));
}
