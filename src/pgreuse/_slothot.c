/*
 * pgreuse._slots.Hot: a connection's lease start and end in the usual case, in C.
 *
 * Why: a select 1 on a dedicated connection costs about 80 us on this project's test machine; the
 * Python of pgreuse.client.lease that claims a slot before it and gives it back after cost 10 us
 * more, most of it cache misses of the interpreter after each round trip. This file does the same
 * steps for the one case that matters for speed: a fresh idle slot, a clean end.
 *
 * It decides nothing on its own: every check below either lets the usual case through or hands the
 * statement to the Python path (LeaseCore._begin, _after_wait_done) unchanged, which is the
 * reference and handles everything else (state-only generators, telemetry, a slot not checked for
 * a while, the proxy, a dirty session, changed parameters, a broken backend, a failed dup2). The
 * differential test (tests/client/test_hot_path.py) runs the same scripts with and without it.
 *
 * Hot(slots, channel, pgconn, fd_number, home, parking, baseline, names, state_only, watched, check_after_ns)
 *   begin(conn, gen) -> LEASED (-2): claimed, swapped in, conn._held is this object;
 *                       NOTHING (-1): nothing done, the Python path starts from scratch;
 *                       i >= 0: slot i is claimed (not checked, not swapped): the Python path goes on
 *                       from there.
 *   adopt(conn, slot, generation, backend_pid, waited_ns, bucket): hold a lease the Python path
 *                       made (after a wait in the table, a check), so that its end runs here too.
 *   end(conn) -> True: nothing left to do (mid-transaction, or given back clean); False: the Python
 *                path settles the lease (nothing was done).
 * While it is conn._held, it carries the fields of pgreuse.client.held._Held.
 */
#include "_slothot.h"

#include <fcntl.h>
#include <unistd.h>


/* 1 if attribute ``name`` of ``obj`` is the int ``want``, 0 if not, -1 on error */
static int
attr_is(PyObject *obj, PyObject *name, long want)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    long x;

    if (v == NULL)
        return -1;
    x = PyLong_AsLong(v);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    return x == want;
}

/* 1 if ``gen`` is one of the generators that only look at the connection's state (the Python path
 * decides whether they need a backend), 0 if not, -1 on error */
