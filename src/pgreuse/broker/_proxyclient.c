/*
 * pgreuse.broker._proxycore, the client side (proxy_client.py's hot methods): the read callback of
 * the client's socket, which forwards whole ordinary messages to the backend (asking for a lease
 * first when the session holds none), and the sends to the backend (_forward, _flush_to_backend).
 */
#include "_proxycore.h"

#include "../wire/_scan.h"

/* Send ``data`` on ``fd`` and keep in ``rest`` what the socket does not take now (what
 * _forward and _reply do): 0, -1 with a Python error, or the errno of a failed send. */
int
pxc_send_rest(int fd, const unsigned char *data, Py_ssize_t n, PyObject *rest)
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
        r = call_py(pxc_py_forward, self, chunk);
        Py_DECREF(chunk);
        return r;
    }
    err = pxc_send_rest(self->bfd, data, n, self->to_backend);
    return err > 0 ? backend_failed_errno(self, "send failed", err) : err;
}

int
pxc_flush_to_backend(Session *self)
{
    PyObject *pending = self->to_backend;
    ssize_t sent;

    if (self->btls != Py_None)
        return call_py(pxc_py_flush_to_backend, self, NULL);
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

PyObject *
pxc_Session_client_readable(Session *self, PyObject *unused)
{
    const unsigned char *data = pxc_rbuf + STASH_ROOM;
    ssize_t n;
    long syncs, unsynced, first;
    int r;

    (void)unused;
    if (self->closed) /* (the reader is removed at close: never read a descriptor number reused) */
        Py_RETURN_NONE;
    n = recv(self->fd, pxc_rbuf + STASH_ROOM, RECV, 0);
    if (n < 0) {
        int err = errno;
        PyObject *exc;

        if (would_block(err))
            Py_RETURN_NONE;
        exc = os_error(err);
        if (exc == NULL)
            return NULL;
        r = call_py(pxc_py_client_failed, self, exc);
        Py_DECREF(exc);
        return r < 0 ? NULL : Py_NewRef(Py_None);
    }
    if (n == 0)
        return call_py(pxc_py_close, self, NULL) < 0 ? NULL : Py_NewRef(Py_None);
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
                 PyByteArray_GET_SIZE(self->to_backend) == 0 &&
                 pxc_lendable(self->pool, &r) != NULL) {
            /* A backend is lent at once (lend_idle): lease first, and the query goes from the
             * read buffer to it without a copy into _to_backend (the same bytes and the same
             * state as the append, lease and flush below). */
            r = pxc_lease(self);
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
                r = pxc_lease(self);
        }
        if (r < 0 || pxc_interest(self) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    {
        PyObject *chunk = PyBytes_FromStringAndSize((const char *)data, n);

        if (chunk == NULL)
            return NULL;
        r = call_py(pxc_py_client_slow, self, chunk);
        Py_DECREF(chunk);
    }
    return r < 0 ? NULL : Py_NewRef(Py_None);
}
