/*
 * pgreuse.wire._speedups: the proxy's message scanners in C.
 *
 * The references are pgreuse.wire.scan.scan_server_py and scan_client_py; this file must do exactly
 * what they do (the differential tests in tests/wire/test_scan.py feed both the same streams, cut
 * everywhere). The proxy walks every message header the server sends, once per message: for a
 * 1000-row result that is 1000 turns of a Python loop per transaction, and in C it is a few
 * nanoseconds each; a client's Parse/Bind/Describe/Execute/Sync is five.
 *
 * The walks themselves are in _scan.h, which the proxy session in C (broker/_proxycore.c) shares.
 *
 * Build is optional (pyproject.toml): without a compiler pgreuse runs the Python scanner, and
 * PGREUSE_PURE_PYTHON=1 selects it even when this module is built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "_scan.h"

static PyObject *
scan_server(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t start;
    long long pos;
    long syncs;
    long tx;
    long flags;

    (void)self;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "scan_server() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    syncs = PyLong_AsLong(args[2]);
    if (syncs == -1 && PyErr_Occurred())
        return NULL;
    if (start < 0) {
        PyErr_Format(PyExc_ValueError, "scan_server(): negative position %zd", start);
        return NULL;
    }
    pos = start;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    flags = pgr_scan_server((const unsigned char *)view.buf, view.len, &pos, &syncs, &tx);
    PyBuffer_Release(&view);
    return Py_BuildValue("(Llll)", pos, syncs, tx, flags);
}

static PyObject *
scan_client(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t n;
    int session_mode;
    long syncs, unsynced, first;

    (void)self;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "scan_client() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    session_mode = PyObject_IsTrue(args[2]);
    if (session_mode < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (n < 0 || n > view.len) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "scan_client(): %zd bytes asked of a buffer of %zd", n, view.len);
        return NULL;
    }
    pgr_scan_client((const unsigned char *)view.buf, n, session_mode, &syncs, &unsynced, &first);
    PyBuffer_Release(&view);
    return Py_BuildValue("(lll)", syncs, unsynced, first);
}

static PyMethodDef methods[] = {
    {"scan_client", (PyCFunction)(void (*)(void))scan_client, METH_FASTCALL,
     "scan_client(data, n, session_mode) -> (syncs, unsynced, first): see pgreuse.wire.scan."},
    {"scan_server", (PyCFunction)(void (*)(void))scan_server, METH_FASTCALL,
     "scan_server(data, pos, syncs) -> (pos, syncs, tx, flags): see pgreuse.wire.scan."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pgreuse.wire._speedups", "C versions of pgreuse's hot loops.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