static int
state_only_gen(HotObject *self, PyObject *gen)
{
    PyObject *code = PyObject_GetAttr(gen, s_gi_code), *name;
    int r;

    if (code == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    name = PyObject_GetAttr(code, s_co_name);
    Py_DECREF(code);
    if (name == NULL)
        return -1;
    r = PySet_Contains(self->state_only, name);
    Py_DECREF(name);
    return r;
}

/* 1 when the usual case may go on: the owning process, a live channel with nothing to send, a
 * connection whose status is OK, no telemetry to record; 0 when the Python path takes it. */
static int
may_begin(HotObject *self, PyObject *gen)
{
    PyObject *v;
    int r;

    if (hot_pid != self->owner_pid)
        return 0; /* the Python path raises WrongProcess */
    if ((r = state_only_gen(self, gen)) != 0)
        return r < 0 ? -1 : 0;
    if (!(v = PyObject_GetAttr(self->channel, s_dead)))
        return -1;
    r = v == Py_None;
    Py_DECREF(v);
    if (!r)
        return 0;
    if ((r = (int)PyObject_Length(self->outbox)) != 0)
        return r < 0 ? -1 : 0;
    if ((r = attr_is(self->pgconn, s_status, 0)) != 1)
        return r;
    if (!(v = PyObject_CallNoArgs(self->watched)))
        return -1;
    r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r < 0 ? -1 : !r;
}

static int
lock_call(HotObject *self, PyObject *method, PyObject *arg)
{
    PyObject *r = arg ? PyObject_CallMethodOneArg(self->lock, method, arg)
                      : PyObject_CallMethodNoArgs(self->lock, method);
    int t;

    if (r == NULL)
        return -1;
    t = r == Py_True;
    Py_DECREF(r);
    return t;
}

/* After a lease's end at ``now`` (0: not a clean end of this process's own; ``pending``: the
 * release's answer, see slots_give): this process gave the slot back lately
 * (claims.TableClaims._given_back), and the broker hears what it must (TableClaims._released: a
 * revoked slot, or the proxy's waiters). 0, or -1 on error. */
int
hot_released(HotObject *self, long long pending, int64_t now)
{
    PyObject *stamp, *res;

    if (now) {
        if (!(stamp = PyLong_FromLongLong(now)))
            return -1;
        if (PyList_SetItem(self->given_back, self->slot, stamp) < 0)
            return -1;
    }
    if (pending == 0)
        return 0;
    res = PyObject_CallMethod(self->channel, "_released", "nlL", self->slot, self->generation,
                              pending);
    Py_XDECREF(res);
    return res ? 0 : -1;
}

/* The claimed (or granted) slot ``got``'s socket ``fd`` onto libpq's fd number, with the channel's
 * lock held (released here): as claims.TableClaims._swap_in. Then this object holds the lease. */
static PyObject *
swap_in(HotObject *self, PyObject *conn, Py_ssize_t got, long fd, int64_t now, long long waited_ns)
{
    Py_ssize_t bucket = 0, nb = PyTuple_GET_SIZE(self->bounds);

    if (dup3((int)fd, (int)self->fd_number, O_CLOEXEC) < 0) {
        /* nothing was sent on it: it goes back as it was */
        int err = errno;
        long gen = PyLong_AsLong(PyList_GET_ITEM(self->claim_args[2], got));

        slots_release_lent(self->slots, got, SW_MAKE(SW_LENT, gen, self->holder), 0, 1, now);
        lock_call(self, s_release, NULL);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (lock_call(self, s_release, NULL) < 0)
        return NULL;
    /* bisect.bisect_left(WAIT_BOUNDS_NS, waited_ns), as LeaseCore._begin */
    while (waited_ns && bucket < nb && PyLong_AsLongLong(PyTuple_GET_ITEM(self->bounds, bucket)) < waited_ns)
        bucket++;
    self->slot = got;
    self->tenure = now;
    self->generation = PyLong_AsLong(PyList_GET_ITEM(self->full, got));
    self->backend_pid = PyLong_AsLong(PyList_GET_ITEM(self->pids, got));
    self->started = (double)now / 1e9; /* time.monotonic()'s clock */
    self->waited = (double)waited_ns / 1e9;
    self->bucket = bucket;
    self->watched_flag = 0;
    Py_SETREF(self->span, Py_NewRef(Py_None));
    if (PyErr_Occurred() || PyObject_SetAttr(conn, s_held, (PyObject *)self) < 0)
        return NULL;
    return PyLong_FromLong(HOT_LEASED);
}

/* Nothing idle: wait in the table's queue, as claims.TableClaims._wait_turn, for the usual outcome
 * (a slot whose fd this process has). Any other outcome of the wait goes back as its (got,
 * waited_ns) tuple, which the Python path goes on from; a full queue as NOTHING. */
static PyObject *
wait_turn(HotObject *self, PyObject *conn)
{
    PyObject *ticket, *r, *res, *wargs[5];
    Py_ssize_t got;
    long long waited_ns;
    long have, fd;
    int locked;

    if (!(ticket = Slots_enqueue(self->slots, self->claim_args[0])))
        return NULL;
    if (PyLong_AsLong(ticket) < 0) {
        Py_DECREF(ticket);
        return PyErr_Occurred() ? NULL : PyLong_FromLong(HOT_NOTHING); /* full: the proxy */
    }
    r = Slots_rescue(self->slots, self->claim_args[0]); /* a slot freed as the ticket was published */
    if (r != NULL) {
        Py_DECREF(r);
        r = PyObject_CallMethodNoArgs(self->channel, s_poke_if_room);
    }
    if (r == NULL) {
        Py_DECREF(ticket);
        return NULL;
    }
    Py_DECREF(r);
    wargs[0] = ticket;
    wargs[1] = self->claim_args[0];
    wargs[2] = self->claim_args[3];
    wargs[3] = self->claim_args[4];
    wargs[4] = self->control_fd_obj;
    res = Slots_wait(self->slots, wargs, 5); /* (without the GIL) */
    Py_DECREF(ticket);
    if (res == NULL)
        return NULL;
    got = PyLong_AsSsize_t(PyTuple_GET_ITEM(res, 0));
    waited_ns = PyLong_AsLongLong(PyTuple_GET_ITEM(res, 1));
    if (PyErr_Occurred()) {
        Py_DECREF(res);
        return NULL;
    }
    if (got < 0)
        return res; /* a timeout, the control channel, a cancel: the Python path's */
    if ((locked = lock_call(self, s_acquire, NULL)) != 1) {
        Py_DECREF(res);
        return locked < 0 ? NULL : PyErr_Format(PyExc_RuntimeError, "the channel lock refused");
    }
    have = PyLong_AsLong(PyList_GET_ITEM(self->claim_args[2], got));
    fd = PyLong_AsLong(PyList_GET_ITEM(self->fds, got));
    if (PyErr_Occurred() || have != (long)SW_GEN(sw_load(sq_word(&self->slots->t, got)))) {
        /* a backend newer than the fd this process holds: the Python path passes it on */
        lock_call(self, s_release, NULL);
        return PyErr_Occurred() ? (Py_DECREF(res), NULL) : res;
    }
    Py_DECREF(res);
    return swap_in(self, conn, got, fd, sw_now_ns(), waited_ns);
}

PyObject *
Hot_begin(HotObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *got_obj, *conn;
    Py_ssize_t got;
    long fd;
    long long given_back;
    int64_t now;
    int r;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "begin(conn, gen)");
        return NULL;
    }
    conn = args[0];
    if (!self->slots->has_view)
        return PyLong_FromLong(HOT_NOTHING); /* (the table was closed: nothing to read there) */
    self->gap = sw_now_ns() - self->last_end; /* (the application's time between two leases) */
    r = may_begin(self, args[1]);
    if (self->lingering) {
        if (r == 1) {
            PyObject *resumed = hot_resume(self, conn);
            if (resumed == NULL || PyLong_AsLong(resumed) == HOT_LEASED)
                return resumed;
            Py_DECREF(resumed);
        } else if (hot_released(self, hot_unlinger(self), 0) < 0) {
            return NULL;
        }
    }
    if (r != 1)
        return r < 0 ? NULL : PyLong_FromLong(HOT_NOTHING);
    /* the channel's lock guards its fd cache against a read of a newer fd in another thread: never
     * wait for it here (that thread may be in recvmsg), the Python path does */
    if ((r = lock_call(self, s_acquire, Py_False)) != 1)
        return r < 0 ? NULL : PyLong_FromLong(HOT_NOTHING);
    got_obj = Slots_claim(self->slots, self->claim_args, 5);
    if (got_obj == NULL)
        goto fail;
    got = PyLong_AsSsize_t(got_obj);
    Py_DECREF(got_obj);
    if (got < 0) {
        if (PyErr_Occurred())
            goto fail;
        if (lock_call(self, s_release, NULL) < 0)
            return NULL;
        if (got == -1 && self->waits)
            return wait_turn(self, conn); /* nothing idle, or workers wait: queue behind them */
        return PyLong_FromLong(HOT_NOTHING); /* the proxy's waiters first, an fd to read... */
    }
    now = sw_now_ns();
    given_back = PyLong_AsLongLong(PyList_GET_ITEM(self->given_back, got));
    fd = PyLong_AsLong(PyList_GET_ITEM(self->fds, got));
    if (PyErr_Occurred())
        goto fail;
    if (now - given_back >= self->check_after_ns) {
        /* not given back by this process lately: the Python path checks it first */
        if (lock_call(self, s_release, NULL) < 0)
            return NULL;
        return PyLong_FromSsize_t(got);
    }
    return swap_in(self, conn, got, fd, now, 0);
fail:
    lock_call(self, s_release, NULL);
    return NULL;
}

