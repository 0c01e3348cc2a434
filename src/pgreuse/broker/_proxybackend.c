/*
 * pgreuse.broker._proxycore, the backend side (proxy_backend.py's hot methods): the read callback
 * of the backend's socket, which forwards the answer to the client, scans its headers, and at
 * ReadyForQuery 'I' gives the backend back (the clean give-back is in _proxycore.c, with the pool's
 * part of it).
 */
#include "_proxycore.h"

#include "../wire/_scan.h"

/* _reply for a chunk of the shared read buffer. */
static int
reply(Session *self, const unsigned char *data, Py_ssize_t n)
{
    int err;

    self->stats->sent += n;
    if (PyByteArray_GET_SIZE(self->to_client))
        return append(self->to_client, data, n);
    err = pxc_send_rest(self->fd, data, n, self->to_client);
    return err > 0 ? 0 : err; /* a failed send: the client is gone, its EOF comes to the reader */
}

/* _scan_backend over the n bytes just read at pxc_rbuf + STASH_ROOM. */
static int
scan_backend(Session *self, Py_ssize_t n)
{
    unsigned char *data = pxc_rbuf + STASH_ROOM;
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
        Py_SETREF(self->b_stash, Py_NewRef(pxc_empty_bytes));
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

PyObject *
pxc_Session_backend_readable(Session *self, PyObject *unused)
{
    ssize_t n;
    int r;

    (void)unused;
    if (self->btls != Py_None || self->backend == Py_None)
        return call_py(pxc_py_backend_readable, self, NULL) < 0 ? NULL : Py_NewRef(Py_None);
    n = recv(self->bfd, pxc_rbuf + STASH_ROOM, RECV, 0);
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
    if (reply(self, pxc_rbuf + STASH_ROOM, n) < 0)
        return NULL;
    r = scan_backend(self, n);
    if (r != 0) /* -1: an error; 1: the backend failed and the session is closed */
        return r < 0 ? NULL : Py_NewRef(Py_None);
    if (self->closed)
        Py_RETURN_NONE;
    if (self->backend != Py_None && (self->quitting || !self->session_mode)) {
        r = pxc_idle(self);
        if (r < 0)
            return NULL;
        if (r) {
            if (!self->dirty && !self->session_mode)
                r = pxc_give_back_clean(self);
            else
                r = call_py(pxc_py_release_at_idle, self, NULL);
            if (r < 0)
                return NULL;
        }
    }
    if (pxc_interest(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}