/* adopt(conn, slot, generation, backend_pid, waited_ns, bucket) -> True: a lease the Python path
 * made (after a wait in the table, or a check of a slot not used lately) is held by this object from
 * now on, so that its clean end runs here too. */
PyObject *
Hot_adopt(HotObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long waited_ns;

    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "adopt(conn, slot, generation, backend_pid, waited_ns, bucket)");
        return NULL;
    }
    self->slot = PyLong_AsSsize_t(args[1]);
    self->generation = PyLong_AsLong(args[2]);
    self->backend_pid = PyLong_AsLong(args[3]);
    waited_ns = PyLong_AsLongLong(args[4]);
    self->bucket = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (self->slot < 0 || self->slot >= self->slots->n || self->bucket < 0 ||
        self->bucket >= N_BUCKETS)
        return PyErr_Format(PyExc_ValueError, "adopt: slot %zd or bucket %zd out of range",
                            self->slot, self->bucket);
    self->started = (double)sw_now_ns() / 1e9;
    self->waited = (double)waited_ns / 1e9;
    self->watched_flag = 0;
    Py_SETREF(self->span, Py_NewRef(Py_None));
    if (PyObject_SetAttr(args[0], s_held, (PyObject *)self) < 0)
        return NULL;
    Py_RETURN_TRUE;
}

/* 1 if every reported parameter is what it was when the connection opened, 0 if not, -1 on error */
static int
parameters_unchanged(HotObject *self)
{
    Py_ssize_t n = PyTuple_GET_SIZE(self->names);

    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *v = PyObject_CallMethodOneArg(self->pgconn, s_parameter_status,
                                                PyTuple_GET_ITEM(self->names, k));
        int eq;

        if (v == NULL)
            return -1;
        eq = PyObject_RichCompareBool(v, PyTuple_GET_ITEM(self->baseline, k), Py_EQ);
        Py_DECREF(v);
        if (eq != 1)
            return eq;
    }
    return 1;
}

PyObject *
Hot_end(HotObject *self, PyObject *conn)
{
    PyObject *held, *v;
    int64_t now;
    int r;

    if (!(held = PyObject_GetAttr(conn, s_held)))
        return NULL;
    Py_DECREF(held);
    if (held != (PyObject *)self || hot_pid != self->owner_pid || !self->slots->has_view)
        Py_RETURN_FALSE; /* the Python path's lease, or a transaction through the proxy */
    if ((r = attr_is(self->pgconn, s_status, 0)) != 1)
        return r < 0 ? NULL : Py_NewRef(Py_False);
    if ((r = attr_is(self->pgconn, s_txn_status, 0)) != 1)
        return r < 0 ? NULL : Py_NewRef(Py_True); /* mid-transaction: the backend stays */
    if ((r = attr_is(self->pgconn, s_pipeline_status, 0)) != 1)
        return r < 0 ? NULL : Py_NewRef(Py_True);
    if ((r = parameters_unchanged(self)) != 1)
        return r < 0 ? NULL : Py_NewRef(Py_False); /* parameters to put back first */
    if (!(v = PyObject_GetAttr(conn, s_session_dirty)))
        return NULL;
    r = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (r != 0)
        return r < 0 ? NULL : Py_NewRef(Py_False); /* the broker resets it: the Python path says so */
    if (dup3((int)self->home, (int)self->fd_number, O_CLOEXEC) < 0)
        Py_RETURN_FALSE; /* the Python path tries again and reports the backend if it fails too */
    if (PyObject_SetAttr(conn, s_held, Py_None) < 0)
        return NULL;
    now = sw_now_ns();
    self->last_end = now;
    if ((r = hot_linger(self, now)) != 0)
        return r < 0 ? NULL : Py_NewRef(Py_True); /* kept for the next transaction */
    if (hot_released(self, slots_release_lent(self->slots, self->slot, hot_lent(self), self->bucket,
                                              1, now),
                     now) < 0)
        return NULL;
    Py_RETURN_TRUE;
}
